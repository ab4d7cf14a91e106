"""Row-wise Adagrad for embedding tables in one process: FBGEMM's ``EXACT_ROWWISE_ADAGRAD``
(what sharded tables train with) as a ``torch.optim`` optimizer.

Element-wise Adagrad keeps one accumulator per table element, as large as the tables; row-wise
Adagrad keeps one per row (1/D of that), which is what lets a rank pre-train tables of several
GiB (docs/scale.md). TorchRec's ``torchrec.optim.RowWiseAdagrad`` does the same update but
keeps its state as [rows, 1] and takes no sparse gradients (stage 1 trains one-process tables
with sparse ones); this one keeps FBGEMM's [rows], so a checkpoint's optimizer state has the
same shape whichever path wrote it.
"""
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

ROWWISE_ADAGRAD = "rowwise_adagrad"
EMBEDDING_OPTIMIZERS = ("adagrad", ROWWISE_ADAGRAD)
"""The values of ``TrainSettings.embedding_optimizer``."""


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of each (2-D) parameter, FBGEMM's update::

        sum[r] += mean_d(g[r, d] ** 2)
        w[r]   -= lr * g[r] / (sqrt(sum[r]) + eps)

    for every row ``r`` that has a gradient. Dense or sparse gradients (a sparse one's duplicate
    rows are summed first, as FBGEMM's exact optimizers do); rows without a gradient are left as
    they are either way. State per parameter: ``sum``, [rows], FBGEMM's ``momentum1``.

    Args:
        params (Iterable[nn.Parameter]): 2-D parameters (embedding tables).
        lr (float): the learning rate.
        eps (float): added to the denominator.

    Raises:
        ValueError: a parameter is not 2-D (names its shape), or ``lr`` or ``eps`` < 0.

    Example::

        >>> w = nn.Parameter(torch.ones(3, 2))
        >>> opt = RowWiseAdagrad([w], lr=0.5)
        >>> w.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
        >>> opt.step()
        >>> opt.state[w]["sum"]  # (9 + 16) / 2 for row 0
        tensor([12.5000,  0.0000,  0.0000])
        >>> w.data[0]  # 1 - 0.5 * [3, 4] / sqrt(12.5)
        tensor([0.5757, 0.4343])
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-2,
                 eps: float = 1e-10) -> None:
        if lr < 0 or eps < 0:
            raise ValueError(f"RowWiseAdagrad needs lr >= 0 and eps >= 0, got {lr}, {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad updates 2-D tables; got a parameter of "
                                     f"shape {tuple(p.shape)}")
                self.state[p]["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _update(p, p.grad, self.state[p]["sum"], group["lr"], group["eps"])
        return loss


def _update(p: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, lr: float,
            eps: float) -> None:
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        state_sum.index_add_(0, rows, values.pow(2).mean(dim=1))
        step = values / (state_sum[rows].sqrt() + eps).unsqueeze(1)
        p.index_add_(0, rows, step, alpha=-lr)
    else:
        state_sum.add_(grad.pow(2).mean(dim=1))
        p.addcdiv_(grad, (state_sum.sqrt() + eps).unsqueeze(1), value=-lr)
