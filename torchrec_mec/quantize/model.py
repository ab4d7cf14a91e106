"""The MEC quantizer: an identity-initialised encoder and M codebooks in embedding space."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_mec.quantize.kmeans import (
    kmeans,
    nearest_codewords,
    search_chunk_rows,
    weighted_sample,
)


class QuantizerOutput(NamedTuple):
    z: torch.Tensor  # [B, D] encoder output
    codes: torch.Tensor  # [B, M] long, nearest codeword of each sub-vector of z
    q: torch.Tensor  # [B, D] concatenated codewords (gradient to the codebooks)


class MECQuantizer(nn.Module):
    """Encoder ``e -> z`` plus M codebooks; row i is quantized to ``concat_m C[m, codes[i, m]]``.

    The module works on standardised rows ``x = (e - mean) / scale`` (``mean`` [D], ``scale`` a
    scalar, both from the initialisation sample), so learning rate and temperatures do not
    depend on the table's scale. Being an affine map applied the same way to every subspace,
    this is undone exactly in :meth:`export_codebooks`: the exported codebooks live in the
    table's own embedding space, and ``concat_m codebooks[m, codes[i, m]]`` approximates row i.

    The encoder is residual and starts at the identity (its last layer is zero), so an untrained
    quantizer is the plain product quantizer of its codebooks.

    Args:
        dim (int): D, row width; divisible by ``num_subspaces``.
        num_subspaces (int): M.
        codebook_size (int): K.
        encoder (str): ``"mlp"`` (x + W2 gelu(W1 x + b1) + b2, hidden width D), ``"linear"``
            (x + W x + b) or ``"none"`` (z = x).
        generator (Optional[torch.Generator]): seeds the encoder's first layer.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> table = torch.randn(1000, 8, generator=g)
        >>> mq = MECQuantizer(dim=8, num_subspaces=2, codebook_size=16, generator=g)
        >>> mq.init_from_sample(table, kmeans_iters=5, generator=g)
        >>> codes = mq.compute_codes(table)
        >>> codes.shape, mq.decode(codes).shape
        (torch.Size([1000, 2]), torch.Size([1000, 8]))
    """

    mean: torch.Tensor  # buffers
    scale: torch.Tensor
    distortion: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_subspaces: int,
        codebook_size: int,
        encoder: str = "mlp",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if dim % num_subspaces:
            raise ValueError(f"dim {dim} is not divisible by num_subspaces {num_subspaces}")
        self.dim = dim
        self.num_subspaces = num_subspaces
        self.codebook_size = codebook_size
        self.sub_dim = dim // num_subspaces
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        # Mean squared quantization error per subspace at initialisation: the unit of the
        # soft-assignment temperature.
        self.register_buffer("distortion", torch.ones(num_subspaces))
        self.codebooks = nn.Parameter(torch.zeros(num_subspaces, codebook_size, self.sub_dim))
        self.encoder: Optional[nn.Module]
        if encoder == "none":
            self.encoder = None
        elif encoder == "linear":
            self.encoder = nn.Linear(dim, dim)
            nn.init.zeros_(self.encoder.weight)
            nn.init.zeros_(self.encoder.bias)
        elif encoder == "mlp":
            first, last = nn.Linear(dim, dim), nn.Linear(dim, dim)
            bound = dim**-0.5
            with torch.no_grad():
                first.weight.uniform_(-bound, bound, generator=generator)
                first.bias.uniform_(-bound, bound, generator=generator)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.encoder = nn.Sequential(first, nn.GELU(), last)
        else:
            raise ValueError(f"unknown encoder {encoder!r}")

    @torch.no_grad()
    def init_from_sample(
        self,
        sample: torch.Tensor,
        kmeans_iters: int,
        generator: torch.Generator,
        use_kmeans: bool = True,
        weights: Optional[torch.Tensor] = None,
    ) -> None:
        """Sets the standardisation from ``sample`` [n, D] (rows of the table, in embedding
        space, with optional weights [n]) and initialises the codebooks on it: by weighted
        k-means++ and ``kmeans_iters`` Lloyd iterations, or (``use_kmeans=False``) by sample rows
        drawn by weight."""
        sample = sample.float()
        w = torch.ones(sample.shape[0]) if weights is None else weights.float()
        p = (w / w.sum()).unsqueeze(1)
        self.mean.copy_((p * sample).sum(0))
        rms = (p * (sample - self.mean).pow(2)).sum(0).mean().sqrt()
        self.scale.copy_(torch.where(rms > 0, rms, torch.ones(())))
        x = self.standardize(sample)
        if use_kmeans:
            codebooks, distortion = kmeans(
                x, self.codebook_size, self.num_subspaces, kmeans_iters, generator, w
            )
        else:
            pick = weighted_sample(w, self.num_subspaces * self.codebook_size, generator)
            subs = x.view(-1, self.num_subspaces, self.sub_dim)
            pick = pick.view(self.num_subspaces, self.codebook_size)
            codebooks = torch.stack([subs[pick[m], m] for m in range(self.num_subspaces)])
            codes = nearest_codewords(x, codebooks)
            recon = codebooks[torch.arange(self.num_subspaces), codes]
            distortion = ((subs - recon).pow(2).sum(-1) * p).sum(0)
        self.codebooks.copy_(codebooks)
        # A noise-free sample can have zero distortion; keep the temperature unit positive.
        floor = 1e-4 * self.sub_dim
        self.distortion.copy_(distortion.clamp_min(floor))

    def standardize(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.float() - self.mean) / self.scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z for standardised rows x [B, D]."""
        return x if self.encoder is None else x + self.encoder(x)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Concatenated standardised codewords for codes [..., M] -> [..., D] (with gradient)."""
        # An embedding lookup in the [M * K, d] view, not codebooks[arange(M), codes]: the
        # backward of advanced indexing on CPU sums with atomic adds across threads, so its
        # float sums (and the whole training run) changed from call to call with 2 threads;
        # embedding's backward adds each codeword's rows in a fixed order at any thread count.
        flat = self.codebooks.view(self.num_subspaces * self.codebook_size, self.sub_dim)
        offsets = torch.arange(self.num_subspaces, device=codes.device) * self.codebook_size
        return F.embedding(codes + offsets, flat).flatten(-2)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Encodes standardised rows x [B, D] and quantizes z to its nearest codewords."""
        z = self.encode(x)
        codes = nearest_codewords(z.detach(), self.codebooks.detach())
        return QuantizerOutput(z=z, codes=codes, q=self.lookup(codes))

    def assignment_logits(self, z: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Soft-assignment logits [M, B, K]: ``-||z_m - C[m, k]||^2 / temperature[m]`` up to a
        per-row constant (which softmax does not see), with gradient to z and the codebooks."""
        zs = z.view(-1, self.num_subspaces, self.sub_dim).transpose(0, 1)  # [M, B, d]
        # One fused baddbmm, the temperature folded into the small operands, so the [M, B, K]
        # tensor sees no extra elementwise passes.
        inv = (1.0 / temperature).view(-1, 1, 1)
        cb_sq = self.codebooks.pow(2).sum(-1).unsqueeze(1)  # [M, 1, K]
        return torch.baddbmm(-cb_sq * inv, zs * (2 * inv), self.codebooks.transpose(1, 2))

    @torch.no_grad()
    def compute_codes(self, rows: torch.Tensor, chunk_rows: Optional[int] = None) -> torch.Tensor:
        """Long codes [N, M] of embedding-space rows [N, D], chunk by chunk (O(chunk x K))."""
        rows_per_chunk = chunk_rows or search_chunk_rows(self.num_subspaces, self.codebook_size)
        out = torch.empty(rows.shape[0], self.num_subspaces, dtype=torch.long)
        for start in range(0, rows.shape[0], rows_per_chunk):
            z = self.encode(self.standardize(rows[start : start + rows_per_chunk]))
            out[start : start + rows_per_chunk] = nearest_codewords(z, self.codebooks)
        return out

    @torch.no_grad()
    def export_codebooks(self) -> torch.Tensor:
        """Codebooks [M, K, d] in the table's embedding space (float32, ready for a QEBC)."""
        mean = self.mean.view(self.num_subspaces, 1, self.sub_dim)
        return (self.codebooks * self.scale + mean).float().contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Embedding-space rows [N, D] for codes [N, M] (any integer dtype)."""
        cb = self.export_codebooks()
        return cb[torch.arange(self.num_subspaces), codes.long()].flatten(-2)
