"""The terms of the MEC loss. Each takes optional per-row weights (popularity) and is a mean."""
from typing import Optional

import torch
import torch.nn.functional as F


def weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` [B] (or [B, ...], averaged over trailing dims) weighted by [B]."""
    per_row = values.reshape(values.shape[0], -1).mean(1)
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum()


def reconstruction_loss(
    x: torch.Tensor, q_st: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean squared error between rows ``x`` and their quantized vectors ``q_st`` [B, D]."""
    return weighted_mean((x - q_st).pow(2), weights)


def commitment_loss(
    z: torch.Tensor, q: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``||z - sg(q)||^2``: keeps the encoder output near the codewords it picks (VQ-VAE)."""
    return weighted_mean((z - q.detach()).pow(2), weights)


def usage_kl(mean_assignment: torch.Tensor) -> torch.Tensor:
    """Mean over codebooks of KL(usage || uniform) for a [M, K] usage distribution.

    Zero when every codeword is used equally (perplexity K); differentiable when the usage
    comes from soft assignments, unlike a perplexity computed from hard one-hot codes.
    """
    p = mean_assignment.clamp_min(1e-12)
    k = mean_assignment.shape[-1]
    return (mean_assignment * (p.log() + torch.log(torch.tensor(float(k))))).sum(-1).mean()


def mean_soft_assignment(
    logits: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Each codebook's (weighted) batch mean of ``softmax(logits)``: [M, B, K] -> [M, K]."""
    p = torch.softmax(logits, dim=-1)
    if weights is None:
        weights = torch.ones(p.shape[1])
    # A [B] x [M, B, K] product: its backward is an outer product, not an [M, B, K] division.
    return torch.matmul(weights / weights.sum(), p)


def usage_regularizer(logits: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL from uniform of each codebook's (weighted) batch-mean soft assignment, averaged.

    Args:
        logits (Tensor): [M, B, K] soft-assignment logits ``-||z_m - C[m, k]||^2 / tau_m`` (up
            to a per-row constant), with gradient to the encoder and the codebooks.
        weights (Optional[Tensor]): [B] row weights.
    """
    return usage_kl(mean_soft_assignment(logits, weights))


def semi_synthetic_negatives(
    codes: torch.Tensor, codebook_size: int, num_negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample negatives: each is the row's codes with ONE random subspace's code replaced.

    Each of the ``num_negatives`` negatives of each row draws its own subspace and its own
    replacement code, uniformly among the K - 1 other codewords, so it differs from the positive
    in exactly one position.

    Args:
        codes (Tensor): [B, M] long codes of the positives.
        codebook_size (int): K (>= 2).
        num_negatives (int): negatives per row.
        generator (torch.Generator): source of the random draws.

    Returns:
        LongTensor [B, num_negatives, M].

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> codes = torch.tensor([[1, 2, 3, 0]])
        >>> neg = semi_synthetic_negatives(codes, codebook_size=4, num_negatives=3, generator=g)
        >>> (neg != codes.unsqueeze(1)).sum(-1).tolist()
        [[1, 1, 1]]
    """
    b, m = codes.shape
    neg = codes.unsqueeze(1).repeat(1, num_negatives, 1)
    which = torch.randint(m, (b, num_negatives, 1), generator=generator)
    shift = torch.randint(1, codebook_size, (b, num_negatives, 1), generator=generator)
    replaced = (neg.gather(2, which) + shift) % codebook_size
    return neg.scatter_(2, which, replaced)


def contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE on cosine similarities: the positive is class 0 among 1 + n candidates.

    Args:
        anchor (Tensor): [B, D] (the encoder output z).
        positive (Tensor): [B, D] the row's quantized vector q.
        negatives (Tensor): [B, n, D] semi-synthetic negatives.
        temperature (float): divides the cosine similarities.
        weights (Optional[Tensor]): [B] row weights.
    """
    candidates = torch.cat([positive.unsqueeze(1), negatives], dim=1)  # [B, 1 + n, D]
    a = F.normalize(anchor, dim=-1).unsqueeze(1)  # [B, 1, D]
    # Divide the [B, 1 + n] dot products, not the [B, 1 + n, D] candidates, by the norms.
    norms = candidates.norm(dim=-1).clamp_min(1e-12)
    logits = (candidates * a).sum(-1) / (norms * temperature)
    target = torch.zeros(anchor.shape[0], dtype=torch.long)
    return weighted_mean(F.cross_entropy(logits, target, reduction="none"), weights)
