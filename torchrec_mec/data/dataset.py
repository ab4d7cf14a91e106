"""The interface training and evaluation read data through, and the batch layout."""
from abc import ABC, abstractmethod
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec.data.schema import SPLITS, DataSchema


class CTRDataset(ABC):
    """A CTR data set split into ``"train"``, ``"val"`` and ``"test"``, served as TorchRec batches.

    Implemented by ``EncodedDataset`` (what ``prepare_dataset`` writes) and
    ``BinaryCriteoDataset`` (TorchRec's Criteo 1TB npy files), so a trainer is written once.
    """

    @property
    @abstractmethod
    def schema(self) -> DataSchema:
        """Feature names; ``schema.sparse_names`` are the KJT keys, in order."""

    @property
    @abstractmethod
    def num_embeddings(self) -> Dict[str, int]:
        """Embedding table size per sparse feature (every id in the data is below it)."""

    @abstractmethod
    def num_rows(self, split: str) -> int:
        """Number of rows in ``split``."""

    @abstractmethod
    def id_counts(self, split: str = "train") -> Dict[str, torch.Tensor]:
        """Occurrences of each id per sparse feature in ``split``: int64 [num_embeddings]."""

    @abstractmethod
    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[Batch]:
        """Batches of ``split`` for ``rank`` of ``world_size``; see the implementation."""

    def num_batches(self, split: str, batch_size: int, *, world_size: int = 1,
                    drop_last: bool = False) -> int:
        """How many batches ``batches`` yields on each rank with these arguments."""
        return len(batch_row_ranges(self.num_rows(split), batch_size, world_size=world_size,
                                    drop_last=drop_last))


def row_chunks(array: np.ndarray, rows: int = 1 << 20) -> Iterator[np.ndarray]:
    """``array`` (typically a memory map) read into memory ``rows`` rows at a time."""
    for start in range(0, len(array), rows):
        yield np.asarray(array[start: start + rows])


def count_ids(chunks: Iterable[np.ndarray], num_embeddings: Dict[str, int]
              ) -> Dict[str, torch.Tensor]:
    """Occurrences of each id per sparse feature, over [rows, features] chunks of ids whose
    columns are the features of ``num_embeddings``, in its order: int64 [num_embeddings].

    Example::

        >>> chunks = [np.array([[0, 2], [1, 2]]), np.array([[0, 0]])]
        >>> {k: v.tolist() for k, v in count_ids(chunks, {"a": 2, "b": 3}).items()}
        {'a': [2, 1], 'b': [1, 0, 2]}
    """
    counts = [np.zeros(size, dtype=np.int64) for size in num_embeddings.values()]
    for chunk in chunks:
        for f, size in enumerate(num_embeddings.values()):
            counts[f] += np.bincount(chunk[:, f], minlength=size)
    return {name: torch.from_numpy(c) for name, c in zip(num_embeddings, counts)}


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def batch_row_ranges(num_rows: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                     drop_last: bool = False) -> List[Tuple[int, int]]:
    """``[start, stop)`` positions of the batches ``rank`` gets from ``num_rows`` ordered rows.

    Rows are cut into global batches of ``batch_size * world_size``; each rank takes its
    contiguous slice of every global batch, so concatenating the ranks' batches in rank order
    gives exactly the batches of one process with ``batch_size * world_size``. A last, short
    global batch is split as evenly as possible (``drop_last=False``) or dropped. When it has
    fewer rows than ``world_size`` it is merged into the previous global batch instead, so no
    rank ever gets an empty batch (TorchRec modules reject those) and all ranks take the same
    number of steps.

    Args:
        num_rows (int): rows in the split.
        batch_size (int): local (per-rank) batch size.
        rank (int): this process.
        world_size (int): number of processes.
        drop_last (bool): drop the last global batch if it is short.

    Example::

        >>> batch_row_ranges(10, 2, rank=1, world_size=2)
        [(2, 4), (6, 8), (9, 10)]
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                         f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
    global_size = batch_size * world_size
    full, rest = divmod(num_rows, global_size)
    bounds = [(b * global_size, global_size) for b in range(full)]
    if rest and not drop_last:
        if rest >= world_size:
            bounds.append((full * global_size, rest))
        elif full:
            bounds[-1] = ((full - 1) * global_size, global_size + rest)
        else:
            raise ValueError(f"{num_rows} rows cannot give each of {world_size} ranks a "
                             f"non-empty batch; use fewer ranks or drop_last=True")
    return [(start + rank * size // world_size, start + (rank + 1) * size // world_size)
            for start, size in bounds]


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray,
               keys: Sequence[str]) -> Batch:
    """A TorchRec ``Batch`` from row-major arrays, one id per bag.

    Args:
        dense (np.ndarray): float32 [B, num_dense].
        sparse (np.ndarray): integer ids [B, num_sparse], columns in ``keys`` order.
        labels (np.ndarray): [B] (or [B, 1]) 0/1 labels.
        keys (Sequence[str]): sparse feature names.

    Returns:
        Batch: ``dense_features`` float32 [B, num_dense], ``sparse_features`` a
        ``KeyedJaggedTensor`` with int64 values (feature-major, stride B, every length 1),
        ``labels`` float32 [B].

    Example::

        >>> b = make_batch(np.zeros((2, 1), np.float32), np.array([[3, 4], [5, 6]]),
        ...                np.array([0, 1]), ["C1", "C2"])
        >>> b.sparse_features["C2"].values().tolist(), b.labels.tolist()
        ([4, 6], [0.0, 1.0])
    """
    num_rows, num_keys = sparse.shape
    if num_keys != len(keys):
        raise ValueError(f"sparse has {num_keys} columns for {len(keys)} keys")
    values = np.ascontiguousarray(sparse.T, dtype=np.int64).reshape(-1)
    kjt = KeyedJaggedTensor(
        keys=list(keys),
        values=torch.from_numpy(values),
        lengths=torch.ones(num_rows * num_keys, dtype=torch.int32),
        offsets=torch.arange(num_rows * num_keys + 1, dtype=torch.int32),
        stride=num_rows,
        length_per_key=[num_rows] * num_keys,
        offset_per_key=[num_rows * i for i in range(num_keys + 1)],
        index_per_key={k: i for i, k in enumerate(keys)},
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)),
    )


class SegmentedRows:
    """Rows of one split stored as consecutive segments (e.g. one memory map per day file).

    Args:
        segments (Sequence[Dict[str, np.ndarray]]): each maps ``dense``, ``sparse``,
            ``labels`` to arrays with the same number of rows.

    Example::

        >>> a = {"x": np.arange(3)}; b = {"x": np.arange(10, 12)}
        >>> rows = SegmentedRows([a, b])
        >>> rows.take(slice(2, 4))["x"].tolist(), rows.take(np.array([4, 0]))["x"].tolist()
        ([2, 10], [11, 0])
    """

    def __init__(self, segments: Sequence[Dict[str, np.ndarray]]):
        self.segments = [s for s in segments if len(next(iter(s.values())))]
        lengths = [len(next(iter(s.values()))) for s in self.segments]
        self.bounds = np.cumsum([0] + lengths)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def take(self, rows: Union[slice, np.ndarray]) -> Dict[str, np.ndarray]:
        """The rows at positions ``rows`` (a ``slice`` with step 1, or an index array)."""
        if len(self.segments) == 1:
            return {k: np.array(v[rows]) for k, v in self.segments[0].items()}
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        seg = np.searchsorted(self.bounds, rows, side="right") - 1
        first = self.segments[0]
        out = {k: np.empty((len(rows),) + v.shape[1:], dtype=v.dtype) for k, v in first.items()}
        for s in np.unique(seg):
            mask = seg == s
            local = rows[mask] - self.bounds[s]
            for k, v in self.segments[s].items():
                out[k][mask] = v[local]
        return out


def serve_batches(rows: SegmentedRows, keys: Sequence[str], batch_size: int, *, shuffle: bool,
                  seed: int, rank: int, world_size: int, drop_last: bool,
                  sparse_modulo: Optional[np.ndarray] = None) -> Iterator[Batch]:
    """The batching rule every ``CTRDataset`` shares: ``batch_row_ranges`` over the rows in
    file order, or in the order of ``np.random.default_rng(seed).permutation`` if ``shuffle``.
    Arguments are checked on the call, before the first batch. ``sparse_modulo`` [num_sparse]
    hashes ids into tables (TorchRec's ``hashes``)."""
    ranges = batch_row_ranges(len(rows), batch_size, rank=rank, world_size=world_size,
                              drop_last=drop_last)
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else None

    def generate() -> Iterator[Batch]:
        for lo, hi in ranges:
            got = rows.take(slice(lo, hi) if order is None else order[lo:hi])
            sparse = got["sparse"] if sparse_modulo is None else got["sparse"] % sparse_modulo
            yield make_batch(got["dense"], sparse, got["labels"], keys)

    return generate()
