"""The on-disk encoded data set that ``prepare_dataset`` writes, and batching from it.

Layout of a prepared directory (docs/data.md has the details)::

    manifest.json              written last: format version, arguments, schema, sizes, checksums
    {train,val,test}/dense.npy         float32 [N, num_dense]
    {train,val,test}/sparse.npy        int32   [N, num_sparse], vocabulary ids, 0 = OOV
    {train,val,test}/labels.npy        float32 [N]
    {train,val,test}/probabilities.npy float32 [N], synthetic data only: the planted P(click)
    vocab/<feature>.npy                unicode [num_embeddings - 1], raw value of ids 1..
"""
import os
from typing import Any, Dict, Iterator

import numpy as np
import torch
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch

from torchrec_mec.data._files import (
    FORMAT_VERSION,
    MANIFEST,
    read_manifest,
    sha256_file,
)
from torchrec_mec.data.dataset import (
    CTRDataset,
    SegmentedRows,
    check_split,
    count_ids,
    row_chunks,
    serve_batches,
)
from torchrec_mec.data.schema import BadRowReport, CorruptDatasetError, DataSchema
from torchrec_mec.data.synthetic import SyntheticClickModel, SyntheticConfig
from torchrec_mec.data.vocab import Vocabulary


class EncodedDataset(CTRDataset):
    """A prepared CTR data set on disk (see ``prepare_dataset``), read through memory maps.

    Opening checks that every file in the manifest exists with its recorded size (catching
    truncation); ``verify=True`` also checks sha256 checksums. Either failure raises
    ``CorruptDatasetError`` naming the file.

    Args:
        path (str): the directory ``prepare_dataset`` wrote.
        verify (bool): check file checksums, not only sizes.

    Example::

        >>> import tempfile
        >>> from torchrec_mec.data import SyntheticConfig, prepare_dataset
        >>> out = tempfile.mkdtemp()
        >>> _ = prepare_dataset(None, "synthetic", out, progress=False,
        ...     synthetic=SyntheticConfig(num_rows=1000, table_sizes=(50, 20), num_dense=2))
        >>> ds = EncodedDataset(out)
        >>> ds.num_embeddings, ds.num_rows("train")
        ({'C1': 51, 'C2': 21}, 800)
        >>> batch = next(ds.batches("train", batch_size=4))
        >>> batch.dense_features.shape, batch.sparse_features.keys(), batch.labels.shape
        (torch.Size([4, 2]), ['C1', 'C2'], torch.Size([4]))
    """

    def __init__(self, path: str, *, verify: bool = False):
        self.path = path
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"{os.path.join(path, MANIFEST)} not found: {path} is not a "
                                    "prepared data set, or its preparation did not finish")
        if manifest["format_version"] != FORMAT_VERSION:
            raise CorruptDatasetError(os.path.join(path, MANIFEST), f"format version "
                                      f"{manifest['format_version']}, this code reads "
                                      f"{FORMAT_VERSION}; prepare the data set again")
        self.manifest: Dict[str, Any] = manifest
        self._schema = DataSchema.from_dict(manifest["schema"])
        self._arrays: Dict[str, Dict[str, np.ndarray]] = {}
        self._counts: Dict[str, Dict[str, torch.Tensor]] = {}
        for rel, entry in manifest["files"].items():
            file = os.path.join(path, rel)
            if not os.path.isfile(file):
                raise CorruptDatasetError(file, "missing (listed in the manifest)")
            size = os.path.getsize(file)
            if size != entry["size"]:
                raise CorruptDatasetError(file, f"size {size} bytes, manifest says "
                                          f"{entry['size']} (truncated or overwritten)")
        if verify:
            self.verify()

    def verify(self) -> None:
        """Checks every file's sha256 against the manifest; raises ``CorruptDatasetError``."""
        for rel, entry in self.manifest["files"].items():
            file = os.path.join(self.path, rel)
            if sha256_file(file) != entry["sha256"]:
                raise CorruptDatasetError(file, "sha256 does not match the manifest (corrupt)")

    @property
    def schema(self) -> DataSchema:
        return self._schema

    @property
    def num_embeddings(self) -> Dict[str, int]:
        sizes = self.manifest["num_embeddings"]
        return {name: int(sizes[name]) for name in self.schema.sparse_names}

    @property
    def bad_rows(self) -> BadRowReport:
        """Rows skipped while preparing (count and the first line numbers with reasons)."""
        return BadRowReport.from_dict(self.manifest["bad_rows"])

    @property
    def is_synthetic(self) -> bool:
        return self.manifest["synthetic"] is not None

    def num_rows(self, split: str) -> int:
        return int(self.manifest["num_rows"][check_split(split)])

    def arrays(self, split: str) -> Dict[str, np.ndarray]:
        """Read-only memory maps of ``split``: ``dense``, ``sparse``, ``labels`` (and
        ``probabilities`` for synthetic data)."""
        check_split(split)
        if split not in self._arrays:
            out = {}
            for rel in self.manifest["files"]:
                folder, name = os.path.split(rel)
                if folder == split:
                    out[name[: -len(".npy")]] = self._load(rel)
            self._arrays[split] = out
        return self._arrays[split]

    def _load(self, rel: str) -> np.ndarray:
        file = os.path.join(self.path, rel)
        entry = self.manifest["files"][rel]
        try:
            array = np.load(file, mmap_mode="r")
        except ValueError as e:
            raise CorruptDatasetError(file, f"unreadable npy file ({e})") from e
        if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
            raise CorruptDatasetError(file, f"shape {array.shape} {array.dtype.str}, manifest "
                                      f"says {tuple(entry['shape'])} {entry['dtype']}")
        return array

    def vocabulary(self, feature: str) -> Vocabulary:
        """The vocabulary of a sparse feature (raw value of each id); text formats only."""
        vocab = self.manifest["vocabulary"]
        if vocab is None:
            raise ValueError(f"{self.path} is synthetic: ids are not drawn from a vocabulary")
        if feature not in vocab["files"]:
            raise KeyError(f"no sparse feature {feature!r}; have {self.schema.sparse_names}")
        return Vocabulary(self._load(vocab["files"][feature]).tolist())

    def id_counts(self, split: str = "train") -> Dict[str, torch.Tensor]:
        """Occurrences of each id per sparse feature in ``split`` (the MEC popularity counts).

        Returns:
            Dict[str, torch.Tensor]: int64 [num_embeddings] per feature; index 0 counts OOV.
        """
        if split not in self._counts:
            sizes = {f: self.num_embeddings[f] for f in self.schema.sparse_names}
            self._counts[split] = count_ids(row_chunks(self.arrays(split)["sparse"]), sizes)
        return {k: v.clone() for k, v in self._counts[split].items()}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[Batch]:
        """TorchRec batches of ``split`` for ``rank``.

        Each rank gets its contiguous slice of every global batch of
        ``batch_size * world_size`` rows (``batch_row_ranges`` has the exact rule), so
        ``world_size`` ranks see the same samples in the same global batches as one process
        with ``batch_size * world_size``.

        Args:
            split (str): ``"train"``, ``"val"`` or ``"test"``.
            batch_size (int): local batch size.
            shuffle (bool): visit rows in a random order drawn from ``seed`` (the same on
                every rank); pass a different seed each epoch (e.g. ``seed + epoch``).
            seed (int): shuffle seed.
            rank (int): this process's rank.
            world_size (int): number of processes.
            drop_last (bool): drop the last global batch if it is short.

        Returns:
            Iterator[Batch]: ``dense_features`` float32 [B, num_dense], ``sparse_features`` a
            ``KeyedJaggedTensor`` (keys ``schema.sparse_names``, one int64 id per bag),
            ``labels`` float32 [B].
        """
        arrays = self.arrays(split)
        rows = SegmentedRows([{k: arrays[k] for k in ("dense", "sparse", "labels")}])
        return serve_batches(rows, self.schema.sparse_names, batch_size, shuffle=shuffle,
                             seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)

    def click_model(self) -> SyntheticClickModel:
        """The planted model that generated this (synthetic) data set."""
        if not self.is_synthetic:
            raise ValueError(f"{self.path} is not synthetic: it has no planted model")
        meta = self.manifest["synthetic"]
        return SyntheticClickModel(SyntheticConfig(**meta["config"]), seed=meta["seed"])

    def true_probabilities(self, split: str) -> torch.Tensor:
        """Planted click probability of each row of ``split`` (synthetic only), float32 [N]."""
        if not self.is_synthetic:
            raise ValueError(f"{self.path} is not synthetic: it has no true probabilities")
        return torch.from_numpy(np.array(self.arrays(split)["probabilities"]))

    def bayes_auc(self, split: str) -> float:
        """AUC of the true probabilities against the labels of ``split``: the best AUC any model
        can reach on it (synthetic data only). Computed with torchmetrics ``BinaryAUROC``."""
        metric = BinaryAUROC()
        metric.update(self.true_probabilities(split),
                      torch.from_numpy(np.array(self.arrays(split)["labels"])).long())
        return float(metric.compute())

