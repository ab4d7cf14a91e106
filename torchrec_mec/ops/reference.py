"""Plain-PyTorch pooled product-quantized lookup: the fallback path and the tests' yardstick."""
from typing import Optional

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
