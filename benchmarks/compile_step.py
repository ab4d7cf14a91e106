"""CPU benchmark: a DLRM training step with a QEBC, ``torch.compile(fullgraph=True)`` against eager.

The model is ``torchrec_mec.models.build_model("dlrm")`` over the Criteo-shaped tables of
``benchmarks/lookup.py`` (26 features, rows capped, tables of at least 4096 rows product-quantized
with M=8, K=256, the others full), Zipf ids. One training step is forward, BCE loss, backward and
``torch.optim.SGD`` step; the compiled model is the same module (same parameters) behind
``torch.compile(model, fullgraph=True)`` with Inductor. Both run on the same batches, alternating
within each repeat (rotating order), after a warm-up that includes compiling; medians are printed
with their ratio.

    PYTHONPATH=. python benchmarks/compile_step.py --quick   # smoke test
    PYTHONPATH=. python benchmarks/compile_step.py           # the figures in docs/performance.md
"""
import argparse
import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.lookup import criteo_tables, make_batches
from torchrec_mec.models import ModelConfig, build_model


def training_step(call: Callable, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> None:
    logits = call(dense, kjt)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tables and batch")
    parser.add_argument("--ids-per-bag", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_cap, batch, repeats = (20_000, 256, 3) if args.quick else (1_600_000, 2048, args.repeats)
    dim, num_dense, num_batches = 64, 13, 4
    configs = criteo_tables(rows_cap, dim)
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}; 26 tables (rows capped at {rows_cap:,}, D={dim}, "
          f"{sum(c.compressed for c in configs)} compressed M=8 K=256), batch {batch}")
    print(f"{'ids/bag':>7} {'eager ms':>9} {'compiled ms':>11} {'eager/compiled':>14} "
          f"{'compile s':>9}")
    for ids_per_bag in args.ids_per_bag:
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(name="dlrm", embedding_dim=dim, dense_hidden_sizes=(256, 128),
                        over_hidden_sizes=(256, 128)),
            num_dense=num_dense, sparse_names=[f"f{i}" for i in range(len(configs))],
            num_embeddings={f"f{i}": c.num_embeddings for i, c in enumerate(configs)},
            compressed={f"t_f{i}": (c.num_subspaces, c.codebook_size)
                        for i, c in enumerate(configs) if c.compressed})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        batches = make_batches(configs, batch, ids_per_bag, num_batches, seed=ids_per_bag)
        gen = torch.Generator().manual_seed(ids_per_bag)
        dense = [torch.randn(batch, num_dense, generator=gen) for _ in range(num_batches)]
        labels = [torch.randint(0, 2, (batch,), generator=gen).float() for _ in range(num_batches)]
        compiled = torch.compile(model, fullgraph=True)
        calls: Dict[str, Callable] = {"eager": model, "compiled": compiled}
        times: Dict[str, List[float]] = {name: [] for name in calls}
        started = time.perf_counter()
        training_step(compiled, model, optimizer, dense[0], batches[0], labels[0])
        compile_s = time.perf_counter() - started
        for name, call in calls.items():  # warm-up
            training_step(call, model, optimizer, dense[1], batches[1], labels[1])
        names = list(calls)
        for r in range(repeats):
            for name in names[r % 2:] + names[:r % 2]:
                i = r % num_batches
                gc.collect()
                t0 = time.perf_counter()
                training_step(calls[name], model, optimizer, dense[i], batches[i], labels[i])
                times[name].append(time.perf_counter() - t0)
        eager, comp = (1e3 * statistics.median(times[n]) for n in names)
        print(f"{ids_per_bag:>7} {eager:>9.1f} {comp:>11.1f} {eager / comp:>13.2f}x "
              f"{compile_s:>9.0f}")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
