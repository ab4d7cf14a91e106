"""State of a sharded QEBC on gloo ranks: names, initialisation from meta, and checkpoints of the
module and its fused optimizer through torch.distributed.checkpoint across world sizes and plans,
each compared with the unsharded module (trained with the same torch optimizer)."""
from typing import Any, Dict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise
from torchrec.distributed.types import ShardedTensor
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_mec import QuantizedEmbeddingBagCollection
from torchrec_mec.distributed import QuantizedEmbeddingBagCollectionSharder

from tests.distributed.multiprocess import run_on_ranks
from tests.distributed.test_sharded_qebc import (
    BATCH,
    PLANS,
    Model,
    assert_state_matches,
    build_qebc,
    close,
    global_batch,
    mean_loss,
    rank_batch,
    shard,
    tables,
)

KEYS = {"qebc.embedding_bags.pq8.codes", "qebc.embedding_bags.pq8.codebooks",
        "qebc.embedding_bags.pq16.codes", "qebc.embedding_bags.pq16.codebooks",
        "qebc.embedding_bags.full.weight"}
PARAMETER_KEYS = {k for k in KEYS if not k.endswith(".codes")}


# -- names -----------------------------------------------------------------------------------
def _names_are_state_dict_keys(rank: int, world_size: int) -> None:
    for plan_name in ["data_parallel", "table_wise", "row_wise", "column_wise", "mixed"]:
        dmp = shard(Model(build_qebc()), PLANS[plan_name], world_size)
        state = dmp.state_dict()
        assert set(state) == KEYS, (plan_name, sorted(state))
        params = dict(dmp.named_parameters())
        buffers = dict(dmp.named_buffers())
        assert set(params) == PARAMETER_KEYS, (plan_name, sorted(params))
        assert set(buffers) == KEYS - PARAMETER_KEYS, (plan_name, sorted(buffers))
        # the plain nn.Module walk (DDP's, an optimizer's) reaches each tensor under that name only
        walked = [n for n, _ in dmp.module.named_parameters(remove_duplicate=False)]
        walked += [n for n, _ in dmp.module.named_buffers(remove_duplicate=False)]
        assert sorted(walked) == sorted(KEYS), (plan_name, walked)
        for key, param in params.items():  # the named tensor is what the state dict holds
            value = state[key]
            local = value.local_shards() if isinstance(value, ShardedTensor) else [value]
            if param.numel():
                assert sum(t.numel() if isinstance(t, torch.Tensor) else t.tensor.numel()
                           for t in local) == param.numel(), (plan_name, key)


def test_parameter_and_buffer_names_are_the_state_dict_keys() -> None:
    run_on_ranks(_names_are_state_dict_keys)


# -- initialisation from meta ------------------------------------------------------------------
def _meta_initialises_as_eager(rank: int, world_size: int) -> None:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    torch.manual_seed(5)
    unsharded = QuantizedEmbeddingBagCollection(tables())  # initial values, not randomized
    reference = {f"qebc.{k}": v for k, v in unsharded.state_dict().items()}
    ref_out = unsharded(global_batch(world_size, False)).to_dict()
    for plan_name in ["mixed", "row_wise", "data_parallel"]:
        for device in ["cpu", "meta"]:
            torch.manual_seed(5)
            dmp = shard(Model(QuantizedEmbeddingBagCollection(tables(), device=torch.device(device))),
                        PLANS[plan_name], world_size)
            label = f"{plan_name}, built on {device}"
            assert_state_matches(dmp.state_dict(), reference, label)
            for key, value in dmp(rank_batch(rank, False)).to_dict().items():
                close(value, ref_out[key][rows], f"{label}: forward {key}")
            dmp.module.qebc.reset_parameters()
            assert_state_matches(dmp.state_dict(), reference, f"{label}, reset")

    # A whole DLRM on meta: DMP shards the QEBC and initialises the dense layers itself.
    torch.manual_seed(5)
    qebc = QuantizedEmbeddingBagCollection(tables(), device=torch.device("meta"))
    model = DLRM(embedding_bag_collection=qebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                 over_arch_layer_sizes=[8, 1], dense_device=torch.device("meta"))
    sharders = [QuantizedEmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(Topology(world_size=world_size, compute_device="cpu")).collective_plan(
        model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    state = dmp.state_dict()
    assert all(v.device.type == "cpu" for k, v in state.items() if not isinstance(v, ShardedTensor))
    assert_state_matches({k: v for k, v in state.items() if ".embedding_bag_collection." in k},
                         {f"sparse_arch.embedding_bag_collection.{k}": v
                          for k, v in unsharded.state_dict().items()}, "DLRM on meta")
    logits = dmp(torch.randn(BATCH, 4), rank_batch(rank, False))
    assert logits.shape == (BATCH, 1) and torch.isfinite(logits).all()


def test_a_qebc_built_on_meta_shards_into_the_values_of_one_built_eagerly() -> None:
    run_on_ranks(_meta_initialises_as_eager)


# -- checkpoints of the module and its fused optimizer: 2 ranks -> 1 -> 2, and 2 -> 2 ----------
LR = 0.01
SEED = 3
# Model-parallel plans (data-parallel tables are trained by the dense optimizer, not the fused one)
FUSED_PLANS = {
    "A": {"pq8": column_wise(ranks=[0, 1, 0, 1]), "pq16": row_wise(), "full": table_wise(rank=1)},
    "B": {"pq8": row_wise(), "pq16": column_wise(ranks=[1, 0]), "full": column_wise(ranks=[0, 1])},
    "C": {"pq8": table_wise(rank=1), "pq16": table_wise(rank=0), "full": row_wise()},
    "one": {"pq8": table_wise(rank=0), "pq16": row_wise(), "full": column_wise(ranks=[0, 0])},
}


def reference_after(steps: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """The unsharded module trained by torch's Adam on the global batches of ``steps`` steps:
    per state key, its value and its Adam state."""
    torch.manual_seed(SEED)
    model = Model(QuantizedEmbeddingBagCollection(tables()))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(steps):
        opt.zero_grad()
        mean_loss(model(global_batch(2, False, seed=10 + step)), slice(0, 2 * BATCH)).backward()
        opt.step()
    out = {k: {"value": v} for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        fresh = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                 "exp_avg_sq": torch.zeros_like(param)}  # Adam's state before its first step
        out[name].update({k: v.clone() for k, v in (opt.state[param] or fresh).items()})
    return out


def sharded_model(plan_name: str, world_size: int) -> DistributedModelParallel:
    """On meta: the shards start from the reference's initial values (same seed)."""
    torch.manual_seed(SEED)
    qebc = QuantizedEmbeddingBagCollection(tables(), device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.Adam, qebc.parameters(), {"lr": LR})
    return shard(Model(qebc), FUSED_PLANS[plan_name], world_size)


def train_step(dmp: DistributedModelParallel, rank: int, world_size: int, step: int) -> None:
    if world_size == 1:  # one process trains on the global batch
        mean_loss(dmp(global_batch(2, False, seed=10 + step)), slice(0, 2 * BATCH)).backward()
    else:
        mean_loss(dmp(rank_batch(rank, False, seed=10 + step)), slice(rank * BATCH, (rank + 1) * BATCH)).backward()


def assert_matches_reference(dmp: DistributedModelParallel, steps: int, label: str) -> None:
    reference = reference_after(steps)
    assert_state_matches(dmp.state_dict(), {k: v["value"] for k, v in reference.items()}, label)
    state = dmp.fused_optimizer.state_dict()["state"]
    assert set(state) <= set(reference)
    for key, opt_state in state.items():
        assert set(opt_state) == {"step", "exp_avg", "exp_avg_sq"}, (label, key, sorted(opt_state))
        for name, value in opt_state.items():
            assert_state_matches({name: value}, {name: reference[key][name]}, f"{label}: {key} {name}")


def checkpoint(dmp: DistributedModelParallel) -> Dict[str, Any]:
    return {"model": dmp.state_dict(), "optimizer": dmp.fused_optimizer.state_dict()}


def restore(dmp: DistributedModelParallel, path: str) -> None:
    state = checkpoint(dmp)
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optimizer"])


def _save_on_two(rank: int, world_size: int, path: str) -> None:
    dmp = sharded_model("A", world_size)
    assert_matches_reference(dmp, 0, "plan A before training")  # state exists before a step
    train_step(dmp, rank, world_size, 0)
    assert_matches_reference(dmp, 1, "plan A after a step")
    dcp.save(checkpoint(dmp), checkpoint_id=f"{path}/two")


def _load_on_one_and_save(rank: int, world_size: int, path: str) -> None:
    dmp = sharded_model("one", world_size)
    restore(dmp, f"{path}/two")
    assert_matches_reference(dmp, 1, "2 ranks -> 1")
    train_step(dmp, rank, world_size, 1)
    assert_matches_reference(dmp, 2, "2 ranks -> 1, then a step")
    dcp.save(checkpoint(dmp), checkpoint_id=f"{path}/one")


def _load_on_two(rank: int, world_size: int, path: str) -> None:
    for plan_name, source, steps in [("B", "two", 1), ("C", "one", 2)]:
        dmp = sharded_model(plan_name, world_size)
        restore(dmp, f"{path}/{source}")
        label = f"{source} -> plan {plan_name} on 2 ranks"
        assert_matches_reference(dmp, steps, label)
        train_step(dmp, rank, world_size, steps)
        assert_matches_reference(dmp, steps + 1, f"{label}, then a step")


def test_module_and_fused_optimizer_state_reshard_through_dcp(tmp_path) -> None:
    run_on_ranks(_save_on_two, str(tmp_path))
    run_on_ranks(_load_on_one_and_save, str(tmp_path), world_size=1)
    run_on_ranks(_load_on_two, str(tmp_path))
