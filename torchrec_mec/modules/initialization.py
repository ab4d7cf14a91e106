"""Initial values of a table's codes, codebooks and weights, by position, whatever the sharding.

A table draws one seed from torch's global generator when it is built (on any device, ``meta``
included); every initial value is then a function of that seed and of its position in the table.
So any part of a table (a row-wise or column-wise shard, one block of rows) can be initialised
alone, with memory for that part only, and a table sharded over any number of ranks starts from
the same values as the same table built whole in one process.

Rows are drawn in blocks of :data:`ROW_BLOCK` rows, each from its own generator: random codes
uniform in ``[0, K)``; codebooks and full-table weights by the config's ``init_fn`` (TorchRec's
default: uniform in ``[weight_init_min, weight_init_max]``), applied to one block at a time on the
CPU with torch's CPU generator seeded for that block (its state is restored afterwards).
"""
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from torchrec_mec.modules.quantized_embedding_configs import QuantizedEmbeddingBagConfig

ROW_BLOCK = 1 << 16

_CODES, _CODEBOOKS, _WEIGHT, _FALLBACK = 0, 1, 2, 3


def draw_seed() -> int:
    """One seed for a table's initial values, drawn from torch's global CPU generator.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> a = draw_seed()
        >>> _ = torch.manual_seed(0)
        >>> a == draw_seed()
        True
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _block_seed(seed: int, kind: int, block: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(kind, block)).generate_state(1, np.uint64)[0] >> 1)


def _check_range(name: str, what: str, first: int, count: int, total: int) -> None:
    if first < 0 or first + count > total:
        raise ValueError(f"table {name!r}: {what} [{first}, {first + count}) outside [0, {total})")


def _fill_by_blocks(
    out: torch.Tensor,
    config: QuantizedEmbeddingBagConfig,
    seed: int,
    kind: int,
    first_row: int,
    first_column: int,
    draw: Callable[[int, int], torch.Tensor],
    total_rows: Optional[int] = None,
) -> torch.Tensor:
    """Fills ``out`` [n, c] with rows ``[first_row, first_row + n)`` and columns ``[first_column,
    first_column + c)`` of the blocks ``draw(block_seed, block_rows)`` gives, of a tensor of
    ``total_rows`` rows (default: the table's ``num_embeddings``)."""
    rows, columns = out.shape
    total = config.num_embeddings if total_rows is None else total_rows
    _check_range(config.name, "rows", first_row, rows, total)
    blocks = range(first_row // ROW_BLOCK, (first_row + rows - 1) // ROW_BLOCK + 1) if rows else range(0)
    for block in blocks:
        drawn = draw(_block_seed(seed, kind, block), min(ROW_BLOCK, total - block * ROW_BLOCK))
        start = max(first_row, block * ROW_BLOCK)
        stop = min(first_row + rows, (block + 1) * ROW_BLOCK)
        out[start - first_row : stop - first_row].copy_(
            drawn[start - block * ROW_BLOCK : stop - block * ROW_BLOCK,
                  first_column : first_column + columns]
        )
    return out


@torch.no_grad()
def init_codes_(
    codes: torch.Tensor,
    config: QuantizedEmbeddingBagConfig,
    seed: int,
    first_row: int = 0,
    first_subspace: int = 0,
) -> torch.Tensor:
    """Fills ``codes`` [n, m] with the initial codes of rows ``[first_row, first_row + n)`` and
    subspaces ``[first_subspace, first_subspace + m)`` of the table: uniform in ``[0, K)``.

    Args:
        codes: the tensor to fill (any device, any integer dtype that holds ``K - 1``).
        config: the table's config (compressed).
        seed: the table's seed (:func:`draw_seed`).
        first_row: the table row of ``codes[0]``.
        first_subspace: the subspace of ``codes[:, 0]``.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8,
        ...     num_subspaces=4, codebook_size=16)
        >>> whole = init_codes_(torch.empty(10, 4, dtype=torch.uint8), cfg, seed=7)
        >>> part = init_codes_(torch.empty(3, 2, dtype=torch.uint8), cfg, seed=7, first_row=5,
        ...     first_subspace=2)
        >>> torch.equal(part, whole[5:8, 2:4])
        True
    """
    _check_range(config.name, "subspaces", first_subspace, codes.shape[1], config.num_subspaces)

    def draw(block_seed: int, block_rows: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(block_seed)
        return torch.randint(0, config.codebook_size, (block_rows, config.num_subspaces),
                             generator=gen, dtype=torch.int32)

    return _fill_by_blocks(codes, config, seed, _CODES, first_row, first_subspace, draw)


def _init_fn_block(config: QuantizedEmbeddingBagConfig, seed: int, shape: Tuple[int, ...]) -> torch.Tensor:
    block = torch.empty(shape)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        assert config.init_fn is not None  # set by EmbeddingBagConfig.__post_init__
        config.init_fn(block)
    return block


@torch.no_grad()
def init_codebooks_(
    codebooks: torch.Tensor,
    config: QuantizedEmbeddingBagConfig,
    seed: int,
    first_subspace: int = 0,
) -> torch.Tensor:
    """Fills ``codebooks`` [m, K, D/M] with the initial codebooks of subspaces
    ``[first_subspace, first_subspace + m)``: the config's ``init_fn`` applied to all M codebooks.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8,
        ...     num_subspaces=4, codebook_size=16)
        >>> whole = init_codebooks_(torch.empty(4, 16, 2), cfg, seed=7)
        >>> torch.equal(init_codebooks_(torch.empty(1, 16, 2), cfg, seed=7, first_subspace=3), whole[3:])
        True
    """
    subspaces = codebooks.shape[0]
    _check_range(config.name, "subspaces", first_subspace, subspaces, config.num_subspaces)
    full = _init_fn_block(
        config, _block_seed(seed, _CODEBOOKS, 0),
        (config.num_subspaces, config.codebook_size, config.subspace_dim),
    )
    codebooks.copy_(full[first_subspace : first_subspace + subspaces])
    return codebooks


@torch.no_grad()
def init_weight_(
    weight: torch.Tensor,
    config: QuantizedEmbeddingBagConfig,
    seed: int,
    first_row: int = 0,
    first_column: int = 0,
) -> torch.Tensor:
    """Fills ``weight`` [n, c] with the initial weights of rows ``[first_row, first_row + n)`` and
    columns ``[first_column, first_column + c)`` of a full table: the config's ``init_fn``
    applied to blocks of :data:`ROW_BLOCK` rows.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8)
        >>> whole = init_weight_(torch.empty(10, 8), cfg, seed=7)
        >>> torch.equal(init_weight_(torch.empty(4, 3), cfg, seed=7, first_row=6, first_column=5),
        ...             whole[6:, 5:])
        True
    """
    _check_range(config.name, "columns", first_column, weight.shape[1], config.embedding_dim)

    def draw(block_seed: int, block_rows: int) -> torch.Tensor:
        return _init_fn_block(config, block_seed, (block_rows, config.embedding_dim))

    return _fill_by_blocks(weight, config, seed, _WEIGHT, first_row, first_column, draw)


@torch.no_grad()
def init_fallback_(
    fallback: torch.Tensor, config: QuantizedEmbeddingBagConfig, seed: int
) -> torch.Tensor:
    """Fills ``fallback`` [fallback_rows, D] with the initial rows of a table's fallback table
    (the rows new ids read, see ``QuantizedEmbeddingBagConfig``): the config's ``init_fn``
    applied to blocks of :data:`ROW_BLOCK` rows, from generators of their own.

    Example::

        >>> cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=20, embedding_dim=8,
        ...     num_subspaces=4, codebook_size=16, coded_rows=10, fallback_rows=3)
        >>> rows = init_fallback_(torch.empty(3, 8), cfg, seed=7)
        >>> torch.equal(rows, init_fallback_(torch.empty(3, 8), cfg, seed=7))
        True
        >>> bool(rows.abs().max() <= cfg.get_weight_init_max())
        True
    """
    def draw(block_seed: int, block_rows: int) -> torch.Tensor:
        return _init_fn_block(config, block_seed, (block_rows, config.embedding_dim))

    return _fill_by_blocks(fallback, config, seed, _FALLBACK, 0, 0, draw,
                           total_rows=config.fallback_rows)
