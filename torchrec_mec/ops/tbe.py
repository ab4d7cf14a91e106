"""FBGEMM table-batched embedding (TBE) lookup over per-table parameters that share one buffer.

FBGEMM's TBE ops read every table from one flat weight buffer. TorchRec users, optimizers and
checkpoints expect one parameter per table (``codebooks`` [M, K, D/M], ``weight`` [N, D]). The
two views are reconciled without copies: the per-table parameters are views into the flat buffer
(``FlatParameterBuffer``), the forward runs FBGEMM's CPU kernel on the buffer, and the backward
runs FBGEMM's dense backward kernel and hands each parameter its slice of the gradient.
"""
from itertools import accumulate
from math import log2
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from torch import nn

# FBGEMM's PoolingMode.SUM; MEAN is expressed as SUM with per-sample weights 1 / bag length, so
# that SUM and MEAN tables share one op.
_POOLING_SUM = 0
_OUTPUT_FP32 = 0


def tbe_available(device: torch.device) -> bool:
    """Whether the installed fbgemm-gpu has TBE kernels for ``device`` (CPU: any build; CUDA:
    the CUDA build).

    Example::

        >>> tbe_available(torch.device("cpu"))
        True
    """
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fbgemm::dense_embedding_codegen_lookup_function", key
    )


class FlatParameterBuffer:
    """Keeps a module's parameters as views into one contiguous flat tensor.

    ``params`` is a callable that returns the module's current parameters, so that parameters
    replaced by ``load_state_dict(..., assign=True)``, ``to_empty()`` or a move between devices
    are the ones used. ``flat()`` returns the buffer, re-packing it when a parameter has storage
    of its own (``module.to()``, ``param.data = ...``, a new parameter object).

    Args:
        params: returns the parameters, in buffer order.

    Example::

        >>> a, b = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.zeros(4))
        >>> buf = FlatParameterBuffer(lambda: [a, b])
        >>> buf.flat().shape
        torch.Size([10])
        >>> with torch.no_grad():
        ...     _ = a.mul_(2)
        >>> float(buf.flat()[0])
        2.0
        >>> a = nn.Parameter(torch.full((2, 3), 5.0))  # replaced, as load_state_dict(assign=True) does
        >>> float(buf.flat()[0])
        5.0
    """

    def __init__(self, params: Callable[[], Sequence[nn.Parameter]]) -> None:
        self._params = params
        self._flat: Optional[torch.Tensor] = None
        self.offsets: List[int] = self._offsets(self.params)

    @property
    def params(self) -> List[nn.Parameter]:
        return list(self._params())

    @staticmethod
    def _offsets(params: Sequence[nn.Parameter]) -> List[int]:
        return [0] + list(accumulate(p.numel() for p in params))

    def _is_packed(self, params: Sequence[nn.Parameter]) -> bool:
        flat = self._flat
        if flat is None or self._offsets(params) != self.offsets:
            return False
        base = flat.data_ptr()
        size = flat.element_size()
        return all(
            p.device == flat.device
            and p.dtype == flat.dtype
            and p.is_contiguous()
            and p.data_ptr() == base + off * size
            for p, off in zip(params, self.offsets)
        )

    @torch.no_grad()
    def flat(self) -> torch.Tensor:
        params = self.params
        if not self._is_packed(params):
            self.offsets = self._offsets(params)
            ref = params[0]
            flat = torch.empty(self.offsets[-1], dtype=ref.dtype, device=ref.device)
            for p, start in zip(params, self.offsets):
                flat[start : start + p.numel()].copy_(p.detach().reshape(-1))
                p.data = flat[start : start + p.numel()].view(p.shape)
            self._flat = flat
        assert self._flat is not None
        return self._flat


class TableBatchedLookup:
    """Pooled lookups of many features over many tables in one FBGEMM op.

    Args:
        table_shapes: ``(rows, dim)`` of each TBE table, in flat-buffer order.
        feature_tables: for each feature slot (one output block of ``dim`` columns), the index
            of the table it reads. Several slots may read one table.

    The output of :meth:`__call__` is ``[B, sum of slot dims]``, slot blocks in slot order.

    Example::

        >>> lookup = TableBatchedLookup([(4, 2)], feature_tables=[0, 0])
        >>> weights = nn.Parameter(torch.arange(8.0).view(4, 2))
        >>> buf = FlatParameterBuffer(lambda: [weights])
        >>> out = lookup(buf, torch.tensor([0, 3, 1]), torch.tensor([0, 1, 2, 3, 3]), None)
        >>> out.tolist()  # slot 0: bags [0], [3]; slot 1: bags [1], []
        [[0.0, 1.0, 2.0, 3.0], [6.0, 7.0, 0.0, 0.0]]
    """

    def __init__(self, table_shapes: Sequence[Tuple[int, int]], feature_tables: Sequence[int]):
        rows = [r for r, _ in table_shapes]
        dims = [d for _, d in table_shapes]
        slot_dims = [dims[t] for t in feature_tables]
        self.total_dim = sum(slot_dims)
        self.max_dim = max(dims)
        self.d_offsets = torch.tensor([0] + list(accumulate(slot_dims)), dtype=torch.int32)
        row_starts = [0] + list(accumulate(rows))
        self.hash_size_cumsum = torch.tensor(
            [row_starts[t] for t in feature_tables] + [row_starts[-1]], dtype=torch.int64
        )
        self.total_hash_size_bits = int(log2(float(row_starts[-1])) + 1) if row_starts[-1] else 0
        weight_starts = [0] + list(accumulate(r * d for r, d in table_shapes))
        self.weights_offsets = torch.tensor(
            [weight_starts[t] for t in feature_tables], dtype=torch.int64
        )
        self._metadata: Dict[torch.device, Tuple[torch.Tensor, ...]] = {}

    def __call__(
        self,
        buffer: FlatParameterBuffer,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor],
        dense: Optional[bool] = None,
    ) -> torch.Tensor:
        """The pooled lookup. ``dense`` (default: off the CPU) runs FBGEMM's autograd-aware
        ``dense_embedding_codegen_lookup_function``, on any device it has kernels for; else
        FBGEMM's CPU kernels are called directly."""
        dense = indices.device.type != "cpu" if dense is None else dense
        return _TBEFunction.apply(
            self, buffer, dense, indices, offsets, per_sample_weights, *buffer.params
        )

    def metadata(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """(weights_offsets, d_offsets, hash_size_cumsum) on ``device``."""
        cached = self._metadata.get(device)
        if cached is None:
            cached = tuple(t.to(device) for t in (
                self.weights_offsets, self.d_offsets, self.hash_size_cumsum))
            self._metadata[device] = cached
        return cached


class _TBEFunction(torch.autograd.Function):
    """FBGEMM's CPU forward and dense backward kernels on the flat buffer; or, with ``dense``,
    FBGEMM's autograd-aware ``dense_embedding_codegen_lookup_function`` (any device it has
    kernels for) with the flat buffer as a leaf of its graph inside this function's forward.
    Either way the backward slices the buffer's gradient per parameter."""

    @staticmethod
    def forward(
        ctx,
        lookup: TableBatchedLookup,
        buffer: FlatParameterBuffer,
        dense: bool,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor],
        *params: torch.Tensor,
    ) -> torch.Tensor:
        ctx.lookup, ctx.buffer, ctx.dense = lookup, buffer, dense
        if dense:
            weights_offsets, d_offsets, hash_size_cumsum = lookup.metadata(indices.device)
            with torch.enable_grad():
                ctx.flat = buffer.flat().detach().requires_grad_(True)
                ctx.out = torch.ops.fbgemm.dense_embedding_codegen_lookup_function(
                    dev_weights=ctx.flat,
                    weights_offsets=weights_offsets,
                    D_offsets=d_offsets,
                    total_D=lookup.total_dim,
                    max_D=lookup.max_dim,
                    hash_size_cumsum=hash_size_cumsum,
                    total_hash_size_bits=lookup.total_hash_size_bits,
                    indices=indices,
                    offsets=offsets,
                    pooling_mode=_POOLING_SUM,
                    indice_weights=per_sample_weights,
                    feature_requires_grad=None,
                    output_dtype=_OUTPUT_FP32,
                )
            return ctx.out.detach()
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return torch.ops.fbgemm.split_embedding_codegen_forward_cpu(
            buffer.flat(),
            lookup.weights_offsets,
            lookup.d_offsets,
            lookup.total_dim,
            lookup.hash_size_cumsum,
            indices,
            offsets,
            _POOLING_SUM,
            per_sample_weights,
            _OUTPUT_FP32,
        )

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        lookup: TableBatchedLookup = ctx.lookup
        buffer: FlatParameterBuffer = ctx.buffer
        if ctx.dense:
            (grad_flat,) = torch.autograd.grad(ctx.out, ctx.flat, grad_output)
        else:
            indices, offsets, per_sample_weights = ctx.saved_tensors
            grad_flat = torch.ops.fbgemm.split_embedding_backward_codegen_dense_cpu(
                grad_output.contiguous(),
                buffer.flat(),
                lookup.weights_offsets,
                lookup.d_offsets,
                lookup.max_dim,
                lookup.hash_size_cumsum,
                lookup.total_hash_size_bits,
                indices,
                offsets,
                _POOLING_SUM,
                per_sample_weights,
                0.0,
            )
        grads = [
            grad_flat[start : start + p.numel()].view(p.shape)
            for p, start in zip(buffer.params, buffer.offsets)
        ]
        return (None, None, None, None, None, None, *grads)
