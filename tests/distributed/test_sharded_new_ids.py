"""A QEBC with fallback tables for new ids, sharded on 2 gloo ranks, against the unsharded module.

Tables with a fallback are supported table-wise and data-parallel (FALLBACK_SHARDING_TYPES);
the sharder refuses row-wise and column-wise for them, naming the table. As in
test_sharded_qebc.py, each rank feeds its half of a global batch; the reference is the unsharded
module fed the whole batch, with the mean loss over it.
"""
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.distributed import QuantizedEmbeddingBagCollectionSharder, new_id_constraints

from tests.distributed.multiprocess import run_on_ranks
from tests.distributed.test_sharded_qebc import (
    Model,
    assert_state_matches,
    close,
    mean_loss,
    shard,
)
from tests.qebc_testing import randomize_
from tests.test_quantized_embedding_bag_collection import random_kjt

BATCH = 6  # per rank, as in test_sharded_qebc (whose helpers this file uses)


def tables() -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name="new8", num_embeddings=60, embedding_dim=8,
                                    feature_names=["a", "b"], num_subspaces=4, codebook_size=16,
                                    coded_rows=40, fallback_rows=5, promotion_slots=4),
        QuantizedEmbeddingBagConfig(name="new16", num_embeddings=320, embedding_dim=8,
                                    feature_names=["c"], num_subspaces=2, codebook_size=300,
                                    coded_rows=300, fallback_rows=3, promotion_slots=2,
                                    pooling=PoolingType.MEAN),
        QuantizedEmbeddingBagConfig(name="pq", num_embeddings=40, embedding_dim=8,
                                    feature_names=["d"], num_subspaces=4, codebook_size=16),
        QuantizedEmbeddingBagConfig(name="full", num_embeddings=20, embedding_dim=8,
                                    feature_names=["e"]),
    ]


def build_qebc(device=None) -> QuantizedEmbeddingBagCollection:
    torch.manual_seed(0)
    qebc = QuantizedEmbeddingBagCollection(tables(), device=device)
    if device is not None:
        return qebc
    randomize_(qebc, seed=1)
    qebc.promote("new8", torch.tensor([55, 41]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    qebc.promote("new16", torch.tensor([310]), torch.tensor([[299, 3]]))
    return qebc


def rank_batch(rank: int, seed: int = 1) -> KeyedJaggedTensor:
    return random_kjt(tables(), BATCH, max_len=4, weighted=False, seed=seed * 100 + rank)


def global_batch(world_size: int, seed: int = 1) -> KeyedJaggedTensor:
    """The ranks' batches, rank 0's bags first, as one batch."""
    parts = [rank_batch(r, seed).to_dict() for r in range(world_size)]
    keys = list(parts[0])
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat([p[k].values() for k in keys for p in parts]),
        torch.cat([p[k].lengths() for k in keys for p in parts]))


PLANS = {
    "table_wise": {"new8": table_wise(rank=0), "new16": table_wise(rank=1),
                   "pq": row_wise(), "full": table_wise(rank=1)},
    "data_parallel": {"new8": data_parallel(), "new16": data_parallel(),
                      "pq": column_wise(ranks=[0, 1]), "full": data_parallel()},
    "mixed": {"new8": data_parallel(), "new16": table_wise(rank=0), "pq": table_wise(rank=1),
              "full": row_wise()},
}


def _steps_match(rank: int, world_size: int) -> None:
    for plan_name, plan in PLANS.items():
        for fused in (False, True):
            reference = build_qebc()
            sharder = QuantizedEmbeddingBagCollectionSharder(fused_params={
                "optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5} if fused else None)
            dmp = shard(Model(build_qebc()), plan, world_size, sharder)
            label = f"{plan_name}{' fused' if fused else ''}"
            ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
            opt = torch.optim.SGD(dmp.parameters(), lr=0.5)  # fused: steps what has a .grad
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            for step in range(2):
                local, kjt = rank_batch(rank, seed=step + 1), global_batch(world_size, seed=step + 1)
                ref_out, out = reference(kjt), dmp(local)
                for key, value in out.to_dict().items():
                    close(value, ref_out.to_dict()[key][rows], f"{label} forward {step}: {key}")
                ref_opt.zero_grad()
                opt.zero_grad()
                mean_loss(ref_out, slice(0, world_size * BATCH)).backward()
                mean_loss(out, rows).backward()
                ref_opt.step()
                opt.step()  # fused: the model-parallel parameters were stepped in backward
            expected = {f"qebc.{k}": v for k, v in reference.state_dict().items()}
            assert_state_matches(dmp.state_dict(), expected, f"{label} after 2 steps")
            fallback = reference.embedding_bags["new8"].fallback
            assert not torch.equal(fallback, build_qebc().embedding_bags["new8"].fallback)


def test_tables_with_fallbacks_shard_table_wise_and_data_parallel_like_the_unsharded_module():
    run_on_ranks(_steps_match)


def _checkpoint_and_refusals(rank: int, world_size: int, path: str) -> None:
    dmp = shard(Model(build_qebc()), PLANS["table_wise"], world_size)
    state = dmp.state_dict()
    assert isinstance(state["qebc.embedding_bags.new8.fallback"], ShardedTensor)
    dcp.save(state, checkpoint_id=f"{path}/ckpt")
    target = shard(Model(build_qebc(device=torch.device("meta"))), PLANS["mixed"], world_size)
    loaded = target.state_dict()
    dcp.load(loaded, checkpoint_id=f"{path}/ckpt")
    target.load_state_dict(loaded)
    assert_state_matches(target.state_dict(), {f"qebc.{k}": v for k, v in build_qebc().state_dict().items()},
                         "loaded into another plan")
    for bad, kind, sharding in [("new8", "row_wise", row_wise()),
                                ("new16", "column_wise", column_wise(ranks=[0, 1]))]:
        plan = dict(PLANS["table_wise"], **{bad: sharding})
        with pytest.raises(ValueError, match=f"table '{bad}': sharding type '{kind}' is not "
                                             "supported for a table with a fallback"):
            shard(Model(build_qebc()), plan, world_size)
    # The planner, told the constraints, plans fallback tables table-wise or data-parallel.
    qebc = build_qebc(device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                       constraints=new_id_constraints(qebc))
    plan = planner.collective_plan(Model(qebc), [QuantizedEmbeddingBagCollectionSharder()],
                                   dist.GroupMember.WORLD)
    for name in ("new8", "new16"):
        assert plan.plan["qebc"][name].sharding_type in ("table_wise", "data_parallel"), plan


def test_checkpoint_reshards_and_row_or_column_wise_fallback_tables_are_refused(tmp_path):
    run_on_ranks(_checkpoint_and_refusals, str(tmp_path))
    model = Model(QuantizedEmbeddingBagCollection(tables()))
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # one process, no process group
    model.load_state_dict(state)
    for key, value in Model(build_qebc()).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
