"""The fast pooled lookups and their dispatch: compiled CPU operator, Triton GPU kernel, fallbacks.

* CPU: ``torch.ops.torchrec_mec.pooled_lookup_forward`` / ``pooled_lookup_backward``
  (``csrc/pq_lookup.cpp``, built into ``torchrec_mec._C`` by the package install) pool every
  feature of a collection, compressed or full, in one call each way. They check every offset,
  id and code before it is used and raise a ``ValueError`` naming the feature or table. This
  module registers their fake (meta) kernels and their autograd formula with ``torch.library``,
  so ``torch.compile(fullgraph=True)``, ``torch.export`` and AOTInductor see one operator with a
  known output shape. When the library is absent, :func:`cpu_operator_available` says so once
  with a warning and callers take the FBGEMM / pure-PyTorch paths.
* CUDA: ``triton_lookup.pq_embedding_bag_triton`` (a ``torch.library.triton_op``), one table at a
  time, after a device-side id check (:func:`assert_ids_in_range`) that does not sync the host.
* Anything else: ``reference.pq_embedding_bag`` (plain PyTorch).
"""
import importlib
import warnings
from typing import Any, Optional, Sequence

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


def _table_dim(param: torch.Tensor) -> Any:
    """D of a table parameter: codebooks [M, K, D/M] or a full weight [N, D]."""
    return param.shape[0] * param.shape[2] if param.dim() == 3 else param.shape[1]


def _saved_stride(codes: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> int:
    """Bytes of saved codes per id: the largest M * code bytes of the compressed tables."""
    return max([c.shape[1] * c.element_size() for c, p in zip(codes, params) if p.dim() == 3],
               default=0)


if _CPU_OPERATOR_ERROR is None:

    @torch.library.register_fake("torchrec_mec::pooled_lookup_forward")
    def _forward_fake(values, offsets, per_sample_weights, codes, params, fallbacks, promoted_ids,
                      num_ids, feature_tables, feature_pooling, feature_slots, save_codes,
                      feature_names, table_names):
        batch = (offsets.shape[0] - 1) // len(feature_tables)
        total_dim = sum(_table_dim(params[t]) for t in feature_tables)
        saved = values.shape[0] * _saved_stride(codes, params) if save_codes else 0
        return params[0].new_empty(batch, total_dim), values.new_empty(saved, dtype=torch.uint8)

    @torch.library.register_fake("torchrec_mec::pooled_lookup_backward")
    def _backward_fake(grad_output, values, offsets, per_sample_weights, saved_codes, codes,
                       params, fallbacks, promoted_ids, num_ids, feature_tables, feature_pooling,
                       feature_slots, feature_names, table_names):
        return [torch.empty_like(p) for p in params] + [torch.empty_like(f) for f in fallbacks]

    def _setup_context(ctx, inputs, output) -> None:
        values, offsets, weights, codes, params, fallbacks, promoted, *static = inputs
        ctx.num_tables = len(codes)
        ctx.has_fallback = [f.numel() > 0 for f in fallbacks]
        # static: num_ids, feature_tables, feature_pooling, feature_slots, save_codes, names
        ctx.static = static[:4] + static[5:]
        ctx.save_for_backward(values, offsets, weights, output[1], *codes, *params, *fallbacks,
                              *promoted)

    def _backward(ctx, grad_pooled, _grad_saved):
        values, offsets, weights, saved, *tables = ctx.saved_tensors
        n = ctx.num_tables
        codes, params, fallbacks, promoted = (tables[:n], tables[n : 2 * n], tables[2 * n : 3 * n],
                                              tables[3 * n :])
        grads = torch.ops.torchrec_mec.pooled_lookup_backward(
            grad_pooled.contiguous(), values, offsets, weights, saved, codes, params, fallbacks,
            promoted, *ctx.static
        )
        fallback_grads = [g if has else None for g, has in zip(grads[n:], ctx.has_fallback)]
        no_grad = [None] * n
        return (None, None, None, no_grad, list(grads[:n]), fallback_grads, no_grad) + (None,) * 7

    torch.library.register_autograd(
        "torchrec_mec::pooled_lookup_forward", _backward, setup_context=_setup_context
    )


def fused_pooled_lookup(
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    codes: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    feature_tables: Sequence[int],
    feature_pooling: Sequence[int],
    feature_slots: Optional[Sequence[int]] = None,
    feature_names: Sequence[str] = (),
    table_names: Sequence[str] = (),
    fallbacks: Optional[Sequence[torch.Tensor]] = None,
    promoted_ids: Optional[Sequence[torch.Tensor]] = None,
    num_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Pools every feature of a collection in one call of the compiled CPU operator.

    Offsets, ids and codes are checked before they are used; a bad one raises ``ValueError``
    naming the feature (or table) by ``feature_names`` / ``table_names`` when given, by position
    otherwise. Traceable by ``torch.compile(fullgraph=True)`` and ``torch.export``.

    Args:
        values: int32/int64 ids of all features, feature after feature (a KJT's ``values()``).
        offsets: [F * B + 1] bag boundaries over ``values`` (a KJT's ``offsets()``).
        per_sample_weights: float32, one per id, or None.
        codes: per table, its codes [N, M] (uint8/uint16); ignored (pass an empty tensor) for a
            full table.
        params: per table, its codebooks [M, K, D/M] or, for a full table, its weight [N, D].
        feature_tables: per feature, the index of the table it reads.
        feature_pooling: per feature, 0 for SUM, 1 for MEAN.
        feature_slots: per feature, the position of its block in the output (a permutation;
            feature order by default).
        feature_names: per feature, its name (for error messages).
        table_names: per table, its name (for error messages).
        fallbacks: per table, its fallback table [F, D] for new ids, or an empty tensor (none;
            the default for every table). A table with one has ``C = len(codes) -
            len(promoted_ids)`` coded ids; new id ``i`` (``C <= i < num_ids``) reads the codes
            row ``C + s`` if it is ``promoted_ids[s]``, else fallback row ``(i - C) % F``.
        promoted_ids: per table, its promoted new ids (int64, increasing, then unused slots
            ``torch.iinfo(torch.int64).max``), or an empty tensor.
        num_ids: per table, the ids it serves, ``[0, num_ids)`` (default: the rows of its
            codes or weight; more only with a fallback).

    Returns:
        pooled [B, sum of feature dims], differentiable w.r.t. ``params`` and ``fallbacks``.

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> books = torch.arange(8.0).view(2, 2, 2)
        >>> weight = torch.ones(3, 2)
        >>> fused_pooled_lookup(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), None,
        ...     [codes, torch.empty(0)], [books, weight], [0, 1], [0, 0]).tolist()
        [[2.0, 4.0, 10.0, 12.0, 1.0, 1.0]]
        >>> fused_pooled_lookup(torch.tensor([0, 1, 3]), torch.tensor([0, 2, 3]), None,
        ...     [codes, torch.empty(0)], [books, weight], [0, 1], [0, 0],
        ...     feature_names=["user", "site"], table_names=["t_user", "t_site"])
        Traceback (most recent call last):
        ...
        ValueError: feature 'site': id 3 is out of range for table 't_site' with 3 rows
    """
    if fallbacks is None:
        fallbacks = [torch.empty(0, 0)] * len(params)
    if promoted_ids is None:
        promoted_ids = [torch.empty(0, dtype=torch.int64)] * len(params)
    if num_ids is None:
        num_ids = [c.shape[0] if p.dim() == 3 else p.shape[0] for c, p in zip(codes, params)]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *fallbacks))
    pooled, _ = torch.ops.torchrec_mec.pooled_lookup_forward(
        values.contiguous(),
        offsets.long().contiguous(),
        None if per_sample_weights is None else per_sample_weights.float().contiguous(),
        list(codes),
        list(params),
        list(fallbacks),
        list(promoted_ids),
        list(num_ids),
        list(feature_tables),
        list(feature_pooling),
        list(range(len(feature_tables))) if feature_slots is None else list(feature_slots),
        save,
        "\n".join(feature_names),
        "\n".join(table_names),
    )
    return pooled


def assert_ids_in_range(ids: torch.Tensor, rows: int, what: str) -> None:
    """Checks on the tensor's device, without a host sync, that every id is in ``[0, rows)``.

    On CPU a bad id raises ``RuntimeError`` with ``what`` in its message now; on CUDA the check
    is queued on the stream (``torch._assert_async``), before the lookup that it guards, and
    fails as a device-side assert at the next synchronisation. Callers that want the exact
    ``ValueError`` on CPU check there themselves.

    Example::

        >>> assert_ids_in_range(torch.tensor([0, 4]), 5, "feature 'f'")
    """
    if ids.numel():
        torch._assert_async(
            ((ids >= 0) & (ids < rows)).all(), f"{what}: an id is outside [0, {rows})"
        )


def pq_embedding_bag_fast(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
) -> torch.Tensor:
    """``reference.pq_embedding_bag`` through the fastest path for the tensors' device.

    The compiled operator on CPU (when built), which raises ``ValueError`` for bad offsets, ids
    outside the table or codes outside the codebooks; the Triton kernel on CUDA (when Triton is
    installed), after a device-side id check that does not sync the host; the plain-PyTorch
    reference otherwise.

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
    if values.device.type == "cpu" and cpu_operator_available():
        return fused_pooled_lookup(
            values, offsets, per_sample_weights, [codes], [codebooks], [0], [int(mode == "mean")]
        )
    assert_ids_in_range(values, codes.shape[0], "pq_embedding_bag_fast")
    if values.is_cuda and triton_lookup.TRITON_AVAILABLE:
        return triton_lookup.pq_embedding_bag_triton(
            codes, codebooks, values, offsets, per_sample_weights, mode
        )
    return pq_embedding_bag(codes, codebooks, values, offsets, per_sample_weights, mode)
