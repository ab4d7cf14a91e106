"""The fast pooled lookups and their dispatch: compiled CPU operator, Triton GPU kernel, fallbacks.

* CPU: ``torch.ops.torchrec_mec.pooled_lookup_forward`` / ``pooled_lookup_backward``
  (``csrc/pq_lookup.cpp``, built into ``torchrec_mec._C`` by the package install) pool every
  feature of a collection, compressed or full, in one call each way. When the library is
  absent, :func:`cpu_operator_available` says so once with a warning and callers take the
  FBGEMM / pure-PyTorch paths.
* CUDA: ``triton_lookup.pq_embedding_bag_triton``, one table at a time.
* Anything else: ``reference.pq_embedding_bag`` (plain PyTorch).
"""
import importlib
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_mec.ops import triton_lookup
from torchrec_mec.ops.reference import pq_embedding_bag

try:
    importlib.import_module("torchrec_mec._C")  # registers torch.ops.torchrec_mec.*
    _CPU_OPERATOR_ERROR: Optional[str] = None
except ImportError as error:
    _CPU_OPERATOR_ERROR = str(error)
_warned = False


def cpu_operator_available() -> bool:
    """Whether the compiled CPU lookup operator is loaded; warns once (per process) if it is not.

    Example::

        >>> isinstance(cpu_operator_available(), bool)
        True
    """
    global _warned
    if _CPU_OPERATOR_ERROR is not None and not _warned:
        _warned = True
        warnings.warn(
            "torchrec_mec: the compiled CPU lookup operator (torchrec_mec._C) is not available "
            f"({_CPU_OPERATOR_ERROR}); falling back to the slower FBGEMM / pure-PyTorch lookups. "
            "Build it with `pip install --no-deps --no-build-isolation -e .` (needs a C++ "
            "compiler and torch installed first).",
            RuntimeWarning,
            stacklevel=2,
        )
    return _CPU_OPERATOR_ERROR is None


class _FusedPooledLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, values, offsets, weights, codes, feature_tables, feature_pooling, *params
    ):
        # The backward reads the codes the forward gathered ([M, ids] per feature, as stored:
        # one byte or two per code), so only keep them when a gradient is wanted.
        save = any(ctx.needs_input_grad[6:])
        pooled, saved, status = torch.ops.torchrec_mec.pooled_lookup_forward(
            values, offsets, weights, codes, list(params), feature_tables, feature_pooling, save
        )
        ctx.mark_non_differentiable(status)
        ctx.save_for_backward(values, offsets, weights, saved)
        ctx.lookup_args = (codes, params, feature_tables, feature_pooling)
        return pooled, status

    @staticmethod
    def backward(ctx, grad_pooled, _grad_status):  # type: ignore[override]
        values, offsets, weights, saved = ctx.saved_tensors
        codes, params, feature_tables, feature_pooling = ctx.lookup_args
        grads = torch.ops.torchrec_mec.pooled_lookup_backward(
            grad_pooled.contiguous(), values, offsets, weights, saved, codes, list(params),
            feature_tables, feature_pooling,
        )
        return (None,) * 6 + tuple(grads)


def fused_pooled_lookup(
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    codes: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    feature_tables: Sequence[int],
    feature_pooling: Sequence[int],
) -> Tuple[torch.Tensor, List[int]]:
    """Pools every feature of a collection in one call of the compiled CPU operator.

    Args:
        values: int32/int64 ids of all features, feature after feature (a KJT's ``values()``).
        offsets: [F * B + 1] bag boundaries over ``values`` (a KJT's ``offsets()``).
        per_sample_weights: float32, one per id, or None.
        codes: per table, its codes [N, M] (uint8/uint16); ignored (pass an empty tensor) for a
            full table.
        params: per table, its codebooks [M, K, D/M] or, for a full table, its weight [N, D].
        feature_tables: per feature, the index of the table it reads.
        feature_pooling: per feature, 0 for SUM, 1 for MEAN.

    Returns:
        ``(pooled, [bad_feature, bad_table])``: pooled [B, sum of feature dims], differentiable
        w.r.t. ``params``; ``bad_feature`` is the first feature with an id outside its table
        and ``bad_table`` the first table holding a code >= K (each -1 if none). Bad ids and
        codes contribute nothing; the caller raises.

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> books = torch.arange(8.0).view(2, 2, 2)
        >>> weight = torch.ones(3, 2)
        >>> pooled, status = fused_pooled_lookup(
        ...     torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), None,
        ...     [codes, torch.empty(0)], [books, weight], [0, 1], [0, 0])
        >>> pooled.tolist(), status
        ([[2.0, 4.0, 10.0, 12.0, 1.0, 1.0]], [-1, -1])
    """
    pooled, status = _FusedPooledLookup.apply(
        values.contiguous(),
        offsets.long().contiguous(),
        None if per_sample_weights is None else per_sample_weights.float().contiguous(),
        list(codes),
        list(feature_tables),
        list(feature_pooling),
        *params,
    )
    return pooled, status.tolist()


def pq_embedding_bag_fast(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
) -> torch.Tensor:
    """``reference.pq_embedding_bag`` through the fastest path for the tensors' device.

    The Triton kernel on CUDA (when Triton is installed), the compiled operator on CPU (when
    built), the plain-PyTorch reference otherwise. Raises ``ValueError`` for ids outside the
    table (and, on CPU, codes outside the codebooks).

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> books = torch.arange(8.0).view(2, 2, 2)
        >>> pq_embedding_bag_fast(codes, books, torch.tensor([0, 1]), torch.tensor([0, 2])).tolist()
        [[2.0, 4.0, 10.0, 12.0]]
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    if per_sample_weights is not None and mode != "sum":
        raise ValueError("per_sample_weights need mode='sum' (as in F.embedding_bag)")
    if values.numel() and values.device.type != "cpu":
        lo, hi = torch.aminmax(values)
        if int(lo) < 0 or int(hi) >= codes.shape[0]:
            raise ValueError(f"ids must be in [0, {codes.shape[0]}), got [{int(lo)}, {int(hi)}]")
    if values.is_cuda and triton_lookup.TRITON_AVAILABLE:
        return triton_lookup.pq_embedding_bag_triton(
            codes, codebooks, values, offsets, per_sample_weights, mode
        )
    if values.device.type == "cpu" and cpu_operator_available():
        pooled, (bad_feature, bad_table) = fused_pooled_lookup(
            values, offsets, per_sample_weights, [codes], [codebooks], [0], [int(mode == "mean")]
        )
        if bad_feature >= 0:
            raise ValueError(f"ids must be in [0, {codes.shape[0]})")
        if bad_table >= 0:
            raise ValueError(f"codes must be < codebook_size {codebooks.shape[1]}")
        return pooled
    return pq_embedding_bag(codes, codebooks, values, offsets, per_sample_weights, mode)
