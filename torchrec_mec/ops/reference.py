"""Plain-PyTorch pooled product-quantized lookups (with or without a fallback table for new ids):
the path where no compiled kernel applies, and the tests' yardstick."""
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def pq_embedding_bag(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
) -> torch.Tensor:
    """Pooled lookup of a product-quantized table, one ``F.embedding_bag`` per subspace.

    Row ``i`` of the table is ``concat_m codebooks[m, codes[i, m]]``; the pooled output of a bag
    is therefore the concatenation over ``m`` of the pooled codewords of subspace ``m``.

    Args:
        codes: [N, M] unsigned integer codes.
        codebooks: [M, K, D / M].
        values: ids (any integer dtype), concatenated bags.
        offsets: [B + 1] bag boundaries (``include_last_offset`` layout).
        per_sample_weights: optional weights, one per id (``mode="sum"`` only).
        mode: ``"sum"`` or ``"mean"``.

    Returns:
        [B, D] pooled embeddings, differentiable w.r.t. ``codebooks``.

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> books = torch.arange(8.0).view(2, 2, 2)
        >>> pq_embedding_bag(codes, books, torch.tensor([0, 1]), torch.tensor([0, 2])).tolist()
        [[2.0, 4.0, 10.0, 12.0]]
    """
    gathered = codes[values.long()].long()  # [n, M]
    return torch.cat(
        [
            F.embedding_bag(
                gathered[:, m],
                codebooks[m],
                offsets.long(),
                mode=mode,
                per_sample_weights=per_sample_weights,
                include_last_offset=True,
            )
            for m in range(codebooks.shape[0])
        ],
        dim=1,
    )


def fallback_embedding_bag(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    fallback: torch.Tensor,
    promoted_ids: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    pq_lookup: Callable[..., torch.Tensor] = pq_embedding_bag,
) -> torch.Tensor:
    """Pooled lookup of a product-quantized table with a fallback table for new ids.

    With ``C = len(codes) - len(promoted_ids)`` coded ids: id ``i < C`` reads
    ``codes[i]``; a new id found in ``promoted_ids`` (sorted) at slot ``s`` reads
    ``codes[C + s]``; any other new id reads ``fallback[(i - C) % len(fallback)]``. Computed as
    two weighted SUM lookups over the same bags (the codes part with the fallback ids' weights
    zeroed, and the fallback part), so shapes never depend on the ids (``torch.compile``).

    Args:
        codes: [C + S, M] codes of the coded ids, then of the promoted ones.
        codebooks: [M, K, D / M].
        fallback: [F, D] rows of new ids.
        promoted_ids: [S] int64, promoted ids in increasing order, then unused slots
            (``torch.iinfo(torch.int64).max``).
        values, offsets, per_sample_weights, mode: as for :func:`pq_embedding_bag`.
        pq_lookup: the product-quantized lookup to use (:func:`pq_embedding_bag` or a kernel
            with its signature).

    Returns:
        [B, D] pooled embeddings, differentiable w.r.t. ``codebooks`` and ``fallback``.

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)  # id 0 coded, slot 1
        >>> books = torch.arange(8.0).view(2, 2, 2)
        >>> fallback = torch.full((1, 4), 100.0)
        >>> empty = torch.tensor([torch.iinfo(torch.int64).max])
        >>> fallback_embedding_bag(codes, books, fallback, empty, torch.tensor([0, 3]),
        ...                        torch.tensor([0, 2])).tolist()
        [[100.0, 101.0, 106.0, 107.0]]
        >>> fallback_embedding_bag(codes, books, fallback, torch.tensor([3]), torch.tensor([0, 3]),
        ...                        torch.tensor([0, 2])).tolist()
        [[2.0, 4.0, 10.0, 12.0]]
    """
    values = values.long()
    offsets = offsets.long()
    slots = promoted_ids.numel()
    coded = codes.shape[0] - slots
    new = values >= coded
    if slots:
        slot = torch.searchsorted(promoted_ids, values).clamp(max=slots - 1)
        promoted = new & (promoted_ids[slot] == values)
        code_rows = torch.where(promoted, coded + slot, torch.where(new, 0, values))
    else:
        promoted = torch.zeros_like(new)
        code_rows = torch.where(new, 0, values)
    in_fallback = new & ~promoted
    fallback_rows = torch.where(in_fallback, (values - coded) % fallback.shape[0], 0)
    lengths = offsets[1:] - offsets[:-1]
    if mode == "mean":
        weights = torch.repeat_interleave(1.0 / lengths.clamp(min=1).to(fallback.dtype), lengths,
                                          output_size=values.numel())
    elif per_sample_weights is not None:
        weights = per_sample_weights.to(fallback.dtype)
    else:
        weights = torch.ones(values.numel(), dtype=fallback.dtype, device=values.device)
    zero = torch.zeros_like(weights)
    pooled_codes = pq_lookup(codes, codebooks, code_rows, offsets,
                             torch.where(in_fallback, zero, weights), "sum")
    pooled_fallback = F.embedding_bag(fallback_rows, fallback, offsets, mode="sum",
                                      per_sample_weights=torch.where(in_fallback, weights, zero),
                                      include_last_offset=True)
    return pooled_codes + pooled_fallback
