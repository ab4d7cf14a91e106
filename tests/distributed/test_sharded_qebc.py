"""ShardedQuantizedEmbeddingBagCollection on 2 gloo ranks against the unsharded QEBC.

Every rank builds the same unsharded QEBC and the same global batch; it feeds its half of the
batch to the sharded module and checks it against the unsharded module fed the whole batch.
Loss: per rank, the mean over its bags; reference: the mean over the global batch (TorchRec
divides model-parallel gradients by the world size and DDP averages, so the two agree).
"""
import doctest
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import (
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
    ShardedEmbeddingTable,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan, ShardMetadata
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.distributed import QuantizedEmbeddingBagCollectionSharder
from torchrec_mec.distributed import embedding_lookup as embedding_lookup_module
from torchrec_mec.distributed import fused_optimizer as fused_optimizer_module
from torchrec_mec.distributed import planner as planner_module
from torchrec_mec.distributed import quantized_embeddingbag as quantized_embeddingbag_module
from torchrec_mec.distributed.embedding_lookup import QuantizedShardsLookup

from tests.distributed.multiprocess import run_on_ranks
from tests.qebc_testing import randomize_

BATCH = 6  # per rank
TOL = dict(rtol=1e-6, atol=1e-6)


def tables(weighted: bool = False) -> List[QuantizedEmbeddingBagConfig]:
    return [
        # uint8 codes, two features
        QuantizedEmbeddingBagConfig(name="pq8", num_embeddings=40, embedding_dim=8,
                                    feature_names=["a", "b"], num_subspaces=4, codebook_size=16),
        # uint16 codes, MEAN pooling (SUM when weighted)
        QuantizedEmbeddingBagConfig(name="pq16", num_embeddings=300, embedding_dim=8,
                                    feature_names=["c"], num_subspaces=2, codebook_size=300,
                                    pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
        QuantizedEmbeddingBagConfig(name="full", num_embeddings=20, embedding_dim=8,
                                    feature_names=["d"]),
    ]


def build_qebc(weighted: bool = False, device: Optional[torch.device] = None) -> QuantizedEmbeddingBagCollection:
    qebc = QuantizedEmbeddingBagCollection(tables(weighted), is_weighted=weighted, device=device)
    if device is not None and device.type == "meta":
        return qebc
    return randomize_(qebc, seed=0)


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


def close(actual: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{label}\n{m}")


def assert_state_matches(sharded: Dict, reference: Dict, label: str) -> None:
    """Each local part of the sharded state equals the same part of the unsharded state."""
    assert set(sharded) == set(reference), (label, sorted(sharded), sorted(reference))
    for key, value in sharded.items():
        if isinstance(value, ShardedTensor):
            for s in value.local_shards():
                where = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))
                close(s.tensor, reference[key][where], f"{label}: {key}")
        else:
            close(value, reference[key], f"{label}: {key}")


def _train_step_matches(rank: int, world_size: int, plan_name: str, weighted: bool) -> None:
    reference = build_qebc(weighted)
    dmp = shard(Model(build_qebc(weighted)), PLANS[plan_name], world_size)
    local, rows = rank_batch(rank, weighted), slice(rank * BATCH, (rank + 1) * BATCH)
    kjt = global_batch(world_size, weighted)

    ref_out = reference(kjt)
    out = dmp(local)
    for key, value in out.to_dict().items():
        close(value, ref_out.to_dict()[key][rows], f"{plan_name} forward: {key}")

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.5)
    mean_loss(ref_out, slice(0, world_size * BATCH)).backward()
    mean_loss(out, rows).backward()
    ref_opt.step()
    opt.step()
    assert_state_matches(dmp.state_dict(), {f"qebc.{k}": v for k, v in reference.state_dict().items()},
                         f"{plan_name} after a step")

    second = dmp(local).to_dict()
    ref_second = reference(kjt).to_dict()
    for key, value in second.items():
        close(value, ref_second[key][rows], f"{plan_name} second forward: {key}")


def _every_plan_matches(rank: int, world_size: int) -> None:
    for plan_name in ["data_parallel", "table_wise", "row_wise", "column_wise"]:
        _train_step_matches(rank, world_size, plan_name, weighted=False)
    _train_step_matches(rank, world_size, "mixed", weighted=True)


def test_every_sharding_type_matches_unsharded_forward_step_and_second_forward() -> None:
    run_on_ranks(_every_plan_matches)


# -- DLRM under DMP, with the optimizer fused the two ways TorchRec users ask for it ---------
LR = 0.1


def build_dlrm(qebc: QuantizedEmbeddingBagCollection) -> DLRM:
    torch.manual_seed(3)
    return DLRM(embedding_bag_collection=qebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                over_arch_layer_sizes=[8, 1])


def dlrm_batch(ranks: List[int], step: int) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Dense features, sparse features and labels of the given ranks' bags, concatenated."""
    dense, labels = [], []
    for r in ranks:
        gen = torch.Generator().manual_seed(1000 * step + r)
        dense.append(torch.randn(BATCH, 4, generator=gen))
        labels.append(torch.randint(0, 2, (BATCH,), generator=gen).float())
    if len(ranks) == 1:
        kjt = rank_batch(ranks[0], False, seed=step + 2)
    else:
        kjt = global_batch(len(ranks), False, seed=step + 2)
    return torch.cat(dense), kjt, torch.cat(labels)


def _dlrm_matches(rank: int, world_size: int) -> None:
    for how in ["apply_optimizer_in_backward", "fused_params"]:
        reference = build_dlrm(build_qebc())
        ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
        model = build_dlrm(build_qebc())
        qebc = model.sparse_arch.embedding_bag_collection
        if how == "apply_optimizer_in_backward":
            apply_optimizer_in_backward(torch.optim.SGD, qebc.parameters(), {"lr": LR})
            sharder = QuantizedEmbeddingBagCollectionSharder()
            plan = ShardingPlan({"sparse_arch.embedding_bag_collection": construct_module_sharding_plan(
                qebc, PLANS["mixed"], sharder=sharder, local_size=world_size, world_size=world_size,
                device_type="cpu")})
        else:
            sharder = QuantizedEmbeddingBagCollectionSharder(
                fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
            planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"))
            plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                       device=torch.device("cpu"), plan=plan, sharders=[sharder])
        dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                          lambda params: torch.optim.SGD(params, lr=LR))
        opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for step in range(3):
            dense, kjt, labels = dlrm_batch([rank], step)
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(dmp(dense, kjt).squeeze(1), labels).backward()
            opt.step()
            dense, kjt, labels = dlrm_batch(list(range(world_size)), step)
            ref_opt.zero_grad()
            F.binary_cross_entropy_with_logits(reference(dense, kjt).squeeze(1), labels).backward()
            ref_opt.step()
        assert_state_matches(dmp.state_dict(), reference.state_dict(), f"DLRM ({how}) after 3 steps")
        dense, kjt, _ = dlrm_batch([rank], 3)
        global_dense, global_kjt, _ = dlrm_batch(list(range(world_size)), 3)
        close(dmp(dense, kjt), reference(global_dense, global_kjt)[rows], f"DLRM ({how}) logits")


def test_dlrm_trained_under_dmp_matches_single_process_training() -> None:
    run_on_ranks(_dlrm_matches)


# -- checkpoints: saved by 2 ranks, loaded into 2 ranks sharded otherwise and into 1 -----------
def _save_and_reload(rank: int, world_size: int, path: str) -> None:
    dmp = shard(Model(build_qebc()), PLANS["mixed"], world_size)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.5)  # a step, so that the state is not the init
    mean_loss(dmp(rank_batch(rank, False)), slice(0, BATCH)).backward()
    opt.step()
    saved = dmp.state_dict()
    dcp.save(saved, checkpoint_id=f"{path}/ckpt")
    expected = {}
    for key, value in saved.items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        expected[key] = value
    if rank == 0:
        torch.save(expected, f"{path}/expected.pt")
    dist.barrier()
    expected = torch.load(f"{path}/expected.pt")
    out = dmp(rank_batch(rank, False)).to_dict()
    for plan_name in ["row_wise", "column_wise"]:
        target = shard(Model(build_qebc(device=torch.device("meta"))), PLANS[plan_name], world_size)
        state = target.state_dict()
        dcp.load(state, checkpoint_id=f"{path}/ckpt")
        target.load_state_dict(state)
        assert_state_matches(target.state_dict(), expected, f"checkpoint loaded {plan_name}")
        for key, value in target(rank_batch(rank, False)).to_dict().items():
            close(value, out[key], f"forward after loading {plan_name}: {key}")


def test_checkpoint_from_2_ranks_loads_into_2_ranks_resharded_and_into_1_unsharded(tmp_path) -> None:
    run_on_ranks(_save_and_reload, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    model = Model(build_qebc(weighted=False))  # other values than the checkpoint's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # one process, no process group
    model.load_state_dict(state)
    assert set(model.state_dict()) == set(expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# -- planner -----------------------------------------------------------------------------------
def criteo_like_tables() -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name="big8", num_embeddings=200_000, embedding_dim=64,
                                    feature_names=["f0"], num_subspaces=8, codebook_size=256),
        QuantizedEmbeddingBagConfig(name="big16", num_embeddings=200_000, embedding_dim=64,
                                    feature_names=["f1"], num_subspaces=16, codebook_size=1024),
        QuantizedEmbeddingBagConfig(name="small", num_embeddings=1_000, embedding_dim=64,
                                    feature_names=["f2"]),
    ]


def test_planner_storage_per_table_is_the_memory_report() -> None:
    qebc = QuantizedEmbeddingBagCollection(criteo_like_tables(), device=torch.device("meta"))
    topology = Topology(world_size=2, compute_device="cpu")
    # Parameters only (inference mode leaves out optimizer state and input/output buffers).
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=512,
                                     estimator=[EmbeddingStorageEstimator(topology, is_inference=True)])
    options = enumerator.enumerate(Model(qebc), [QuantizedEmbeddingBagCollectionSharder()])
    report = qebc.memory_report().tables
    assert {so.sharding_type for so in options} == {"data_parallel", "table_wise", "row_wise", "column_wise"}
    for so in options:
        want = report[so.name].total_bytes
        stored = [shard.storage.ddr for shard in so.shards]
        if so.sharding_type == "data_parallel":
            assert stored == [want] * 2, (so.name, stored, want)
        else:  # split in proportion to the shards' sizes, rounded up per shard
            assert want <= sum(stored) < want + len(stored), (so.name, so.sharding_type, stored, want)
    assert report["big8"].total_bytes == 200_000 * 8 + 256 * 64 * 4
    assert report["big16"].total_bytes == 200_000 * 16 * 2 + 1024 * 64 * 4


def test_planner_fits_compressed_tables_where_full_ones_do_not() -> None:
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=40 * 2**20)  # 2 x 40 MiB
    full = EmbeddingBagCollection([EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings,
                                                      embedding_dim=c.embedding_dim,
                                                      feature_names=c.feature_names)
                                   for c in criteo_like_tables()], device=torch.device("meta"))
    with pytest.raises(PlannerError):  # 2 x 51 MB of float32 rows
        EmbeddingShardingPlanner(topology=topology).plan(Model(full), [EmbeddingBagCollectionSharder()])
    qebc = QuantizedEmbeddingBagCollection(criteo_like_tables(), device=torch.device("meta"))
    plan = EmbeddingShardingPlanner(topology=topology).plan(
        Model(qebc), [QuantizedEmbeddingBagCollectionSharder()])
    assert set(plan.plan["qebc"]) == {"big8", "big16", "small"}


# -- in-process checks -------------------------------------------------------------------------
def test_column_shard_off_subspace_boundaries_is_refused() -> None:
    qebc = build_qebc()
    shard = ShardedEmbeddingTable(
        name="pq8", num_embeddings=40, embedding_dim=8, feature_names=["a", "b"], local_rows=40,
        local_cols=3, compute_kernel=EmbeddingComputeKernel.DENSE,
        local_metadata=ShardMetadata(shard_offsets=[0, 0], shard_sizes=[40, 3], placement="rank:0/cpu"),
    )
    group = GroupedEmbeddingConfig(DataType.FP32, PoolingType.SUM, False, False,
                                   EmbeddingComputeKernel.DENSE, [shard])
    with pytest.raises(ValueError, match="multiples of 2"):
        QuantizedShardsLookup([group], qebc, torch.device("cpu"))


@pytest.mark.parametrize("module", [planner_module, fused_optimizer_module, embedding_lookup_module,
                                    quantized_embeddingbag_module])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted and not result.failed
