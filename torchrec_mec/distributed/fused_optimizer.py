"""The optimizer a TorchRec user asks to fuse, applied in backward to a sharded QEBC's parameters.

TorchRec fuses an embedding optimizer into FBGEMM's backward when it is named through the sharder's
``fused_params`` (``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}``) or through
``apply_optimizer_in_backward`` on the table parameters before sharding. The QEBC's lookup hands
autograd a dense gradient per ``codebooks`` / ``weight`` shard instead, so the same request is met by
stepping a torch optimizer on each shard parameter as soon as its gradient has been accumulated
(torch's ``_apply_optimizer_in_backward``): the update happens in backward and the gradient is freed,
as with a fused TBE, and ``dmp.fused_optimizer`` carries the optimizer state.

As TorchRec's fused optimizers do, the state exists from construction (a zero-gradient step at
learning rate 0, as ``torch.distributed.checkpoint`` initialises optimizer state, with step counts
set back to 0), so that a checkpoint can be loaded into it, and it is keyed by the unsharded
parameter names: state shaped like its parameter is checkpointed as the parameter's
``ShardedTensor``, which ``torch.distributed.checkpoint`` reshards to any plan and world size.
"""
import inspect
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple, Type

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.optim.fused import FusedOptimizer

# The EmbOptimTypes a plain torch optimizer reproduces exactly; TorchRec's own classes of those names
# (torchrec.optim.SGD, ...) are placeholders that only name the FBGEMM optimizer.
_TORCH_OPTIMIZERS: Dict[EmbOptimType, Type[torch.optim.Optimizer]] = {
    EmbOptimType.EXACT_SGD: torch.optim.SGD,
    EmbOptimType.EXACT_ADAGRAD: torch.optim.Adagrad,
    EmbOptimType.ADAM: torch.optim.Adam,
}

OptimizerSpec = Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]


def fused_optimizer_spec(
    param: torch.Tensor, fused_params: Optional[Mapping[str, Any]]
) -> Optional[OptimizerSpec]:
    """The optimizer to fuse for a table parameter: the one set by ``apply_optimizer_in_backward``
    on it, else the sharder's ``fused_params["optimizer"]``, else ``None`` (plain gradients).

    Example::

        >>> spec = fused_optimizer_spec(torch.zeros(2), {"optimizer": EmbOptimType.EXACT_SGD,
        ...                                              "learning_rate": 0.5})
        >>> spec[0].__name__, spec[1]
        ('SGD', {'lr': 0.5})
    """
    classes = getattr(param, "_optimizer_classes", None)
    if classes:
        cls, kwargs = classes[0], dict(param._optimizer_kwargs[0])  # type: ignore[attr-defined]
        if cls.__module__.startswith("torchrec.optim.optimizers"):
            return _torch_optimizer(optimizer_type_to_emb_opt_type(cls), kwargs)
        return cls, kwargs
    if fused_params and fused_params.get("optimizer") is not None:
        fused = dict(fused_params)
        kwargs = {"lr": fused.pop("learning_rate", 0.01)}
        if "beta1" in fused or "beta2" in fused:
            kwargs["betas"] = (fused.pop("beta1", 0.9), fused.pop("beta2", 0.999))
        kwargs.update({k: fused[k] for k in ("eps", "weight_decay", "momentum") if k in fused})
        return _torch_optimizer(fused["optimizer"], kwargs)
    return None


def _torch_optimizer(opt: Optional[EmbOptimType], kwargs: Dict[str, Any]) -> OptimizerSpec:
    if opt not in _TORCH_OPTIMIZERS:
        raise ValueError(
            f"optimizer {opt} cannot be fused into a QEBC's backward; use one of "
            f"{sorted(o.name for o in _TORCH_OPTIMIZERS)}, or apply_optimizer_in_backward with a "
            "torch.optim class"
        )
    cls = _TORCH_OPTIMIZERS[opt]
    accepted = inspect.signature(cls.__init__).parameters
    return cls, {k: v for k, v in kwargs.items() if k in accepted}


class ShardLayout(Protocol):
    """How a parameter held by this rank sits in its table (the sharded QEBC's ``_TableLayout``).

    Example (a replicated parameter: its state is checkpointed as it is)::

        >>> class Replicated:
        ...     def to_global(self, local):
        ...         return local
        ...     def copy_local(self, value, local):
        ...         local.copy_(value)
        >>> w = nn.Parameter(torch.ones(2))
        >>> opt = InBackwardOptimizer({"w": w}, torch.optim.Adam, {"lr": 0.1}, {"w": Replicated()})
        >>> state = opt.state_dict()
        >>> state["state"]["w"]["exp_avg"].tolist(), float(state["state"]["w"]["step"])
        ([0.0, 0.0], 0.0)
    """

    def to_global(self, local: Optional[torch.Tensor]) -> Any:
        """A tensor shaped like the local parameter, as the table-wide value (a ``ShardedTensor``
        over this rank's shards, or the tensor itself when every rank holds a replica)."""

    def copy_local(self, value: Any, local: torch.Tensor) -> None:
        """Copies this rank's part of a table-wide value into a tensor shaped like the parameter."""


class _ParameterShapedState:
    """One optimizer state tensor shaped like its parameter, checkpointed as the parameter is
    (through TorchRec's ``KeyedOptimizer``, which calls ``state_dict`` / ``load_state_dict`` on
    state values that have them)."""

    def __init__(self, tensor: torch.Tensor, layout: ShardLayout) -> None:
        self.tensor = tensor
        self.layout = layout

    def state_dict(self) -> Any:
        return self.layout.to_global(self.tensor)

    def load_state_dict(self, value: Any) -> None:
        self.layout.copy_local(value, self.tensor)


@torch.no_grad()
def _create_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Creates ``optimizer``'s state for ``param`` as its first step would, without changing it."""
    if optimizer.state.get(param):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    param.grad = torch.zeros_like(param)
    optimizer.step()
    param.grad = None
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    state = optimizer.state[param]
    if isinstance(state.get("step"), torch.Tensor):
        state["step"].zero_()
    elif "step" in state:
        state["step"] = 0


class InBackwardOptimizer(FusedOptimizer):
    """Steps ``optimizer_class`` on each parameter as its gradient is accumulated in backward.

    ``step()`` and ``zero_grad()`` are no-ops (the work is done in backward, as with TorchRec's fused
    TBE optimizers); ``state_dict()`` holds the optimizer state under the given parameter names.
    The state is created at construction (see the module docstring).

    Args:
        params: name -> parameter.
        optimizer_class: a torch optimizer class.
        optimizer_kwargs: its keyword arguments.
        layouts: name -> where the parameter sits in its table; state shaped like the parameter
            is then checkpointed as the table-wide value (a ``ShardedTensor``). Without one, a
            parameter's state is its own.

    Example::

        >>> w = nn.Parameter(torch.ones(3))
        >>> opt = InBackwardOptimizer({"w": w}, torch.optim.SGD, {"lr": 0.5})
        >>> (2 * w).sum().backward()  # SGD steps here: w -= 0.5 * 2
        >>> w.tolist(), w.grad
        ([0.0, 0.0, 0.0], None)
        >>> adam = InBackwardOptimizer({"v": nn.Parameter(torch.ones(2))}, torch.optim.Adam, {})
        >>> sorted(adam.state_dict()["state"]["v"])  # before any step
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        optimizer_class: Type[torch.optim.Optimizer],
        optimizer_kwargs: Mapping[str, Any],
        layouts: Optional[Mapping[str, ShardLayout]] = None,
    ) -> None:
        _apply_optimizer_in_backward(optimizer_class, params.values(), dict(optimizer_kwargs))
        optimizers = [p._in_backward_optimizers[-1] for p in params.values()]  # type: ignore[attr-defined]
        state: Dict[Any, Any] = {}
        for (name, p), opt in zip(params.items(), optimizers):
            _create_state(opt, p)
            layout = (layouts or {}).get(name)
            # Without a layout the per-parameter state dict is shared (filled in place by the steps).
            state[p] = opt.state[p] if layout is None else {
                key: _layout_state(name, key, value, p, layout) for key, value in opt.state[p].items()
            }
        groups = [g for opt in optimizers for g in opt.param_groups]
        super().__init__(dict(params), state, groups)

    def step(self, closure: Any = None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass


def _layout_state(name: str, key: str, value: Any, param: torch.Tensor, layout: ShardLayout) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value  # a step count: the same on every shard, saved once
    if value.shape != param.shape:
        raise ValueError(
            f"{name}: optimizer state {key!r} of shape {tuple(value.shape)} is neither a scalar nor "
            f"shaped like the parameter {tuple(param.shape)}, so it cannot be checkpointed by shard"
        )
    return _ParameterShapedState(value, layout)
