"""Fused pooled product-quantized lookup on the GPU, written in Triton.

One program pools ``BLOCK_B`` bags. For each id it reads the id's M codes (M bytes, from one
cache sector) and accumulates the addressed codewords into a [BLOCK_B, D] tile held in
registers (codewords arrive in 16-byte vector loads), ``UNROLL`` ids of every bag per loop trip;
the codebooks ([M, K, D/M] floats, 128 KiB for M=8, K=256, D=128) are read through L1/L2 and
stay on chip. The backward reads the bag's gradient tile once and scatters it, weighted, into
the codebook gradient with four-float atomic adds. Nothing of size [ids, D] is ever
materialised, unlike one ``F.embedding_bag`` per subspace.

This file imports only torch and Triton (no torchrec, no FBGEMM), so ``benchmarks/gpu_lookup.py``
can load it on a GPU machine that has neither. Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported) runs the same kernels on CPU tensors; the tests use it.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the CPU-only install: callers check TRITON_AVAILABLE
    triton = None

TRITON_AVAILABLE = triton is not None


@dataclass(frozen=True)
class LaunchConfig:
    """Bags pooled per program, warps per program and ids of each bag taken per loop trip, for
    forward and backward alike.

    The default (16 bags, 4 warps: a [16, 128] fp32 tile is 16 registers a thread; 4 ids per
    trip, so that four code loads, the ones that miss the caches, are in flight at once) is
    reasoned, not measured: no GPU has run it yet. ``benchmarks/gpu_lookup.py`` sweeps the
    alternatives.

    Example::

        >>> LaunchConfig(block_bags=32, num_warps=8, unroll=2)
        LaunchConfig(block_bags=32, num_warps=8, unroll=2)
    """

    block_bags: int = 16
    num_warps: int = 4
    unroll: int = 4

    def __post_init__(self) -> None:
        for name in ("block_bags", "num_warps", "unroll"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")


DEFAULT_LAUNCH = LaunchConfig()
# What ``benchmarks/gpu_lookup.py`` times and ``benchmarks/gpu_kernel_resources.py`` compiles.
LAUNCH_CANDIDATES = tuple(LaunchConfig(*shape) for shape in (  # bags, warps, ids per trip
    (16, 4, 1), (16, 4, 4), (16, 4, 8), (8, 2, 4), (16, 8, 4), (32, 4, 2), (32, 8, 4), (64, 8, 2)))

if TRITON_AVAILABLE:

    @triton.jit
    def _bag_block(offsets_ptr, num_bags, M: tl.constexpr, SUB: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's bags (which exist, their first id, their length) and the columns of a
        pooled row: column c is element c % SUB of subspace c // SUB's codeword."""
        bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        bag_ok = bags < num_bags
        start = tl.load(offsets_ptr + bags, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + bags + 1, mask=bag_ok, other=0) - start
        cols = tl.arange(0, BLOCK_D)
        return bags, bag_ok, start, length, cols, cols < M * SUB

    @triton.jit
    def _codeword_offsets(values_ptr, codes_ptr, bag_ok, start, length, i, cols, col_ok,
                          codebook_size, num_rows, M: tl.constexpr, SUB: tl.constexpr):
        """For the i-th id of every bag: the [bags, columns] offsets of its codewords' elements
        in the [M, K, SUB] codebooks, where they are valid, and which bags have an i-th id.
        An id outside ``[0, num_rows)`` reads nothing and adds nothing; a code >= K reads
        codeword 0 (the callers' device-side checks report both).

        The code pointers span the whole [bags, columns] tile (equal within a subspace), so the
        codes arrive in the tile's own layout. A [bags, M] load would be re-laid out through
        shared memory with two barriers per id, serialising the loads that unrolling overlaps
        (``benchmarks/gpu_kernel_resources.py`` counts the barriers)."""
        live = bag_ok & (i < length)
        ids = tl.load(values_ptr + start + i, mask=live, other=0).to(tl.int64)
        live = live & (ids >= 0) & (ids < num_rows)
        sub = cols // SUB
        tile_ok = live[:, None] & col_ok[None, :]
        codes = tl.load(codes_ptr + ids[:, None] * M + sub[None, :], mask=tile_ok, other=0)
        codes = codes.to(tl.int32)
        codes = tl.where(codes < codebook_size, codes, 0)
        where = (sub[None, :] * codebook_size + codes) * SUB + (cols % SUB)[None, :]
        return where, tile_ok, live

    @triton.jit
    def _pq_bag_forward_kernel(
        values_ptr, offsets_ptr, weights_ptr, codes_ptr, books_ptr, out_ptr,
        num_bags, codebook_size, num_rows,
        M: tl.constexpr, SUB: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
    ):
        bags, bag_ok, start, length, cols, col_ok = _bag_block(
            offsets_ptr, num_bags, M, SUB, BLOCK_B, BLOCK_D)
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        # UNROLL ids of every bag per trip: their loads are independent, so they are in flight
        # together instead of one id -> code -> codeword chain at a time.
        for first in range(0, tl.max(length, axis=0), UNROLL):
            for u in tl.static_range(UNROLL):
                where, tile_ok, live = _codeword_offsets(
                    values_ptr, codes_ptr, bag_ok, start, length, first + u, cols, col_ok,
                    codebook_size, num_rows, M, SUB)
                words = tl.load(books_ptr + where, mask=tile_ok, other=0.0)
                if HAS_WEIGHTS:
                    w = tl.load(weights_ptr + start + first + u, mask=live, other=0.0)
                    acc += words * w[:, None]
                else:
                    acc += words
        if MEAN:
            acc = acc / tl.maximum(length, 1).to(tl.float32)[:, None]
        out = out_ptr + bags.to(tl.int64)[:, None] * (M * SUB) + cols[None, :]
        tl.store(out, acc, mask=bag_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _pq_bag_backward_kernel(
        values_ptr, offsets_ptr, weights_ptr, codes_ptr, grad_out_ptr, grad_books_ptr,
        num_bags, codebook_size, num_rows,
        M: tl.constexpr, SUB: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
    ):
        bags, bag_ok, start, length, cols, col_ok = _bag_block(
            offsets_ptr, num_bags, M, SUB, BLOCK_B, BLOCK_D)
        grad = tl.load(grad_out_ptr + bags.to(tl.int64)[:, None] * (M * SUB) + cols[None, :],
                       mask=bag_ok[:, None] & col_ok[None, :], other=0.0)
        if MEAN:
            grad = grad / tl.maximum(length, 1).to(tl.float32)[:, None]
        for first in range(0, tl.max(length, axis=0), UNROLL):
            for u in tl.static_range(UNROLL):
                where, tile_ok, live = _codeword_offsets(
                    values_ptr, codes_ptr, bag_ok, start, length, first + u, cols, col_ok,
                    codebook_size, num_rows, M, SUB)
                contribution = grad
                if HAS_WEIGHTS:
                    w = tl.load(weights_ptr + start + first + u, mask=live, other=0.0)
                    contribution = grad * w[:, None]
                tl.atomic_add(grad_books_ptr + where, contribution, mask=tile_ok, sem="relaxed")


def kernel_arguments(direction: str, subspaces: int, sub_dim: int, weighted: bool, mean: bool,
                     launch: LaunchConfig) -> Tuple[Any, Dict[str, Any]]:
    """The Triton kernel of one direction (``"forward"`` or ``"backward"``) and its compile-time
    arguments, for codebooks of ``subspaces`` x K x ``sub_dim``."""
    kernel = {"forward": _pq_bag_forward_kernel, "backward": _pq_bag_backward_kernel}[direction]
    return kernel, dict(
        M=subspaces, SUB=sub_dim, HAS_WEIGHTS=weighted, MEAN=mean, BLOCK_B=launch.block_bags,
        BLOCK_D=triton.next_power_of_2(subspaces * sub_dim), UNROLL=launch.unroll,
    )


def _launch(direction: str, books_shape: torch.Size, values: torch.Tensor,
            offsets: torch.Tensor, weights: Optional[torch.Tensor], codes: torch.Tensor,
            src: torch.Tensor, dst: torch.Tensor, mean: bool, launch: LaunchConfig) -> None:
    """Runs a kernel over all bags: forward reads codebooks into the output, backward reads the
    output gradient into the codebook gradient. ``wrap_triton`` lets torch.compile and
    torch.export trace the launch."""
    num_bags = offsets.shape[0] - 1
    m, k, sub = books_shape
    kernel, constants = kernel_arguments(direction, m, sub, weights is not None, mean, launch)
    wrap_triton(kernel)[(triton.cdiv(num_bags, launch.block_bags),)](
        values, offsets, weights if weights is not None else src, codes, src, dst, num_bags, k,
        codes.shape[0], **constants, num_warps=launch.num_warps,
    )


if TRITON_AVAILABLE:

    @triton_op("torchrec_mec::pq_bag_triton_forward", mutates_args=())
    def _pq_bag_forward(codes: torch.Tensor, codebooks: torch.Tensor, values: torch.Tensor,
                        offsets: torch.Tensor, weights: Optional[torch.Tensor], mean: bool,
                        block_bags: int, num_warps: int, unroll: int) -> torch.Tensor:
        m, _, sub = codebooks.shape
        out = torch.empty(offsets.shape[0] - 1, m * sub, device=codebooks.device,
                          dtype=torch.float32)
        _launch("forward", codebooks.shape, values, offsets, weights, codes, codebooks, out,
                mean, LaunchConfig(block_bags, num_warps, unroll))
        return out

    @triton_op("torchrec_mec::pq_bag_triton_backward", mutates_args=())
    def _pq_bag_backward(grad_out: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                         values: torch.Tensor, offsets: torch.Tensor,
                         weights: Optional[torch.Tensor], mean: bool, block_bags: int,
                         num_warps: int, unroll: int) -> torch.Tensor:
        grad_books = torch.zeros(codebooks.shape, device=grad_out.device, dtype=torch.float32)
        _launch("backward", codebooks.shape, values, offsets, weights, codes, grad_out,
                grad_books, mean, LaunchConfig(block_bags, num_warps, unroll))
        return grad_books

    def _setup_context(ctx, inputs, output) -> None:
        codes, codebooks, values, offsets, weights, *static = inputs
        ctx.save_for_backward(codes, codebooks, values, offsets, weights)
        ctx.static = static

    def _backward(ctx, grad_out):
        codes, codebooks, values, offsets, weights = ctx.saved_tensors
        grad_books = torch.ops.torchrec_mec.pq_bag_triton_backward(
            grad_out.contiguous(), codes, codebooks, values, offsets, weights, *ctx.static)
        return None, grad_books, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "torchrec_mec::pq_bag_triton_forward", _backward, setup_context=_setup_context)


def pq_embedding_bag_triton(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """Pooled product-quantized lookup in one Triton kernel (and one for the codebook gradient).

    Same contract as ``torchrec_mec.ops.reference.pq_embedding_bag``: ``codes`` [N, M] uint8 or
    uint16, ``codebooks`` [M, K, D/M] float32, ``values`` int32/int64 ids (assumed in range),
    ``offsets`` [B + 1], optional ``per_sample_weights`` (``mode="sum"``), ``mode`` ``"sum"`` or
    ``"mean"``, ``launch`` the block shape of both kernels; returns [B, D], differentiable
    w.r.t. ``codebooks``. Runs as the operator ``torch.ops.torchrec_mec.pq_bag_triton_forward``
    (a ``torch.library.triton_op`` with a registered backward), so torch.compile and
    torch.export see the kernels. Ids outside the table add nothing and codes >= K read
    codeword 0: nothing is read out of bounds; callers check ids on the device first. Needs
    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before this module was imported.

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
    return torch.ops.torchrec_mec.pq_bag_triton_forward(
        codes.contiguous(), codebooks.contiguous(), values.contiguous(),
        offsets.long().contiguous(), weights, mode == "mean", launch.block_bags,
        launch.num_warps, launch.unroll)
