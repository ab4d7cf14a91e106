"""ShardedQuantizedEmbeddingBagCollection on 2 gloo ranks against the unsharded QEBC.

Every rank builds the same unsharded QEBC and the same global batch; it feeds its half of the
batch to the sharded module and checks it against the unsharded module fed the whole batch.
Loss: per rank, the mean over its bags; reference: the mean over the global batch (TorchRec
divides model-parallel gradients by the world size and DDP averages, so the two agree).
"""
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.distributed import QuantizedEmbeddingBagCollectionSharder
from torchrec_mec.modules import ProductQuantizedTable

from tests.distributed.multiprocess import run_on_ranks

BATCH = 6  # per rank
TOL = dict(rtol=1e-6, atol=1e-6)


def tables(weighted: bool = False) -> List[QuantizedEmbeddingBagConfig]:
    return [
        # uint8 codes, two features
        QuantizedEmbeddingBagConfig(name="pq8", num_embeddings=40, embedding_dim=8,
                                    feature_names=["a", "b"], num_subspaces=4, codebook_size=16),
        # uint16 codes, MEAN pooling (SUM when weighted)
        QuantizedEmbeddingBagConfig(name="pq16", num_embeddings=30, embedding_dim=4,
                                    feature_names=["c"], num_subspaces=2, codebook_size=300,
                                    pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
        QuantizedEmbeddingBagConfig(name="full", num_embeddings=20, embedding_dim=8,
                                    feature_names=["d"]),
    ]


def build_qebc(weighted: bool = False, device: Optional[torch.device] = None) -> QuantizedEmbeddingBagCollection:
    qebc = QuantizedEmbeddingBagCollection(tables(weighted), is_weighted=weighted, device=device)
    if device is not None and device.type == "meta":
        return qebc
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in qebc.embedding_bags.values():
            if isinstance(module, ProductQuantizedTable):
                codes = torch.randint(0, module.codebook_size, tuple(module.codes.shape), generator=gen)
                module.codes.copy_(codes.to(module.codes.dtype))
                module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen))
            else:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
    return qebc


def rank_batch(rank: int, weighted: bool, seed: int = 1) -> KeyedJaggedTensor:
    """Rank ``rank``'s local batch (the global batch is rank 0's bags, then rank 1's)."""
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    keys, values, lengths = [], [], []
    for cfg in tables():
        for f in cfg.feature_names:
            lens = torch.randint(0, 4, (BATCH,), generator=gen)
            lens[rank] = 0  # an empty bag
            keys.append(f)
            lengths.append(lens)
            values.append(torch.randint(0, cfg.num_embeddings, (int(lens.sum()),), generator=gen))
    v = torch.cat(values)
    w = torch.rand(v.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, v, torch.cat(lengths), weights=w)


def global_batch(world_size: int, weighted: bool, seed: int = 1) -> KeyedJaggedTensor:
    parts = [rank_batch(r, weighted, seed).to_dict() for r in range(world_size)]
    keys = list(parts[0])
    values, lengths, weights = [], [], []
    for k in keys:
        for p in parts:
            values.append(p[k].values())
            lengths.append(p[k].lengths())
            if weighted:
                weights.append(p[k].weights())
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat(values), torch.cat(lengths), weights=torch.cat(weights) if weighted else None
    )


def upstream(kt: KeyedTensor, rows: slice) -> Dict[str, torch.Tensor]:
    """A fixed upstream gradient per key (so that the loss weighs every output column)."""
    gen = torch.Generator().manual_seed(7)
    full = {k: torch.randn(2 * BATCH, v.shape[1], generator=gen) for k, v in sorted(kt.to_dict().items())}
    return {k: g[rows] for k, g in full.items()}


def mean_loss(kt: KeyedTensor, rows: slice) -> torch.Tensor:
    g = upstream(kt, rows)
    out = kt.to_dict()
    return sum((out[k] * g[k]).sum() for k in sorted(out)) / (rows.stop - rows.start)


class Model(nn.Module):
    def __init__(self, qebc: QuantizedEmbeddingBagCollection) -> None:
        super().__init__()
        self.qebc = qebc

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        return self.qebc(kjt)


PLANS = {
    "data_parallel": {"pq8": data_parallel(), "pq16": data_parallel(), "full": data_parallel()},
    "table_wise": {"pq8": table_wise(rank=0), "pq16": table_wise(rank=1), "full": table_wise(rank=1)},
    "row_wise": {"pq8": row_wise(), "pq16": row_wise(), "full": row_wise()},
    "column_wise": {"pq8": column_wise(ranks=[0, 1]), "pq16": column_wise(ranks=[1, 0]),
                    "full": column_wise(ranks=[0, 1])},
    # one table per sharding type; each rank holds two column shards (subspaces) of pq8
    "mixed": {"pq8": column_wise(ranks=[0, 1, 0, 1]), "pq16": row_wise(),
              "full": table_wise(rank=1)},
}


def shard(model: nn.Module, per_table: Dict, world_size: int,
          sharder: Optional[QuantizedEmbeddingBagCollectionSharder] = None) -> DistributedModelParallel:
    sharder = sharder or QuantizedEmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(model.qebc, per_table, sharder=sharder, local_size=world_size,
                                          world_size=world_size, device_type="cpu")
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"), plan=ShardingPlan({"qebc": plan}), sharders=[sharder],
    )


def assert_state_matches(sharded: Dict, reference: Dict) -> None:
    assert set(sharded) == set(reference), (sorted(sharded), sorted(reference))
    for key, value in sharded.items():
        if isinstance(value, ShardedTensor):
            for s in value.local_shards():
                where = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))
                torch.testing.assert_close(s.tensor, reference[key][where], **TOL, msg=key)
        else:
            torch.testing.assert_close(value, reference[key], **TOL, msg=key)


def _train_step_matches(rank: int, world_size: int, plan_name: str, weighted: bool) -> None:
    reference = build_qebc(weighted)
    dmp = shard(Model(build_qebc(weighted)), PLANS[plan_name], world_size)
    local, rows = rank_batch(rank, weighted), slice(rank * BATCH, (rank + 1) * BATCH)
    kjt = global_batch(world_size, weighted)

    ref_out = reference(kjt)
    out = dmp(local)
    for key, value in out.to_dict().items():
        torch.testing.assert_close(value, ref_out.to_dict()[key][rows], **TOL, msg=key)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.5)
    mean_loss(ref_out, slice(0, world_size * BATCH)).backward()
    mean_loss(out, rows).backward()
    ref_opt.step()
    opt.step()
    assert_state_matches(dmp.state_dict(), {f"qebc.{k}": v for k, v in reference.state_dict().items()})

    second = dmp(local).to_dict()
    ref_second = reference(kjt).to_dict()
    for key, value in second.items():
        torch.testing.assert_close(value, ref_second[key][rows], **TOL, msg=key)


@pytest.mark.parametrize("plan_name", ["data_parallel", "table_wise", "row_wise", "column_wise"])
def test_forward_step_and_second_forward_match_unsharded(plan_name: str) -> None:
    run_on_ranks(_train_step_matches, plan_name, False)


def test_mixed_plan_weighted_matches_unsharded() -> None:
    run_on_ranks(_train_step_matches, "mixed", True)
