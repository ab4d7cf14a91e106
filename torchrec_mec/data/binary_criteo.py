"""TorchRec's preprocessed Criteo 1TB arrays behind the ``CTRDataset`` interface.

``torchrec.datasets.criteo`` (``BinaryCriteoUtils.tsv_to_npys``, ``sparse_to_contiguous``, or
``torchrec/datasets/scripts/npy_preproc_criteo.py``) turns each day of the 1TB click logs into
``day_{d}_dense.npy`` (float32 [N, 13], already log-transformed), ``day_{d}_sparse.npy``
(integer [N, 26]) and ``day_{d}_labels.npy`` (int32 [N, 1]). This adapter reads those files
with TorchRec's own readers (``BinaryCriteoUtils.get_shape_from_npy`` / ``load_npy_range``,
memory-mapped) and its split rule (train = the train days, val / test = the first / second
half of the evaluation day), and serves them with the same batching as ``EncodedDataset``.
"""
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DAYS,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    BinaryCriteoUtils,
)
from torchrec.datasets.utils import PATH_MANAGER_KEY, Batch

from torchrec_mec.data.dataset import (
    CTRDataset,
    SegmentedRows,
    check_split,
    count_ids,
    row_chunks,
    serve_batches,
)
from torchrec_mec.data.schema import DataSchema


class BinaryCriteoDataset(CTRDataset):
    """The Criteo 1TB npy files that ``torchrec.datasets.criteo`` writes, as a ``CTRDataset``.

    Keys and dense names are TorchRec's (``cat_0..cat_25``, ``int_0..int_12``). Batches follow
    ``EncodedDataset.batches`` (rank slices of global batches; ``shuffle`` permutes the
    split's rows, holding 8 bytes per row in memory); labels are float32 [B].

    Args:
        root (str): directory holding ``day_{d}_{dense,sparse,labels}.npy``.
        train_days (Sequence[int]): days of the training split (TorchRec: 0..22).
        eval_day (int): the day split into val (first half) and test (second half).
        num_embeddings_per_feature (Optional[Sequence[int]]): 26 table sizes; ids are taken
            modulo them (TorchRec's ``hashes``). Default: max id + 1 per feature, from one pass
            over the sparse files.
        sparse_name (str): file infix of the sparse arrays, e.g. ``"sparse_contig_freq"`` for
            the output of ``BinaryCriteoUtils.sparse_to_contiguous``.
        path_manager_key (str): TorchRec's iopath key.

    Example::

        >>> import tempfile, numpy as np
        >>> root = tempfile.mkdtemp()
        >>> for d in (0, 1):
        ...     np.save(f"{root}/day_{d}_dense.npy", np.zeros((6, 13), np.float32))
        ...     np.save(f"{root}/day_{d}_sparse.npy", np.ones((6, 26), np.int32))
        ...     np.save(f"{root}/day_{d}_labels.npy", np.zeros((6, 1), np.int32))
        >>> ds = BinaryCriteoDataset(root, train_days=[0], eval_day=1)
        >>> ds.num_rows("train"), ds.num_rows("val"), ds.num_embeddings["cat_0"]
        (6, 3, 2)
        >>> next(ds.batches("test", 2)).sparse_features["cat_3"].values().tolist()
        [1, 1]
    """

    def __init__(
        self,
        root: str,
        *,
        train_days: Sequence[int] = tuple(range(DAYS - 1)),
        eval_day: int = DAYS - 1,
        num_embeddings_per_feature: Optional[Sequence[int]] = None,
        sparse_name: str = "sparse",
        path_manager_key: str = PATH_MANAGER_KEY,
    ):
        self.root, self.train_days, self.eval_day = root, list(train_days), eval_day
        self.sparse_name, self.path_manager_key = sparse_name, path_manager_key
        for d in [*self.train_days, eval_day]:
            for kind in ("dense", sparse_name, "labels"):
                if not os.path.isfile(self._path(d, kind)):
                    raise FileNotFoundError(f"Criteo npy file not found: {self._path(d, kind)}")
        self._schema = DataSchema(tuple(DEFAULT_INT_NAMES), tuple(DEFAULT_CAT_NAMES))
        eval_rows = self._shape(eval_day)[0]
        half = int(np.ceil(eval_rows / 2.0))  # TorchRec's val/test cut of the last day
        self._ranges: Dict[str, List[tuple]] = {
            "train": [(d, 0, self._shape(d)[0]) for d in self.train_days],
            "val": [(eval_day, 0, half)],
            "test": [(eval_day, half, eval_rows - half)],
        }
        if num_embeddings_per_feature is not None:
            if len(num_embeddings_per_feature) != CAT_FEATURE_COUNT:
                raise ValueError(f"need {CAT_FEATURE_COUNT} table sizes, got "
                                 f"{len(num_embeddings_per_feature)}")
            self._modulo: Optional[np.ndarray] = np.asarray(num_embeddings_per_feature,
                                                            dtype=np.int64)
            self._sizes = [int(v) for v in num_embeddings_per_feature]
        else:
            self._modulo = None
            self._sizes = [int(v) for v in self._max_ids() + 1]
        self._counts: Dict[str, Dict[str, torch.Tensor]] = {}

    def _path(self, day: int, kind: str) -> str:
        return os.path.join(self.root, f"day_{day}_{kind}.npy")

    def _shape(self, day: int) -> tuple:
        return BinaryCriteoUtils.get_shape_from_npy(self._path(day, "dense"),
                                                    path_manager_key=self.path_manager_key)

    def _rows(self, split: str) -> SegmentedRows:
        segments = []
        for day, start, num in self._ranges[check_split(split)]:
            if num:
                segments.append({
                    key: BinaryCriteoUtils.load_npy_range(
                        self._path(day, kind), start, num,
                        path_manager_key=self.path_manager_key, mmap_mode=True)
                    for key, kind in (("dense", "dense"), ("sparse", self.sparse_name),
                                      ("labels", "labels"))})
        return SegmentedRows(segments)

    def _sparse_chunks(self, split: str) -> Iterator[np.ndarray]:
        for segment in self._rows(split).segments:
            for chunk in row_chunks(segment["sparse"]):
                yield chunk.astype(np.int64, copy=False)

    def _max_ids(self) -> np.ndarray:
        top = np.zeros(CAT_FEATURE_COUNT, dtype=np.int64)
        for split in ("train", "val", "test"):
            for chunk in self._sparse_chunks(split):
                top = np.maximum(top, chunk.max(axis=0))
        return top

    @property
    def schema(self) -> DataSchema:
        return self._schema

    @property
    def num_embeddings(self) -> Dict[str, int]:
        return {name: int(v) for name, v in zip(DEFAULT_CAT_NAMES, self._sizes)}

    def num_rows(self, split: str) -> int:
        return sum(num for _, _, num in self._ranges[check_split(split)])

    def id_counts(self, split: str = "train") -> Dict[str, torch.Tensor]:
        """Occurrences of each (hashed) id per feature in ``split``, int64 [num_embeddings]."""
        if split not in self._counts:
            chunks = self._sparse_chunks(split)
            if self._modulo is not None:
                chunks = (chunk % self._modulo for chunk in chunks)
            self._counts[split] = count_ids(chunks, self.num_embeddings)
        return {k: v.clone() for k, v in self._counts[split].items()}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[Batch]:
        """TorchRec batches of ``split``, with the arguments of ``EncodedDataset.batches``."""
        return serve_batches(self._rows(split), DEFAULT_CAT_NAMES, batch_size, shuffle=shuffle,
                             seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                             sparse_modulo=self._modulo)
