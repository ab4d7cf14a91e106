"""Promotion of new ids: codes for ids first seen after compression, from their fallback rows.

A compressed table with a fallback (``QuantizedEmbeddingBagConfig.coded_rows <
num_embeddings``) serves new ids from a small hashed table that trains with the model. Once a
new id has had enough traffic to learn its fallback row, :func:`promote_ids` encodes that row
with the table's codebooks (nearest codeword per subspace: the codebooks stay as they are, and
stage 2 does not run again) and gives the id those codes, in one of the table's promotion slots.
"""
from typing import Dict, Mapping

import torch

from torchrec_mec.modules.quantized_embedding_bag_collection import (
    EMPTY_SLOT,
    ProductQuantizedTable,
    QuantizedEmbeddingBagCollection,
)
from torchrec_mec.modules.quantized_embedding_configs import code_dtype
from torchrec_mec.quantize.kmeans import nearest_codewords


def assign_codes(embeddings: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Encodes rows with fixed codebooks: the nearest codeword (squared distance) per subspace.

    Args:
        embeddings: [n, D] float rows.
        codebooks: [M, K, D / M].

    Returns:
        [n, M] codes in the table's code dtype (uint8 for K <= 256, else uint16).

    Example::

        >>> books = torch.tensor([[[0.0], [1.0]], [[0.0], [10.0]]])  # M=2, K=2, d=1
        >>> assign_codes(torch.tensor([[0.9, 2.0], [0.1, 9.0]]), books).tolist()
        [[1, 0], [0, 1]]
    """
    with torch.no_grad():
        codes = nearest_codewords(embeddings.detach().float().cpu(), codebooks.detach().float().cpu())
    return codes.to(code_dtype(codebooks.shape[1]))


def _table(qebc: QuantizedEmbeddingBagCollection, table: str) -> ProductQuantizedTable:
    module = qebc.embedding_bags[table] if table in qebc.embedding_bags else None
    if not isinstance(module, ProductQuantizedTable) or module.fallback is None:
        raise ValueError(f"table {table!r} is not a compressed table with a fallback table")
    return module


def promote_ids(qebc: QuantizedEmbeddingBagCollection, table: str, ids: torch.Tensor) -> torch.Tensor:
    """Gives new ids of ``table`` codes of their own: each one's fallback row (as trained so far)
    encoded with the table's codebooks (:func:`assign_codes`). Afterwards the ids read their codes
    (``embedding = decoded codes``) and leave their fallback rows to the other new ids.

    Args:
        qebc: the collection (unsharded).
        table: a compressed table with a fallback.
        ids: new ids (``[coded_rows, num_embeddings)``), not yet promoted.

    Returns:
        their codes, [len(ids), M].

    Raises:
        ValueError: (naming the table) no such table or no fallback, an id that is not new or
            already promoted, or not enough free promotion slots.

    Example::

        >>> from torchrec_mec import QuantizedEmbeddingBagConfig
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=12, embedding_dim=4, feature_names=["f"], num_subspaces=2,
        ...     codebook_size=4, coded_rows=10, fallback_rows=1, promotion_slots=2)])
        >>> table = qebc.embedding_bags["t"]
        >>> codes = promote_ids(qebc, "t", torch.tensor([11]))
        >>> table.promoted_ids[0].item(), torch.equal(table.embeddings(torch.tensor([11])),
        ...                                           table.decode(torch.tensor([10])))
        (11, True)
    """
    module = _table(qebc, table)
    ids = ids.to(torch.int64).reshape(-1)
    with torch.no_grad():
        rows = module.embeddings(ids)
    codes = assign_codes(rows, module.codebooks)
    module.promote(ids, codes)
    return codes


def promote_frequent(
    qebc: QuantizedEmbeddingBagCollection, counts: Mapping[str, torch.Tensor], min_count: int
) -> Dict[str, torch.Tensor]:
    """Promotes, in every table with a fallback, the new ids seen at least ``min_count`` times,
    most frequent first (ties: smaller id first), as long as free promotion slots last.

    Args:
        qebc: the collection (unsharded).
        counts: per table, occurrences of each id ``[num_embeddings]`` in the traffic since
            compression (tables without an entry promote nothing).
        min_count: the least traffic an id needs (>= 1).

    Returns:
        per table with a fallback, the ids promoted now (most frequent first).

    Example::

        >>> from torchrec_mec import QuantizedEmbeddingBagConfig
        >>> qebc = QuantizedEmbeddingBagCollection([QuantizedEmbeddingBagConfig(name="t",
        ...     num_embeddings=14, embedding_dim=4, feature_names=["f"], num_subspaces=2,
        ...     codebook_size=4, coded_rows=10, fallback_rows=2, promotion_slots=1)])
        >>> counts = torch.tensor([50] * 10 + [3, 9, 0, 7])
        >>> promote_frequent(qebc, {"t": counts}, min_count=5)["t"].tolist()  # one free slot
        [11]
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    promoted: Dict[str, torch.Tensor] = {}
    for name, module in qebc.embedding_bags.items():
        if not isinstance(module, ProductQuantizedTable) or module.fallback is None:
            continue
        assert module.promoted_ids is not None
        count = counts.get(name)
        if count is None:
            promoted[name] = torch.empty(0, dtype=torch.int64)
            continue
        if tuple(count.shape) != (module.num_embeddings,):
            raise ValueError(f"table {name!r}: counts must be [{module.num_embeddings}], got "
                             f"{tuple(count.shape)}")
        new = count[module.coded_rows:].to(torch.int64).clone()
        done = module.promoted_ids[module.promoted_ids != EMPTY_SLOT].cpu() - module.coded_rows
        new[done] = 0
        free = module.promoted_ids.numel() - done.numel()
        # Stable sort of -count: most frequent first, smaller ids first among equals.
        order = torch.sort(-new, stable=True).indices
        chosen = order[new[order] >= min_count][:free]
        ids = chosen + module.coded_rows
        if ids.numel():
            promote_ids(qebc, name, ids)
        promoted[name] = ids
    return promoted
