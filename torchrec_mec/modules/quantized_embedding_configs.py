"""Configs for product-quantized embedding tables."""
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

MAX_CODEBOOK_SIZE = 65536


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest unsigned integer dtype that holds ``codebook_size - 1``.

    >>> code_dtype(256), code_dtype(257)
    (torch.uint8, torch.uint16)
    """
    if not 2 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size must be in [2, {MAX_CODEBOOK_SIZE}], got {codebook_size}")
    return torch.uint8 if codebook_size <= 256 else torch.uint16


class CodebookLargerThanTableWarning(UserWarning):
    """A compressed table's ``codebook_size`` exceeds its ``num_embeddings``."""


@dataclass
class QuantizedEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` whose table may be product-quantized.

    Row ``i`` of a compressed table is ``concat_m codebooks[m, codes[i, m]]``: ``num_subspaces``
    (M) codes per row, each indexing one of M codebooks of ``codebook_size`` (K) codewords of
    ``embedding_dim / M`` dims.

    ``num_embeddings`` and ``embedding_dim`` must be at least 1. A ``codebook_size`` larger than
    ``num_embeddings`` is allowed (a row-wise shard of a table holds fewer rows than K) but warns
    with :class:`CodebookLargerThanTableWarning`: such a table can use at most ``num_embeddings``
    of its K codewords per codebook, and its codebooks hold more floats than the full table would.

    **New ids** (see docs/new_ids.md). A compressed table may serve more ids than it has codes
    for: ids ``[0, coded_rows)`` have codes (from stage 2); ids ``[coded_rows, num_embeddings)``
    are *new* (a vocabulary appends values first seen after compression there) and are served
    by a hashed fallback table of ``fallback_rows`` float rows (id ``i`` reads row
    ``(i - coded_rows) % fallback_rows``), which trains like a full table, until they are
    promoted: ``promotion_slots`` new ids can be given codes of their own (encoded from their
    learned fallback rows by ``QuantizedEmbeddingBagCollection.promote``).

    Args:
        num_subspaces (int): M; ``embedding_dim`` must be divisible by it.
        codebook_size (int): K in [2, 65536]; 0 keeps the table full (uncompressed).
        coded_rows (Optional[int]): ids with codes, in ``[1, num_embeddings]``; default (None):
            all ``num_embeddings``. Fewer needs ``fallback_rows >= 1``.
        fallback_rows (int): rows of the hashed fallback table (0: none); compressed tables
            with new ids only.
        promotion_slots (int): how many new ids can get codes of their own (0: none); needs a
            fallback table.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16,
        ...     feature_names=["f"], num_subspaces=4, codebook_size=256)
        >>> cfg.compressed, cfg.subspace_dim, cfg.coded_rows, cfg.has_fallback
        (True, 4, 1000, False)
        >>> grown = QuantizedEmbeddingBagConfig(name="t", num_embeddings=1200, embedding_dim=16,
        ...     feature_names=["f"], num_subspaces=4, codebook_size=256, coded_rows=1000,
        ...     fallback_rows=50, promotion_slots=100)
        >>> grown.has_fallback, grown.code_rows  # codes of coded ids, then of promoted ones
        (True, 1100)
    """

    num_subspaces: int = 1
    codebook_size: int = 0
    coded_rows: Optional[int] = None
    fallback_rows: int = 0
    promotion_slots: int = 0

    def __post_init__(self) -> None:
        for field in ("num_embeddings", "embedding_dim"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"table {self.name!r}: {field} must be an integer >= 1, got {value!r}")
        super().__post_init__()
        self._check_new_ids()
        if self.codebook_size == 0:
            return
        if self.num_subspaces < 1 or self.embedding_dim % self.num_subspaces:
            raise ValueError(
                f"table {self.name!r}: embedding_dim {self.embedding_dim} is not divisible by "
                f"num_subspaces {self.num_subspaces}"
            )
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"table {self.name!r}: codebook_size must be 0 (full table) or in "
                f"[2, {MAX_CODEBOOK_SIZE}], got {self.codebook_size}"
            )
        if self.codebook_size > self.num_embeddings:
            warnings.warn(
                f"table {self.name!r}: codebook_size {self.codebook_size} > num_embeddings "
                f"{self.num_embeddings}: at most {self.num_embeddings} of the codewords per codebook "
                "can be used, and the codebooks hold more floats than the full table; keep the table "
                "full (codebook_size=0) or choose codebook_size <= num_embeddings",
                CodebookLargerThanTableWarning,
                stacklevel=3,
            )

    def _check_new_ids(self) -> None:
        for field in ("fallback_rows", "promotion_slots"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"table {self.name!r}: {field} must be an integer >= 0, got {value!r}")
        if self.coded_rows is None:
            self.coded_rows = self.num_embeddings
        if not isinstance(self.coded_rows, numbers.Integral) or not (
                1 <= int(self.coded_rows) <= self.num_embeddings):
            raise ValueError(f"table {self.name!r}: coded_rows must be an integer in [1, "
                             f"num_embeddings={self.num_embeddings}], got {self.coded_rows!r}")
        new_ids = self.num_embeddings - self.coded_rows
        if (new_ids or self.fallback_rows or self.promotion_slots) and self.codebook_size == 0:
            raise ValueError(f"table {self.name!r}: coded_rows, fallback_rows and promotion_slots "
                             "are for compressed tables (codebook_size > 0); a full table has a "
                             "row for every id")
        if new_ids and not self.fallback_rows:
            raise ValueError(f"table {self.name!r}: ids [{self.coded_rows}, {self.num_embeddings}) "
                             "have no codes and need a fallback table (fallback_rows >= 1)")
        if self.fallback_rows and not new_ids:
            raise ValueError(f"table {self.name!r}: fallback_rows={self.fallback_rows} but every "
                             f"id has codes (coded_rows == num_embeddings == {self.num_embeddings}); "
                             "give num_embeddings room for new ids above coded_rows")
        if self.promotion_slots > new_ids:
            raise ValueError(f"table {self.name!r}: promotion_slots={self.promotion_slots} is more "
                             f"than the {new_ids} new ids [{self.coded_rows}, {self.num_embeddings})")

    @property
    def compressed(self) -> bool:
        return self.codebook_size > 0

    @property
    def has_fallback(self) -> bool:
        """Whether the table serves new ids (``coded_rows < num_embeddings``) from a fallback."""
        return self.fallback_rows > 0

    @property
    def code_rows(self) -> int:
        """Rows of the ``codes`` buffer: the coded ids', then one per promotion slot."""
        assert self.coded_rows is not None  # set in __post_init__
        return self.coded_rows + self.promotion_slots

    @property
    def subspace_dim(self) -> int:
        return self.embedding_dim // self.num_subspaces

    @property
    def code_dtype(self) -> torch.dtype:
        return code_dtype(self.codebook_size)


_QUANTIZED_FIELDS = ("num_subspaces", "codebook_size", "coded_rows", "fallback_rows",
                     "promotion_slots")


def as_quantized_config(
    config: EmbeddingBagConfig, num_subspaces: int = 1, codebook_size: int = 0
) -> QuantizedEmbeddingBagConfig:
    """Copies a TorchRec ``EmbeddingBagConfig`` into a ``QuantizedEmbeddingBagConfig`` (without
    new-id settings: every id has codes, or the table is full)."""
    fields = {k: v for k, v in vars(config).items() if k not in _QUANTIZED_FIELDS}
    return QuantizedEmbeddingBagConfig(
        **fields, num_subspaces=num_subspaces, codebook_size=codebook_size
    )
