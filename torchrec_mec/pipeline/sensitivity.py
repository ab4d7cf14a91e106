"""How much a trained model's prediction moves when a table's embeddings move: the weight of
each table's reconstruction error in the memory budget (``compress.table_weights``).

A quantized row ``q = e + delta`` changes the logit by about ``J delta`` (``J`` the gradient of
the logit in the table's pooled embedding) and the expected log loss by about
``p (1 - p) (J delta)^2 / 2``. For an error spread evenly over the dimensions that is
proportional to ``p (1 - p) ||J||^2 ||delta||^2``: the table's *sensitivity*
``s_t = E[p (1 - p) ||J_t||^2]`` (a Gauss-Newton diagonal, per table) times its squared error.
:func:`table_sensitivity` measures it with forward passes alone: it adds Gaussian noise of
scale ``noise`` to one feature's pooled embedding at a time, and ``E[(Delta logit)^2] =
noise^2 ||J||^2``. Forward passes only, so it runs under ``DistributedModelParallel`` as
evaluation does (every rank the same number of them), with no backward through the sharded
tables or the data-parallel dense layers.
"""
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_mec.data.dataset import CTRDataset, batch_row_ranges
from torchrec_mec.models import hook_sparse_arch, table_name
from torchrec_mec.pipeline.parallel import DistContext
from torchrec_mec.quantize.driver import table_seed

SENSITIVITY_ROWS = 1 << 16
"""Training rows :func:`table_sensitivity` reads by default (the first global batches of a
fixed shuffle)."""
SENSITIVITY_NOISE = 1e-2
"""Scale of the Gaussian perturbation of a pooled embedding."""


class _Perturb:
    """A forward hook on ``sparse_arch`` that adds ``noise`` to one feature's pooled embedding
    (``feature`` None: none). ``sparse_arch`` returns ``[B, F, D]`` (DLRM, DLRM-DCN) or a
    ``KeyedTensor`` (DeepFM)."""

    def __init__(self, noise: float) -> None:
        self.noise = noise
        self.feature: Optional[int] = None
        self.names: List[str] = []
        self.seed = 0
        self.rows = (0, 0, 0)  # this rank's [start, stop) in a global batch of this many rows

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        """The noise of this rank's rows, drawn for the whole global batch (from ``seed``), so
        any number of ranks perturbs every sample alike."""
        start, stop, total = self.rows
        g = torch.Generator().manual_seed(self.seed)
        whole = torch.randn(total, like.shape[1], generator=g)
        return (self.noise * whole[start:stop]).to(like)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, KeyedTensor):
            self.names = list(output.keys())
            if self.feature is None:
                return output
            values = output.values().clone()
            start = sum(output.length_per_key()[: self.feature])
            width = output.length_per_key()[self.feature]
            values[:, start: start + width] += self._draw(values[:, start: start + width])
            return KeyedTensor(keys=output.keys(), length_per_key=output.length_per_key(),
                               values=values)
        self.names = list(getattr(module, "sparse_feature_names"))
        if self.feature is None:
            return output
        out = output.clone()
        out[:, self.feature] += self._draw(out[:, self.feature])
        return out


@torch.no_grad()
def table_sensitivity(
    runner: nn.Module,
    dataset: CTRDataset,
    ctx: DistContext,
    *,
    rows: int = SENSITIVITY_ROWS,
    batch_size: int = 8192,
    noise: float = SENSITIVITY_NOISE,
    seed: int = 0,
) -> Dict[str, float]:
    """Per table, ``E[p (1 - p) ||d logit / d e_t||^2]`` over about ``rows`` training rows: the
    mean squared change of the logit when Gaussian noise of scale ``noise`` is added to the
    table's pooled embedding, over ``noise^2``, weighted by ``p (1 - p)`` (module docstring).
    Features that share a table add up.

    Every rank must call this (each reads its slice of the same global batches, and the sums
    are all-reduced); every sample gets the same noise under any number of ranks, so the result
    does not depend on it. The model runs in evaluation mode and is left as it was.

    Args:
        runner (nn.Module): a ``CTRModel`` with a ``sparse_arch`` (plain or
            ``DistributedModelParallel``).
        dataset (CTRDataset): read from its training split.
        ctx (DistContext): this process.
        rows (int): training rows to average over (whole global batches; at least one).
        batch_size (int): global batch size.
        noise (float): scale of the perturbation.
        seed (int): the shuffle and the noise.

    Returns:
        Dict[str, float]: table name -> sensitivity.

    Example::

        >>> import tempfile
        >>> from torchrec_mec.data import SyntheticConfig, prepare_dataset
        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> ds = prepare_dataset(None, "synthetic", tempfile.mkdtemp(), progress=False,
        ...     synthetic=SyntheticConfig(num_rows=500, table_sizes=(50, 5), num_dense=2))
        >>> model = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), 2, ds.schema.sparse_names, ds.num_embeddings)
        >>> s = table_sensitivity(model, ds, DistContext(0, 1, torch.device("cpu")), rows=256)
        >>> sorted(s), all(v >= 0 for v in s.values())
        (['t_C1', 't_C2'], True)
    """
    hook = _Perturb(noise)
    handles = hook_sparse_arch(runner, hook, "table_sensitivity")
    was_training = runner.training
    runner.eval()
    local = max(1, batch_size // ctx.world_size)
    steps = max(1, -(-rows // (local * ctx.world_size)))
    n = dataset.num_rows("train")
    spans = [batch_row_ranges(n, local, rank=r, world_size=ctx.world_size)
             for r in range(ctx.world_size)]
    steps = min(steps, len(spans[0]))
    sums: Optional[torch.Tensor] = None
    count = 0
    try:
        batches = dataset.batches("train", local, shuffle=True, seed=seed, rank=ctx.rank,
                                  world_size=ctx.world_size)
        for step, batch in zip(range(steps), batches):
            batch = batch.to(ctx.device)
            first = spans[0][step][0]
            start, stop = spans[ctx.rank][step]
            hook.rows = (start - first, stop - first, spans[-1][step][1] - first)
            hook.feature = None
            logits = runner(batch.dense_features, batch.sparse_features)
            p = torch.sigmoid(logits)
            weight = p * (1 - p)
            if sums is None:
                sums = torch.zeros(len(hook.names), dtype=torch.float64, device=ctx.device)
            for f in range(len(hook.names)):
                hook.feature, hook.seed = f, table_seed(seed, f"{step}.{f}")
                moved = runner(batch.dense_features, batch.sparse_features)
                sums[f] += (weight * (moved - logits).pow(2)).double().sum() / noise**2
            count += logits.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        runner.train(was_training)
    assert sums is not None  # at least one step
    total = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64,
                                          device=ctx.device)])
    if ctx.distributed:
        dist.all_reduce(total)
    out: Dict[str, float] = {}
    for name, value in zip(hook.names, total[:-1].tolist()):
        table = table_name(name)
        out[table] = out.get(table, 0.0) + value / float(total[-1])
    return out

