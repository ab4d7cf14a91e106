"""Chunked nearest-codeword search, weighted row sampling and k-means(++) for product quantizers.

All functions are deterministic for a given ``torch.Generator`` and torch thread count.
"""
from typing import Optional, Tuple

import torch

# Floats of distance matrix per chunk of the encoding loops (64 MiB): memory O(chunk x K).
SEARCH_BUDGET = 1 << 24
# Floats of distance matrix per block of the search itself (1 MiB): small enough to stay in
# cache between the matrix product that writes it and the reduction that reads it, which
# made the search 2-4x faster than blocks of SEARCH_BUDGET (benchmarks/quantizer.py --search).
CACHE_BUDGET = 1 << 18


def search_chunk_rows(num_subspaces: int, codebook_size: int) -> int:
    """Rows per chunk so that one chunk's [M, rows, K] distance matrix fits ``SEARCH_BUDGET``."""
    return max(1, SEARCH_BUDGET // (num_subspaces * codebook_size))


def nearest_codewords(
    x: torch.Tensor, codebooks: torch.Tensor, chunk_rows: Optional[int] = None
) -> torch.Tensor:
    """Index of the nearest codeword of every sub-vector, computed block by block.

    Never builds an N x K matrix: memory is O(chunk_rows x M x K).

    Args:
        x (Tensor): [N, M * d] float rows.
        codebooks (Tensor): [M, K, d] codewords.
        chunk_rows (Optional[int]): rows per block; default: a cache-sized block
            (``CACHE_BUDGET`` floats of distances).

    Returns:
        LongTensor [N, M]: ``codes[i, m] = argmin_k ||x[i, m*d:(m+1)*d] - codebooks[m, k]||``.

    Example::

        >>> cb = torch.tensor([[[0.0], [1.0]], [[0.0], [10.0]]])  # M=2, K=2, d=1
        >>> nearest_codewords(torch.tensor([[0.9, 2.0], [0.1, 9.0]]), cb).tolist()
        [[1, 0], [0, 1]]
    """
    num_subspaces, codebook_size, sub_dim = codebooks.shape
    n = x.shape[0]
    if x.dim() != 2 or x.shape[1] != num_subspaces * sub_dim:
        raise ValueError(f"x must be [N, {num_subspaces * sub_dim}], got {list(x.shape)}")
    # At least 128 rows a block: fewer make the per-call overhead count (large M x K).
    rows = chunk_rows or max(128, CACHE_BUDGET // (num_subspaces * codebook_size))
    cb_t = codebooks.transpose(1, 2)  # [M, d, K]
    cb_sq = codebooks.pow(2).sum(-1).unsqueeze(1)  # [M, 1, K]
    out = torch.empty(n, num_subspaces, dtype=torch.long)
    for start in range(0, n, rows):
        xs = x[start : start + rows].float().view(-1, num_subspaces, sub_dim).transpose(0, 1)
        # ||x||^2 is the same for every codeword, so it is left out of the argmin.
        dist = torch.baddbmm(cb_sq, xs, cb_t, alpha=-2.0)  # [M, rows, K]
        # min's indices: the first minimum, like argmin, in about half its time on CPU.
        out[start : start + rows] = dist.min(-1).indices.T
    return out


def weighted_sample(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` row indices drawn with replacement with probability proportional to ``weights``.

    Unlike ``torch.multinomial`` it has no 2^24-category limit (tables have more rows), and
    rows of weight 0 are never drawn.
    """
    cdf = torch.cumsum(weights.double(), 0)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.numel() - 1)


def weighted_rows(weights: torch.Tensor, size: int, generator: torch.Generator
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows standing for a weighted set in at most ``size`` points: every row of positive
    weight with its weight if there are at most ``size`` of them; otherwise ``size`` draws by
    weight (with replacement), each distinct row weighted by how often it was drawn.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> weighted_rows(torch.tensor([0.0, 2.0, 5.0]), 8, g)
        (tensor([1, 2]), tensor([2., 5.]))
        >>> rows, times = weighted_rows(torch.tensor([0.0, 2.0, 5.0]), 1, g)
        >>> rows.numel(), float(times.sum())
        (1, 1.0)
    """
    rows = weights.nonzero().squeeze(1)
    if rows.numel() <= size:
        return rows, weights[rows]
    drawn, times = torch.unique(weighted_sample(weights, size, generator), return_counts=True)
    return drawn, times.to(weights.dtype)


def kmeans(
    x: torch.Tensor,
    codebook_size: int,
    num_subspaces: int,
    iters: int,
    generator: torch.Generator,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-subspace (weighted) k-means: k-means++ seeding, then ``iters`` Lloyd iterations.

    With ``weights``, point i counts ``weights[i]`` times: k-means++ draws in proportion to
    weight x squared distance, and each centroid is the weighted mean of its points. The same
    as plain k-means on a sample where point i repeats ``weights[i]`` times, without the copies.

    Args:
        x (Tensor): [n, M * d] float32 sample rows.
        codebook_size (int): K.
        num_subspaces (int): M.
        iters (int): Lloyd iterations (0: k-means++ seeding only).
        generator (torch.Generator): source of all random draws.
        weights (Optional[Tensor]): [n] point weights >= 0, not all 0; default all 1.

    Returns:
        (codebooks [M, K, d], distortion [M]): centroids and the (weighted) mean squared
        distance of each subspace's sample sub-vectors to their nearest centroid.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
        >>> cb, _ = kmeans(pts, codebook_size=2, num_subspaces=1, iters=5, generator=g)
        >>> sorted(round(v, 2) for v in cb[0, :, 0].tolist())
        [0.05, 5.05]
    """
    n, dim = x.shape
    sub_dim = dim // num_subspaces
    subs = x.view(n, num_subspaces, sub_dim)
    w = torch.ones(n) if weights is None else weights.float()
    if w.shape != (n,) or not bool((w >= 0).all()) or not float(w.sum()) > 0:
        raise ValueError(f"kmeans: weights must be [{n}], >= 0 and not all 0")
    codebooks = _kmeans_pp(subs, w, codebook_size, generator)
    offsets = (torch.arange(num_subspaces) * codebook_size).unsqueeze(0)  # [1, M]
    weighted = (subs * w.view(n, 1, 1)).reshape(-1, sub_dim)
    for _ in range(iters):
        # All subspaces' sums in one index_add over the [M * K] flattened codewords.
        flat = (nearest_codewords(x, codebooks) + offsets).view(-1)
        sums = torch.zeros(num_subspaces * codebook_size, sub_dim).index_add_(0, flat, weighted)
        mass = torch.zeros(num_subspaces * codebook_size).index_add_(
            0, flat, w.repeat_interleave(num_subspaces))
        used = mass > 0
        flat_books = codebooks.view(-1, sub_dim)
        flat_books[used] = sums[used] / mass[used].unsqueeze(1)
        for m in range(num_subspaces):
            empty = (~used.view(num_subspaces, codebook_size)[m]).nonzero().squeeze(1)
            if empty.numel():
                pick = weighted_sample(w, empty.numel(), generator)
                codebooks[m, empty] = subs[pick, m]
    codes = nearest_codewords(x, codebooks)
    recon = codebooks[torch.arange(num_subspaces), codes]  # [n, M, d]
    distortion = (w.unsqueeze(1) * (subs - recon).pow(2).sum(-1)).sum(0) / w.sum()
    return codebooks, distortion


def _kmeans_pp(subs: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator
               ) -> torch.Tensor:
    """Weighted k-means++ seeding of ``k`` centroids in each subspace of ``subs`` [n, M, d],
    all subspaces at once (one draw per subspace per step): [M, k, d]."""
    n, m_all, _ = subs.shape
    subs_t = subs.transpose(0, 1)  # [M, n, d]
    centers = torch.empty(m_all, k, subs.shape[2])
    rows = torch.arange(m_all)
    first = weighted_sample(w, m_all, generator)
    centers[:, 0] = subs_t[rows, first]
    d2 = (subs_t - centers[:, :1]).pow(2).sum(-1)  # [M, n]
    w64 = w.double().unsqueeze(0)
    for j in range(1, k):
        p = d2.double() * w64
        # a subspace where every weighted point already is a centroid: any weighted point
        p = torch.where(p.amax(1, keepdim=True) > 0, p, w64.expand_as(p))
        cdf = torch.cumsum(p, 1)
        u = torch.rand(m_all, 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1).squeeze(1)
        centers[:, j] = subs_t[rows, idx]
        d2 = torch.minimum(d2, (subs_t - centers[:, j:j + 1]).pow(2).sum(-1))
    return centers
