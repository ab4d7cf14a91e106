"""Fused pooled product-quantized lookup on the GPU, written in Triton.

One program pools ``BLOCK_B`` bags. For each id it reads the id's M codes once (M bytes) and
accumulates the addressed codewords into a [BLOCK_B, D] tile held in registers; the codebooks
([M, K, D/M] floats, 128 KiB for M=8, K=256, D=128) are read through L1/L2 and stay on chip. The
backward reads the bag's gradient tile once and scatters it, weighted, into the codebook gradient
with atomic adds. Nothing of size [ids, D] is ever materialised, unlike one ``F.embedding_bag``
per subspace.

This file imports only torch and Triton (no torchrec, no FBGEMM), so ``benchmarks/gpu_lookup.py``
can load it on a GPU machine that has neither. Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported) runs the same kernels on CPU tensors; the tests use it.
"""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: callers check TRITON_AVAILABLE
    triton = None

TRITON_AVAILABLE = triton is not None
# Bags per program, and warps per program: a [16, 128] fp32 tile is 16 registers a thread.
BLOCK_BAGS = 16
NUM_WARPS = 4

if TRITON_AVAILABLE:

    @triton.jit
    def _pq_bag_forward_kernel(
        values_ptr, offsets_ptr, weights_ptr, codes_ptr, books_ptr, out_ptr,
        num_bags, codebook_size,
        M: tl.constexpr, SUB: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        bag_ok = bags < num_bags
        start = tl.load(offsets_ptr + bags, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + bags + 1, mask=bag_ok, other=0) - start
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < M * SUB
        # Column c of a row is element c % SUB of subspace c // SUB's codeword.
        sub = (cols // SUB).to(tl.int64)
        within = (cols % SUB).to(tl.int64)
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        for i in range(0, tl.max(length, axis=0)):
            live = bag_ok & (i < length)
            ids = tl.load(values_ptr + start + i, mask=live, other=0).to(tl.int64)
            tile_ok = live[:, None] & col_ok[None, :]
            codes = tl.load(codes_ptr + ids[:, None] * M + sub[None, :], mask=tile_ok, other=0)
            words = tl.load(
                books_ptr + (sub[None, :] * codebook_size + codes.to(tl.int64)) * SUB
                + within[None, :],
                mask=tile_ok, other=0.0,
            )
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + start + i, mask=live, other=0.0)
                acc += words * w[:, None]
            else:
                acc += words
        if MEAN:
            acc = acc / tl.maximum(length, 1).to(tl.float32)[:, None]
        out_ok = bag_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + bags.to(tl.int64)[:, None] * (M * SUB) + cols[None, :], acc, mask=out_ok)

    @triton.jit
    def _pq_bag_backward_kernel(
        values_ptr, offsets_ptr, weights_ptr, codes_ptr, grad_out_ptr, grad_books_ptr,
        num_bags, codebook_size,
        M: tl.constexpr, SUB: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        bag_ok = bags < num_bags
        start = tl.load(offsets_ptr + bags, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + bags + 1, mask=bag_ok, other=0) - start
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < M * SUB
        sub = (cols // SUB).to(tl.int64)
        within = (cols % SUB).to(tl.int64)
        grad = tl.load(
            grad_out_ptr + bags.to(tl.int64)[:, None] * (M * SUB) + cols[None, :],
            mask=bag_ok[:, None] & col_ok[None, :], other=0.0,
        )
        if MEAN:
            grad = grad / tl.maximum(length, 1).to(tl.float32)[:, None]
        for i in range(0, tl.max(length, axis=0)):
            live = bag_ok & (i < length)
            ids = tl.load(values_ptr + start + i, mask=live, other=0).to(tl.int64)
            tile_ok = live[:, None] & col_ok[None, :]
            codes = tl.load(codes_ptr + ids[:, None] * M + sub[None, :], mask=tile_ok, other=0)
            contribution = grad
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + start + i, mask=live, other=0.0)
                contribution = grad * w[:, None]
            tl.atomic_add(
                grad_books_ptr + (sub[None, :] * codebook_size + codes.to(tl.int64)) * SUB
                + within[None, :],
                contribution, mask=tile_ok, sem="relaxed",
            )


def _launch(kernel, books_shape: torch.Size, values: torch.Tensor, offsets: torch.Tensor,
            weights: Optional[torch.Tensor], codes: torch.Tensor, src: torch.Tensor,
            dst: torch.Tensor, mean: bool) -> None:
    """Runs a kernel over all bags: forward reads codebooks into the output, backward reads the
    output gradient into the codebook gradient."""
    num_bags = offsets.numel() - 1
    m, k, sub = books_shape
    grid = (triton.cdiv(num_bags, BLOCK_BAGS),)
    kernel[grid](
        values, offsets, weights if weights is not None else src, codes, src, dst,
        num_bags, k, M=m, SUB=sub, HAS_WEIGHTS=weights is not None, MEAN=mean,
        BLOCK_B=BLOCK_BAGS, BLOCK_D=triton.next_power_of_2(m * sub), num_warps=NUM_WARPS,
    )


class _PQBagTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, codebooks, values, offsets, weights, mean):  # type: ignore[override]
        m, _, sub = codebooks.shape
        out = torch.empty(offsets.numel() - 1, m * sub, device=codebooks.device,
                          dtype=torch.float32)
        _launch(_pq_bag_forward_kernel, codebooks.shape, values, offsets, weights, codes,
                codebooks, out, mean)
        ctx.save_for_backward(codes, values, offsets, weights)
        ctx.books_shape, ctx.mean = codebooks.shape, mean
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        codes, values, offsets, weights = ctx.saved_tensors
        grad_books = torch.zeros(ctx.books_shape, device=grad_out.device, dtype=torch.float32)
        _launch(_pq_bag_backward_kernel, ctx.books_shape, values, offsets, weights, codes,
                grad_out.contiguous(), grad_books, ctx.mean)
        return None, grad_books, None, None, None, None


def pq_embedding_bag_triton(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
) -> torch.Tensor:
    """Pooled product-quantized lookup in one Triton kernel (and one for the codebook gradient).

    Same contract as ``torchrec_mec.ops.reference.pq_embedding_bag``: ``codes`` [N, M] uint8 or
    uint16, ``codebooks`` [M, K, D/M] float32, ``values`` int32/int64 ids (assumed in range),
    ``offsets`` [B + 1], optional ``per_sample_weights`` (``mode="sum"``), ``mode`` ``"sum"`` or
    ``"mean"``; returns [B, D], differentiable w.r.t. ``codebooks``. Needs CUDA tensors, or CPU
    tensors with ``TRITON_INTERPRET=1`` set before this module was imported.

    Example (on a GPU)::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8, device="cuda")  # doctest: +SKIP
        >>> books = torch.arange(8.0, device="cuda").view(2, 2, 2)  # doctest: +SKIP
        >>> pq_embedding_bag_triton(codes, books, torch.tensor([0, 1], device="cuda"),
        ...     torch.tensor([0, 2], device="cuda")).tolist()  # doctest: +SKIP
        [[2.0, 4.0, 10.0, 12.0]]
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("pq_embedding_bag_triton needs Triton (pip install triton)")
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    if per_sample_weights is not None and mode != "sum":
        raise ValueError("per_sample_weights need mode='sum' (as in F.embedding_bag)")
    weights = None if per_sample_weights is None else per_sample_weights.float().contiguous()
    return _PQBagTriton.apply(codes.contiguous(), codebooks.contiguous(), values.contiguous(),
                              offsets.long().contiguous(), weights, mode == "mean")
