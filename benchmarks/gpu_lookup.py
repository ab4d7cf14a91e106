"""GPU lookup benchmark: the fused Triton PQ lookup against ``F.embedding_bag`` on the dense table.

The issue's case: a 50M x 128 float32 table (23.8 GiB) against its product-quantized form
(M=8 one-byte codes per row, K=256 codewords of 16 floats per subspace), batch 65,536, 20 ids per
bag, uniform and Zipf ids. In one run it

1. checks the Triton kernel against a float64 reference on fresh random inputs at the benchmark
   shape (variable bag lengths with empty bags; SUM, MEAN and per-id weights), every element of
   the pooled output (poisoned with NaN before the call, so an unwritten element fails) and of
   the codebook gradient, for every launch configuration it then times;
2. sweeps the kernels' launch configurations (bags per program, warps, ids per loop trip) on
   Zipf ids, forward and forward+backward, and keeps the fastest of each;
3. times, with CUDA events, interleaved, medians over three rotating id sets: ``F.embedding_bag``
   on the dense table, the Triton kernel (default and best configuration), the plain-PyTorch PQ
   lookup (one ``F.embedding_bag`` per subspace), the code gather alone; then forward+backward
   (dense: ``sparse=True`` gradients, the only kind that fits beside a 23.8 GiB table; PQ: the
   dense [M, K, D/M] codebook gradient); "spread" is the difference between the medians of the
   first and second half of the repeats, as a share of the median (a smaller gap is noise);
4. prints the bytes-moved floor of each lookup against the copy bandwidth measured in the run.

It needs only torch and Triton: the kernel and the reference are loaded from their files, so
torchrec and FBGEMM need not be installed (the lent GPU machines have neither).

    python benchmarks/gpu_lookup.py                 # on an H100 / H200
    python benchmarks/gpu_lookup.py --cpu-smoke     # tiny sizes, Triton's interpreter, on CPU
    python benchmarks/gpu_lookup.py --log $OUT/gpu_lookup.txt   # also write the output to a file
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Tuple

OPS = Path(__file__).resolve().parents[1] / "torchrec_mec" / "ops"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, OPS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zipf_ids(torch, rows: int, count: int, device, gen, exponent: float = 1.05):
    u = torch.rand(count, generator=gen, device=device, dtype=torch.float64)
    a = 1.0 - exponent
    rank = torch.floor(((rows ** a - 1.0) * u + 1.0) ** (1.0 / a)).long() - 1
    return (rank.clamp(max=rows - 1) * 2654435761 + 12345) % rows


def reference64(torch, codes, books, ids, offsets, weights, mode, upstream):
    """Float64 pooled output and codebook gradient, by gathering and index_add (no kernel code)."""
    m_count, _, sub = books.shape
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths)
    gathered = codes[ids].long()  # [n, M]
    books64 = books.double()
    scale = torch.ones(ids.numel(), dtype=torch.float64, device=ids.device)
    if weights is not None:
        scale = weights.double()
    if mode == "mean":
        scale = scale / lengths.clamp(min=1).double()[bag]
    out = torch.zeros(lengths.numel(), m_count * sub, dtype=torch.float64, device=ids.device)
    grad = torch.zeros_like(books64)
    up = upstream.double()
    for m in range(m_count):
        cols = slice(m * sub, (m + 1) * sub)
        out[:, cols].index_add_(0, bag, books64[m][gathered[:, m]] * scale[:, None])
        grad[m].index_add_(0, gathered[:, m], up[bag, cols] * scale[:, None])
    return out, grad


class Timer:
    """Times a callable: CUDA events on the GPU, the wall clock on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def launch_name(launch) -> str:
    return f"{launch.block_bags:>2} bags {launch.num_warps} warps {launch.unroll} ids/trip"


def timed_medians(timer: Timer, methods: Dict[Hashable, Callable[[int], object]], repeats: int,
                  after: Callable[[], None]) -> Dict[Hashable, Tuple[float, float]]:
    """Runs every method once per repeat, in turn (the id set rotating with the repeat); returns
    per method (median ms, spread): spread is |median of the first half - median of the second
    half| over the median."""
    times: Dict[Hashable, List[float]] = {key: [] for key in methods}
    for r in range(repeats):
        for key, fn in methods.items():
            times[key].append(timer(lambda: fn(r)))
            after()
    result = {}
    for key, t in times.items():
        half = len(t) // 2
        median = statistics.median(t)
        result[key] = (median, abs(statistics.median(t[:half]) - statistics.median(t[half:]))
                       / median)
    return result


def copy_bandwidth(torch, device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of a few."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(7)]
    return 2 * nbytes / (statistics.median(times[2:]) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--ids-per-bag", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--log", help="also write everything printed to this file")
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        args.rows, args.batch, args.ids_per_bag, args.repeats = 5000, 64, 5, 4
    import torch
    import torch.nn.functional as F

    triton_lookup, reference = load("triton_lookup"), load("reference")
    if not triton_lookup.TRITON_AVAILABLE:
        sys.exit("Triton is not installed")
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for a functional check on the CPU")
    printed: List[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        printed.append(line)

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    timer = Timer(torch, device)
    rows, dim, m_count, k, batch, per_bag = args.rows, 128, 8, 256, args.batch, args.ids_per_bag
    sub = dim // m_count
    n = batch * per_bag
    launches = (triton_lookup.LAUNCH_CANDIDATES[:2] if args.cpu_smoke
                else triton_lookup.LAUNCH_CANDIDATES)
    default = triton_lookup.DEFAULT_LAUNCH
    say(f"# {time.strftime('%Y-%m-%d %H:%M')}  {name}, torch {torch.__version__}; table "
        f"{rows:,} x {dim} fp32 ({rows * dim * 4 / 2**30:.1f} GiB) vs codes {rows:,} x {m_count} "
        f"uint8 + codebooks [{m_count}, {k}, {sub}]; batch {batch:,}, {per_bag} ids per bag")
    gen = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, k, (rows, m_count), generator=gen, device=device).to(torch.uint8)
    books = torch.randn(m_count, k, sub, generator=gen, device=device).requires_grad_(True)

    # 1. correctness at the benchmark shape, fresh inputs, every element, every configuration
    for launch in launches:
        for mode, weighted in [("sum", False), ("sum", True), ("mean", False)]:
            lengths = torch.randint(0, 2 * per_bag + 1, (batch,), generator=gen, device=device)
            lengths[::7] = 0
            offsets = F.pad(lengths.cumsum(0), (1, 0))
            ids = torch.randint(0, rows, (int(lengths.sum()),), generator=gen, device=device)
            w = torch.rand(ids.numel(), generator=gen, device=device) if weighted else None
            upstream = torch.randn(batch, dim, generator=gen, device=device)
            # Poison: the caching allocator hands this freed block to the kernel's output next.
            poison = torch.full((batch, dim), float("nan"), device=device)
            del poison
            out = triton_lookup.pq_embedding_bag_triton(codes, books, ids, offsets, w, mode,
                                                        launch)
            (grad,) = torch.autograd.grad(out, books, upstream)
            ref, ref_grad = reference64(torch, codes, books.detach(), ids, offsets, w, mode,
                                        upstream)
            assert bool(torch.isfinite(out).all()), f"unwritten output elements with {launch}"
            torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grad.double(), ref_grad, atol=1e-2, rtol=1e-4)
            rel = (out.double() - ref).norm() / ref.norm()
            rel_grad = (grad.double() - ref_grad).norm() / ref_grad.norm()
            say(f"# correct: {launch_name(launch)}, {mode}"
                f"{' weighted' if weighted else '':<9}: {out.numel():,} outputs, relative error "
                f"{rel:.1e}, max abs {(out.double() - ref).abs().max():.1e}; {grad.numel():,} "
                f"gradient entries, relative error {rel_grad:.1e}")
            del out, grad, ref, ref_grad

    offsets = torch.arange(0, n + 1, per_bag, device=device)
    upstream = torch.randn(batch, dim, generator=gen, device=device)
    id_sets = {
        "uniform": [torch.randint(0, rows, (n,), generator=gen, device=device) for _ in range(3)],
        "zipf": [zipf_ids(torch, rows, n, device, gen) for _ in range(3)],
    }

    trained = [books]  # the dense table joins once it exists

    def clear_grads() -> None:
        for tensor in trained:
            tensor.grad = None

    def pq(launch, backward: bool, ids: List[torch.Tensor]) -> Callable[[int], object]:
        if backward:
            return lambda r: triton_lookup.pq_embedding_bag_triton(
                codes, books, ids[r % 3], offsets, launch=launch).backward(upstream)
        return lambda r: torch.no_grad()(triton_lookup.pq_embedding_bag_triton)(
            codes, books, ids[r % 3], offsets, launch=launch)

    # 2. launch configurations, Zipf ids
    for launch in launches:  # warm-up: compiles each kernel variant
        pq(launch, True, id_sets["zipf"])(0)
        clear_grads()
    sweep_fns = {(launch, phase): pq(launch, phase == "fwd+bwd", id_sets["zipf"])
                 for launch in launches for phase in ("fwd", "fwd+bwd")}
    sweep = timed_medians(timer, sweep_fns, args.repeats, clear_grads)
    best = {phase: min(launches, key=lambda c: sweep[(c, phase)][0])
            for phase in ("fwd", "fwd+bwd")}
    for launch in launches:
        say(f"# launch {launch_name(launch)}: forward "
            f"{sweep[(launch, 'fwd')][0]:.3f} ms, fwd+bwd {sweep[(launch, 'fwd+bwd')][0]:.3f} ms"
            + ("  (default)" if launch == default else ""))

    # 3. timings (the dense table is allocated only now: 23.8 GiB)
    dense = torch.randn(rows, dim, device=device, generator=gen).requires_grad_(True)
    trained.append(dense)
    bandwidth = copy_bandwidth(torch, device, timer, min(2**31, rows * dim))
    lines: List[str] = []
    for dist, ids in id_sets.items():
        def no_grad(fn: Callable[[int], object]) -> Callable[[int], object]:
            return lambda r: torch.no_grad()(fn)(r)

        methods: Dict[str, Callable[[int], object]] = {
            "dense F.embedding_bag": no_grad(lambda r: F.embedding_bag(
                ids[r % 3], dense, offsets, include_last_offset=True)),
            "PQ Triton (default)": pq(default, False, ids),
            "PQ Triton (best)": pq(best["fwd"], False, ids),
            "PQ plain PyTorch": no_grad(
                lambda r: reference.pq_embedding_bag(codes, books, ids[r % 3], offsets)),
            "code gather alone": lambda r: codes[ids[r % 3]],
            "dense fwd+bwd (sparse grad)": lambda r: F.embedding_bag(
                ids[r % 3], dense, offsets, include_last_offset=True, sparse=True
            ).backward(upstream),
            "PQ Triton fwd+bwd (default)": pq(default, True, ids),
            "PQ Triton fwd+bwd (best)": pq(best["fwd+bwd"], True, ids),
        }
        peak: Dict[str, int] = {}
        for key, fn in methods.items():  # warm-up and memory
            fn(0)
            clear_grads()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn(0)
                torch.cuda.synchronize()
                peak[key] = torch.cuda.max_memory_allocated() - before
            clear_grads()
        ms = timed_medians(timer, methods, args.repeats, clear_grads)
        id_bytes = n * ids[0].element_size() + offsets.numel() * 8
        out_bytes = batch * dim * 4
        pq_floor = id_bytes + n * m_count + books.numel() * 4 + out_bytes
        floors = {  # bytes each lookup must move at least
            "dense F.embedding_bag": id_bytes + n * dim * 4 + out_bytes,
            "PQ Triton (default)": pq_floor,
            "PQ Triton (best)": pq_floor,
        }
        sector_floor = id_bytes + n * 32 + out_bytes  # one 32-byte DRAM sector per code row
        for key in methods:
            base = "dense fwd+bwd (sparse grad)" if "fwd" in key else "dense F.embedding_bag"
            floor = floors.get(key)
            floor_txt = (f" floor {1e3 * floor / bandwidth:6.3f} ms ({floor / 2**20:7.1f} MiB, "
                         f"{100 * (1e3 * floor / bandwidth) / ms[key][0]:5.1f}% of it)"
                         if floor else "")
            mem = f"{peak[key] / 2**20:8.1f} MiB" if key in peak else "    n/a"
            lines.append(f"{dist:<8} {key:<28} {ms[key][0]:8.3f} ms +-{100 * ms[key][1]:3.0f}%  "
                         f"{ms[base][0] / ms[key][0]:6.2f}x vs dense  step memory {mem}"
                         f"{floor_txt}")
        lines.append(f"{dist:<8} {'PQ, 32 B sector floor':<28} "
                     f"{1e3 * sector_floor / bandwidth:8.3f} ms "
                     f"({sector_floor / 2**20:.1f} MiB at {bandwidth / 1e12:.2f} TB/s copy "
                     "bandwidth)")
    say(f"# best launch: forward {launch_name(best['fwd'])}; fwd+bwd "
        f"{launch_name(best['fwd+bwd'])}")
    for line in lines:
        say(line)
    say(f"# stored: dense {rows * dim * 4 / 2**30:.2f} GiB; PQ {rows * m_count / 2**30:.2f} GiB "
        f"codes + {books.numel() * 4 / 2**10:.0f} KiB codebooks")
    if args.log:
        Path(args.log).write_text("\n".join(printed) + "\n")


if __name__ == "__main__":
    main()
