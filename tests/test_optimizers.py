"""optimizers.RowWiseAdagrad against the row-wise Adagrad formula computed in float64, from dense
and from sparse gradients (duplicate ids summed, as FBGEMM's exact optimizers do). Its
equivalence with FBGEMM's EXACT_ROWWISE_ADAGRAD on sharded tables is tested in
tests/distributed/test_sharded_state.py."""
import pytest
import torch
from torch import nn

from torchrec_mec.pipeline.optimizers import RowWiseAdagrad


def _reference(weight: torch.Tensor, grads: list, lr: float, eps: float):
    w, s = weight.double().clone(), torch.zeros(weight.shape[0], dtype=torch.float64)
    for g in grads:
        g = g.double()
        touched = g.abs().sum(dim=1) > 0
        s += g.pow(2).mean(dim=1)
        step = lr * g / (s.sqrt() + eps).unsqueeze(1)
        w[touched] -= step[touched]
    return w, s


@pytest.mark.parametrize("sparse", [False, True])
def test_rowwise_adagrad_follows_the_formula(sparse):
    torch.manual_seed(0)
    start = torch.randn(6, 4)
    table = nn.EmbeddingBag(6, 4, mode="sum", sparse=sparse)
    with torch.no_grad():
        table.weight.copy_(start)
    opt = RowWiseAdagrad([table.weight], lr=0.3, eps=1e-8)
    dense_grads = []
    for ids in ([0, 2, 2, 5], [2, 3], [1, 2, 0]):  # repeated ids, rows seen in some steps only
        opt.zero_grad()
        x = torch.tensor(ids)
        out = table(x, torch.tensor([0]))
        coeff = torch.randn_like(out)
        (out * coeff).sum().backward()
        dense_grads.append(torch.zeros(6, 4).index_add_(0, x, coeff.expand(len(ids), 4)))
        opt.step()
    want_w, want_s = _reference(start, dense_grads, 0.3, 1e-8)
    torch.testing.assert_close(table.weight.detach().double(), want_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.state[table.weight]["sum"].double(), want_s, atol=1e-6,
                               rtol=1e-6)
    assert torch.equal(table.weight.detach()[4], start[4])  # never looked up


def test_rowwise_adagrad_takes_tables_only():
    with pytest.raises(ValueError, match=r"2-D tables.*\(3,\)"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3))])
