"""Sharded QEBC against TorchRec's sharded EBC: training-step throughput and bytes per rank.

Two gloo ranks on this machine (one thread each), per sharding type, the same tables and the same
hand-made plan type for both: a few Criteo-sized tables (1M rows, dim 64, one id per bag), which
the QEBC compresses with M = 8 subspaces of K = 256 codewords, and one small full table. A step
is forward, backward and an SGD update (fused in backward for model-parallel tables in both, the
dense optimizer for data-parallel ones). Bytes per rank: the table state each rank holds.

    PYTHONPATH=. .venv/bin/python benchmarks/sharded.py [--rows 1000000 --tables 3 --steps 30]
"""
import argparse
import json
import os
import socket
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.distributed import QuantizedEmbeddingBagCollectionSharder

SHARDING_TYPES = ["data_parallel", "table_wise", "row_wise", "column_wise"]
LR = 0.01
FUSED = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}


def configs(args: argparse.Namespace, compressed: bool) -> List[QuantizedEmbeddingBagConfig]:
    big = [
        QuantizedEmbeddingBagConfig(
            name=f"t{i}", num_embeddings=args.rows, embedding_dim=args.dim,
            feature_names=[f"f{i}"], num_subspaces=8 if compressed else 1,
            codebook_size=256 if compressed else 0,
        )
        for i in range(args.tables)
    ]
    small = QuantizedEmbeddingBagConfig(name="small", num_embeddings=10_000, embedding_dim=args.dim,
                                        feature_names=["fs"])
    return big + [small]


def plan_generator(sharding_type: str, index: int, world_size: int):  # type: ignore[no-untyped-def]
    # "fused": TorchRec's TBE with the optimizer in backward (its default kernel for
    # construct_module_sharding_plan would be "dense": a dense [N, D] gradient per table).
    if sharding_type == "data_parallel":
        return data_parallel()
    if sharding_type == "table_wise":
        return table_wise(rank=index % world_size, compute_kernel="fused")
    if sharding_type == "row_wise":
        return row_wise(compute_kernel="fused")
    return column_wise(ranks=list(range(world_size)), compute_kernel="fused")


class Model(nn.Module):
    def __init__(self, collection: nn.Module) -> None:
        super().__init__()
        self.collection = collection

    def forward(self, kjt: KeyedJaggedTensor, upstream: torch.Tensor) -> torch.Tensor:
        return (self.collection(kjt).values() * upstream).mean()


def build(kind: str, sharding_type: str, args: argparse.Namespace, world_size: int) -> DistributedModelParallel:
    tables = configs(args, compressed=kind == "qebc")
    if kind == "qebc":
        collection: nn.Module = QuantizedEmbeddingBagCollection(tables)
        sharder = QuantizedEmbeddingBagCollectionSharder(fused_params=FUSED)
    else:
        collection = EmbeddingBagCollection(
            [EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings,
                                embedding_dim=t.embedding_dim, feature_names=t.feature_names)
             for t in tables],
            device=torch.device("meta"),
        )
        sharder = EmbeddingBagCollectionSharder(fused_params=FUSED)
    per_table = {t.name: plan_generator(sharding_type, i, world_size) for i, t in enumerate(tables)}
    plan = construct_module_sharding_plan(collection, per_table, sharder=sharder,  # type: ignore[arg-type]
                                          local_size=world_size, world_size=world_size,
                                          device_type="cpu")
    return DistributedModelParallel(
        Model(collection), env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"), plan=ShardingPlan({"collection": plan}),
        sharders=[sharder],  # type: ignore[list-item]
    )


def batch(args: argparse.Namespace, rank: int, step: int) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(step * 10 + rank)
    rows = [args.rows] * args.tables + [10_000]
    keys = [f"f{i}" for i in range(args.tables)] + ["fs"]
    values = torch.cat([torch.randint(0, n, (args.batch,), generator=gen) for n in rows])
    return KeyedJaggedTensor.from_lengths_sync(keys, values, torch.ones(len(keys) * args.batch, dtype=torch.int64))


def bytes_held(dmp: DistributedModelParallel) -> int:
    total = 0
    for value in dmp.state_dict().values():
        parts = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results: Dict[str, Dict[str, object]] = {}
    batches = [batch(args, rank, s) for s in range(4)]
    upstream = torch.randn(args.batch, args.dim * (args.tables + 1))
    for sharding_type in SHARDING_TYPES:
        for kind in ["ebc", "qebc"]:
            dmp = build(kind, sharding_type, args, world_size)
            dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
            optims = [dmp.fused_optimizer]
            if dense:  # data-parallel tables
                optims.append(KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=LR)))
            opt = CombinedOptimizer(optims)
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    dist.barrier()
                    start = time.perf_counter()
                opt.zero_grad()
                dmp(batches[step % len(batches)], upstream).backward()
                opt.step()
            dist.barrier()
            elapsed = time.perf_counter() - start
            held = [0] * world_size
            dist.all_gather_object(held, bytes_held(dmp))
            results[f"{kind}/{sharding_type}"] = {"steps_per_s": args.steps / elapsed, "bytes": held}
            if rank == 0:
                print(f"{kind:5s} {sharding_type:14s} {args.steps / elapsed:7.2f} steps/s", flush=True)
            del dmp, dense, opt
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tables", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096, help="bags per rank and feature")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(run_rank, args=(world_size, free_port(), args, out), nprocs=world_size, join=True)
        with open(out) as f:
            results = json.load(f)
    mib = 2**20
    print(f"\n{args.tables} x {args.rows:,} x {args.dim} tables (QEBC: M=8, K=256) + 10k-row full table; "
          f"batch {args.batch}/rank, {world_size} gloo ranks x 1 thread")
    print("| sharding | EBC steps/s | QEBC steps/s | QEBC/EBC | EBC MiB per rank"
          " | QEBC MiB per rank | EBC/QEBC bytes |")
    print("|---|---|---|---|---|---|---|")
    for st in SHARDING_TYPES:
        e, q = results[f"ebc/{st}"], results[f"qebc/{st}"]
        eb, qb = e["bytes"], q["bytes"]
        print(f"| {st} | {e['steps_per_s']:.2f} | {q['steps_per_s']:.2f} | "
              f"{q['steps_per_s'] / e['steps_per_s']:.2f}x | "
              f"{' / '.join(f'{b / mib:.1f}' for b in eb)} | {' / '.join(f'{b / mib:.2f}' for b in qb)} | "
              f"{sum(eb) / sum(qb):.1f}x |")


if __name__ == "__main__":
    main()
