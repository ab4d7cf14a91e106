"""Configs for product-quantized embedding tables."""
import numbers
import warnings
from dataclasses import dataclass

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

    Args:
        num_subspaces (int): M; ``embedding_dim`` must be divisible by it.
        codebook_size (int): K in [2, 65536]; 0 keeps the table full (uncompressed).

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16,
        ...     feature_names=["f"], num_subspaces=4, codebook_size=256)
        >>> cfg.compressed, cfg.subspace_dim
        (True, 4)
    """

    num_subspaces: int = 1
    codebook_size: int = 0

    def __post_init__(self) -> None:
        for field in ("num_embeddings", "embedding_dim"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"table {self.name!r}: {field} must be an integer >= 1, got {value!r}")
        super().__post_init__()
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

    @property
    def compressed(self) -> bool:
        return self.codebook_size > 0

    @property
    def subspace_dim(self) -> int:
        return self.embedding_dim // self.num_subspaces

    @property
    def code_dtype(self) -> torch.dtype:
        return code_dtype(self.codebook_size)


def as_quantized_config(
    config: EmbeddingBagConfig, num_subspaces: int = 1, codebook_size: int = 0
) -> QuantizedEmbeddingBagConfig:
    """Copies a TorchRec ``EmbeddingBagConfig`` into a ``QuantizedEmbeddingBagConfig``."""
    fields = {k: v for k, v in vars(config).items() if k not in ("num_subspaces", "codebook_size")}
    return QuantizedEmbeddingBagConfig(
        **fields, num_subspaces=num_subspaces, codebook_size=codebook_size
    )
