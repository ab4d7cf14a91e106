"""The optimizer a TorchRec user asks to fuse, applied in backward to a sharded QEBC's parameters.

TorchRec fuses an embedding optimizer into FBGEMM's backward when it is named through the sharder's
``fused_params`` (``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}``) or through
``apply_optimizer_in_backward`` on the table parameters before sharding. The QEBC's lookup hands
autograd a dense gradient per ``codebooks`` / ``weight`` shard instead, so the same request is met by
stepping a torch optimizer on each shard parameter as soon as its gradient has been accumulated
(torch's ``_apply_optimizer_in_backward``): the update happens in backward and the gradient is freed,
as with a fused TBE, and ``dmp.fused_optimizer`` carries the optimizer state.
"""
import inspect
from typing import Any, Dict, Mapping, Optional, Tuple, Type

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


class InBackwardOptimizer(FusedOptimizer):
    """Steps ``optimizer_class`` on each parameter as its gradient is accumulated in backward.

    ``step()`` and ``zero_grad()`` are no-ops (the work is done in backward, as with TorchRec's fused
    TBE optimizers); ``state_dict()`` holds the optimizer state under the given parameter names.

    Args:
        params: name -> parameter.
        optimizer_class: a torch optimizer class.
        optimizer_kwargs: its keyword arguments.

    Example::

        >>> w = nn.Parameter(torch.ones(3))
        >>> opt = InBackwardOptimizer({"w": w}, torch.optim.SGD, {"lr": 0.5})
        >>> (2 * w).sum().backward()  # SGD steps here: w -= 0.5 * 2
        >>> w.tolist(), w.grad
        ([0.0, 0.0, 0.0], None)
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        optimizer_class: Type[torch.optim.Optimizer],
        optimizer_kwargs: Mapping[str, Any],
    ) -> None:
        _apply_optimizer_in_backward(optimizer_class, params.values(), dict(optimizer_kwargs))
        optimizers = [p._in_backward_optimizers[-1] for p in params.values()]  # type: ignore[attr-defined]
        # The per-parameter state dicts are shared (filled in place by the optimizers' steps).
        state = {p: opt.state[p] for p, opt in zip(params.values(), optimizers)}
        groups = [g for opt in optimizers for g in opt.param_groups]
        super().__init__(dict(params), state, groups)

    def step(self, closure: Any = None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass
