"""MEC's quantizer against faiss-cpu's ProductQuantizer (k-means PQ) on the same tables.

Both run in this process on the same tables with the same M and K; the table printed has, per
case: training + encoding time of each and their ratio, reconstruction MSE (per element) over
all ids, the top 1% by count ("popular") and the bottom 50% ("rare"), the popularity-weighted
MSE, and code usage (mean perplexity per codebook, dead codewords).

    PYTHONPATH=. .venv/bin/python benchmarks/quantizer.py                 # 1M x 64
    PYTHONPATH=. .venv/bin/python benchmarks/quantizer.py --ablation      # + each part off
    PYTHONPATH=. .venv/bin/python benchmarks/quantizer.py --rows 10000000 # the 10M x 64 case
    PYTHONPATH=. .venv/bin/python benchmarks/quantizer.py --driver        # 1 vs 2 processes
    PYTHONPATH=. .venv/bin/python benchmarks/quantizer.py --search        # nearest codewords

The synthetic table imitates a trained CTR table: ids have power-law (Zipf) counts; an id's
row is its cluster's centre scaled by how well it was trained (log of its count) plus noise,
so popular ids are spread out and rare ids sit near the initialisation (small, noisy).
"""
import argparse
import dataclasses
import math
import os
import socket
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchrec_mec.quantize import MECConfig, popularity_weights, quantize_table, quantize_tables
from torchrec_mec.quantize.quantize_table import POPULAR_FRACTION, RARE_FRACTION


def synthetic_table(
    rows: int, dim: int, seed: int = 0, clusters: int = 4096, zipf: float = 1.1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [rows, dim] float32, counts [rows] int64): clustered rows, Zipf counts."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(rows, generator=g).double() + 1
    counts = torch.poisson(1e7 * rank.pow(-zipf) / rank.pow(-zipf).sum() * 50, generator=g).long()
    trained = (torch.log1p(counts.double()) / math.log1p(float(counts.max()))).float()
    centres = torch.randn(clusters, dim, generator=g)
    weight = torch.empty(rows, dim)
    for start in range(0, rows, 1 << 20):  # chunked: keeps the 10M case within memory
        end = min(rows, start + (1 << 20))
        c = torch.randint(clusters, (end - start,), generator=g)
        noise = torch.randn(end - start, dim, generator=g)
        weight[start:end] = 0.05 * (trained[start:end, None] * centres[c] + 0.3 * noise)
    return weight, counts


def evaluate(weight: torch.Tensor, counts: torch.Tensor, decoded_fn: Callable,
             codes: torch.Tensor, k: int) -> Dict[str, float]:
    """The same statistics for any quantizer: ``decoded_fn(start, end)`` gives decoded rows."""
    n = weight.shape[0]
    err = torch.empty(n)
    for start in range(0, n, 1 << 18):
        end = min(n, start + (1 << 18))
        err[start:end] = (weight[start:end] - decoded_fn(start, end)).pow(2).mean(1)
    order = torch.argsort(counts, stable=True)
    popular = order[n - max(1, math.ceil(POPULAR_FRACTION * n)):]
    rare = order[: max(1, int(RARE_FRACTION * n))]
    pop = popularity_weights(counts).double()
    perplexity, dead = [], 0
    for m in range(codes.shape[1]):
        use = torch.bincount(codes[:, m].long(), minlength=k).double()
        p = use[use > 0] / n
        perplexity.append(float(torch.exp(-(p * p.log()).sum())))
        dead += int((use == 0).sum())
    return {
        "mse": float(err.double().mean()),
        "popular": float(err[popular].double().mean()),
        "rare": float(err[rare].double().mean()),
        "weighted": float((err.double() * pop).sum() / pop.sum()),
        "perplexity": sum(perplexity) / len(perplexity),
        "dead": dead,
    }


def run_faiss(weight: torch.Tensor, counts: torch.Tensor, m: int, k: int) -> Tuple[float, Dict]:
    import faiss

    x = weight.numpy()
    started, cpu = time.perf_counter(), time.process_time()
    pq = faiss.ProductQuantizer(x.shape[1], m, int(math.log2(k)))
    pq.train(x)
    codes = pq.compute_codes(x)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    codes_t = torch.from_numpy(_unpack(codes, m, k))

    def decoded(start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(pq.decode(codes[start:end]))

    return seconds, cpu, evaluate(weight, counts, decoded, codes_t, k)


def _unpack(codes: np.ndarray, m: int, k: int) -> np.ndarray:
    if k == 256:
        return codes.astype(np.int64)
    bits = int(math.log2(k))
    flat = np.unpackbits(codes, axis=1, bitorder="little")[:, : m * bits]
    return (flat.reshape(-1, m, bits) << np.arange(bits)).sum(-1)


def run_mec(weight: torch.Tensor, counts: torch.Tensor, config: MECConfig,
            progress: bool) -> Tuple[float, float, Dict, Dict]:
    started, cpu = time.perf_counter(), time.process_time()
    res = quantize_table(weight, counts, config, name="bench", progress=progress)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    m = config.num_subspaces
    cb = res.codebooks

    def decoded(start: int, end: int) -> torch.Tensor:
        return cb[torch.arange(m), res.codes[start:end].long()].flatten(1)

    extra = {"epochs": res.stats.epochs_run, "best": res.stats.best_epoch}
    return seconds, cpu, evaluate(weight, counts, decoded, res.codes, config.codebook_size), extra


def _driver_tables(rows: int, dim: int, count: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    return {f"t{i}": synthetic_table(rows, dim, seed=i) for i in range(count)}


def _driver_rank(rank: int, world_size: int, port: int, args: argparse.Namespace,
                 out_dir: str, seconds: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    tables = _driver_tables(args.rows, args.dim, args.tables)
    dist.barrier()
    started, cpu = time.perf_counter(), time.process_time()
    quantize_tables(tables, MECConfig(epochs=args.epochs), out_dir, min_rows=0, progress=False)
    seconds.put((time.perf_counter() - started, time.process_time() - cpu))
    dist.destroy_process_group()


def driver_benchmark(args: argparse.Namespace) -> None:
    """quantize_tables over equal tables: one process, then 2 processes, same threads each."""
    torch.set_num_threads(args.threads_per_rank)
    tables = _driver_tables(args.rows, args.dim, args.tables)
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        started, cpu = time.perf_counter(), time.process_time()
        quantize_tables(tables, MECConfig(epochs=args.epochs), one, min_rows=0, progress=False)
        single, single_cpu = time.perf_counter() - started, time.process_time() - cpu
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_driver_rank, args=(2, port, args, two, queue), nprocs=2,
                           start_method="spawn")
        ranks = [queue.get() for _ in range(2)]
    wall = max(r[0] for r in ranks)
    print(f"{args.tables} tables of {args.rows:,} x {args.dim}, {args.threads_per_rank} "
          f"thread(s) per process: 1 process {single:.1f}s (cpu {single_cpu:.1f}s); "
          f"2 processes {wall:.1f}s (cpu per rank "
          f"{', '.join(f'{r[1]:.1f}s' for r in ranks)}); speed-up {single / wall:.2f}x")


def search_benchmark(args: argparse.Namespace) -> None:
    """The nearest-codeword search (``nearest_codewords``: cache-sized blocks, ``min``) against
    the same search in blocks of ``SEARCH_BUDGET`` floats with ``argmin`` (what it was), on
    the same rows and codebooks; the codes must agree."""
    from torchrec_mec.quantize.kmeans import SEARCH_BUDGET, nearest_codewords

    def large_blocks(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        m, k, d = codebooks.shape
        rows = max(1, SEARCH_BUDGET // (m * k))
        cb_t, cb_sq = codebooks.transpose(1, 2), codebooks.pow(2).sum(-1).unsqueeze(1)
        out = torch.empty(x.shape[0], m, dtype=torch.long)
        for start in range(0, x.shape[0], rows):
            xs = x[start:start + rows].view(-1, m, d).transpose(0, 1)
            out[start:start + rows] = torch.baddbmm(cb_sq, xs, cb_t, alpha=-2.0).argmin(-1).T
        return out

    g = torch.Generator().manual_seed(0)
    print(f"{'M x K, D':<16} {'before ms':>10} {'after ms':>10} {'speed-up':>9}")
    for case in args.cases.split(","):
        m, k = (int(v) for v in case.split("x"))
        x = torch.randn(args.rows, args.dim, generator=g)
        codebooks = torch.randn(m, k, args.dim // m, generator=g)
        times = {}
        for name, fn in (("before", large_blocks), ("after", nearest_codewords)):
            fn(x[:4096], codebooks)
            started = time.perf_counter()
            codes = fn(x, codebooks)
            times[name] = (time.perf_counter() - started) * 1000
            if name == "before":
                reference = codes
        assert torch.equal(codes, reference)
        print(f"{m} x {k}, {args.dim:<8} {times['before']:>10.0f} {times['after']:>10.0f} "
              f"{times['before'] / times['after']:>8.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cases", default="4x256,8x256", help="comma-separated MxK")
    p.add_argument("--ablation", action="store_true",
                   help="also run MEC with each part off (first case only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--driver", action="store_true",
                   help="time quantize_tables on --tables equal tables, 1 vs 2 processes")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--epochs", type=int, default=MECConfig.epochs, help="most epochs of MEC")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--search", action="store_true",
                   help="time the nearest-codeword search alone, before and after blocking")
    args = p.parse_args()
    if args.driver:
        driver_benchmark(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.search:
        search_benchmark(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
        if not args.no_faiss:
            import faiss

            faiss.omp_set_num_threads(args.threads)

    t = time.perf_counter()
    weight, counts = synthetic_table(args.rows, args.dim)
    print(f"table {args.rows:,} x {args.dim}: generated in {time.perf_counter() - t:.1f}s, "
          f"{torch.get_num_threads()} torch threads, variance {float(weight.var()):.3e}")
    header = (f"{'case':<28} {'time s':>8} {'cpu s':>8} {'x faiss':>7} {'mse':>9} {'popular':>9} "
              f"{'rare':>9} {'weighted':>9} {'perplex':>7} {'dead':>5} {'epochs':>6}")
    print(header)
    print("-" * len(header))
    for case in args.cases.split(","):
        m, k = (int(v) for v in case.split("x"))
        base = MECConfig(num_subspaces=m, codebook_size=k, epochs=args.epochs)
        variants: List[Tuple[str, MECConfig]] = [("MEC", base)]
        if args.ablation and case == args.cases.split(",")[0]:
            variants += [
                ("  published weighting", dataclasses.replace(base, weighting="published")),
                ("  uniform weighting", dataclasses.replace(base, weighting="uniform")),
                ("  no usage reg", dataclasses.replace(base, reg_weight=0.0)),
                ("  usage reg x10", dataclasses.replace(base, reg_weight=base.reg_weight * 10)),
                ("  no contrastive", dataclasses.replace(base, contrastive_weight=0.0)),
                ("  no encoder", dataclasses.replace(base, encoder="none")),
            ]
        faiss_s = None
        if not args.no_faiss:
            faiss_s, cpu, st = run_faiss(weight, counts, m, k)
            _row(f"M={m} K={k} faiss PQ", faiss_s, cpu, None, st, "")
        for label, cfg in variants:
            s, cpu, st, extra = run_mec(weight, counts, cfg, args.progress)
            ratio = s / faiss_s if faiss_s else None
            _row(f"M={m} K={k} {label}" if label == "MEC" else label, s, cpu, ratio, st,
                 f"{extra['epochs']}/{extra['best']}")


def _row(label: str, seconds: float, cpu: float, ratio, st: Dict, epochs: str) -> None:
    r = f"{ratio:7.1f}" if ratio is not None else f"{'':>7}"
    print(f"{label:<28} {seconds:8.1f} {cpu:8.1f} {r} {st['mse']:9.3e} {st['popular']:9.3e} "
          f"{st['rare']:9.3e} {st['weighted']:9.3e} {st['perplexity']:7.1f} {st['dead']:5d} "
          f"{epochs:>6}", flush=True)


if __name__ == "__main__":
    main()
