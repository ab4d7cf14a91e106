"""Vocabularies: raw categorical values to contiguous embedding ids, with an OOV id 0."""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

OOV_ID = 0
"""Embedding id of values that are rare in (or absent from) the training split."""


class Vocabulary:
    """Maps raw values to ids ``1..len(values)``; anything else maps to ``OOV_ID`` (0).

    ``num_embeddings`` (``len(values) + 1``) is the table size the model needs.

    Args:
        values (Sequence[str]): the kept values; ``values[i]`` gets id ``i + 1``.

    Example::

        >>> v = Vocabulary(["a3", "ff"])
        >>> v.lookup(["ff", "zz", "a3"]).tolist(), v.num_embeddings, v.value(2)
        ([2, 0, 1], 3, 'ff')
    """

    def __init__(self, values: Sequence[str]):
        self.values: List[str] = [str(v) for v in values]
        self._ids: Optional[Dict[str, int]] = None

    def _index(self) -> Dict[str, int]:
        # Built on first lookup only: a 10M-value vocabulary costs ~1 GB as a dict.
        if self._ids is None:
            self._ids = {v: i + 1 for i, v in enumerate(self.values)}
            if len(self._ids) != len(self.values):
                raise ValueError("vocabulary values must be unique")
        return self._ids

    @property
    def num_embeddings(self) -> int:
        return len(self.values) + 1

    def lookup(self, values: Iterable[str]) -> np.ndarray:
        """int64 ids of ``values``, ``OOV_ID`` for values not in the vocabulary."""
        get = self._index().get
        return np.fromiter((get(v, OOV_ID) for v in values), dtype=np.int64)

    def value(self, idx: int) -> str:
        """The raw value of id ``idx`` (``idx >= 1``)."""
        if not 1 <= idx <= len(self.values):
            raise IndexError(f"id {idx} is OOV or out of range [1, {len(self.values)}]")
        return self.values[idx - 1]


class ValueCounter:
    """First pass of vocabulary building for one feature.

    Gives every distinct value a provisional id (first-seen order) and counts its occurrences
    in training rows; ``build`` then keeps values seen at least ``min_count`` times. Memory is
    O(distinct values).

    Example::

        >>> c = ValueCounter()
        >>> c.add(["x", "y", "x", "z"], np.array([True, True, True, False])).tolist()
        [0, 1, 0, 2]
        >>> vocab, remap = c.build(min_count=2)
        >>> vocab.values, remap.tolist()
        (['x'], [1, 0, 0])
    """

    def __init__(self) -> None:
        self._index: dict = {}
        self._counts = np.zeros(0, dtype=np.int64)

    def add(self, values: Union[Sequence[str], np.ndarray], train: np.ndarray) -> np.ndarray:
        """Provisional int64 ids of ``values`` (strings, or a numpy bytes array of ASCII
        values); counts those where ``train`` is True."""
        index = self._index
        if isinstance(values, np.ndarray) and values.dtype.kind == "S" and len(values):
            # One dict operation per distinct value instead of per value, taking the distinct
            # values in order of first appearance, so ids are as if added one by one.
            distinct, first, inverse = _distinct(values)
            order = np.argsort(first)
            seen = distinct[order].astype(str).tolist()
            ids_in_order = np.fromiter((index.setdefault(v, len(index)) for v in seen),
                                       dtype=np.int64, count=len(seen))
            distinct_ids = np.empty(len(seen), dtype=np.int64)
            distinct_ids[order] = ids_in_order
            ids = distinct_ids[inverse]
        else:
            ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64,
                              count=len(values))
        counts = np.bincount(ids[train], minlength=len(index))
        counts[: len(self._counts)] += self._counts
        self._counts = counts
        return ids

    def build(self, min_count: int) -> Tuple[Vocabulary, np.ndarray]:
        """The vocabulary of values with training count >= ``min_count`` (first-seen order) and
        the int32 array mapping provisional ids to final ids (``OOV_ID`` for dropped values)."""
        keep = self._counts >= max(min_count, 1)
        remap = np.zeros(len(keep), dtype=np.int32)
        remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        kept = [v for v, k in zip(self._index, keep.tolist()) if k]
        return Vocabulary(kept), remap


def _distinct(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_index=True, return_inverse=True)`` for a numpy bytes array,
    with an unstable sort (several times faster than the stable one ``return_index`` needs):
    the first index of a value is the smallest index in its run of the sorted order."""
    keys = values.astype("S8").view(np.uint64) if values.dtype.itemsize <= 8 else values
    perm = np.argsort(keys)
    ordered = keys[perm]
    new = np.empty(len(ordered), dtype=bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    runs = np.flatnonzero(new)
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[perm] = np.cumsum(new) - 1
    distinct = values[perm[runs]]
    return distinct, np.minimum.reduceat(perm, runs), inverse
