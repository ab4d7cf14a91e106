"""GPU lookup benchmark: the fused Triton PQ lookup against ``F.embedding_bag`` on the dense table.

The issue's case: a 50M x 128 float32 table (23.8 GiB) against its product-quantized form
(M=8 one-byte codes per row, K=256 codewords of 16 floats per subspace), batch 65,536, 20 ids per
bag, uniform and Zipf ids. In one run it

1. checks the Triton kernel against a float64 reference on fresh random inputs at the benchmark
   shape (variable bag lengths with empty bags; SUM, MEAN and per-id weights), every element of
   the pooled output and of the codebook gradient;
2. times, with CUDA events, interleaved, medians: ``F.embedding_bag`` on the dense table, the
   Triton kernel, the plain-PyTorch PQ lookup (one ``F.embedding_bag`` per subspace), the code
   gather alone; then forward+backward (dense: ``sparse=True`` gradients, the only kind that fits
   beside a 23.8 GiB table; PQ: the dense [M, K, D/M] codebook gradient);
3. prints the bytes-moved floor of each lookup against the copy bandwidth measured in the run.

It needs only torch and Triton: the kernel and the reference are loaded from their files, so
torchrec and FBGEMM need not be installed (the lent GPU machines have neither).

    python benchmarks/gpu_lookup.py                 # on an H100 / H200
    python benchmarks/gpu_lookup.py --cpu-smoke     # tiny sizes, Triton's interpreter, on CPU
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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


def copy_bandwidth(torch, device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of a few."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(7)]
    del src, dst
    return 2 * nbytes / (statistics.median(times[2:]) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--ids-per-bag", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        args.rows, args.batch, args.ids_per_bag, args.repeats = 5000, 64, 5, 3
    import torch
    import torch.nn.functional as F

    triton_lookup, reference = load("triton_lookup"), load("reference")
    if not triton_lookup.TRITON_AVAILABLE:
        sys.exit("Triton is not installed")
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for a functional check on the CPU")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    timer = Timer(torch, device)
    rows, dim, m_count, k, batch, per_bag = args.rows, 128, 8, 256, args.batch, args.ids_per_bag
    sub = dim // m_count
    n = batch * per_bag
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {name}, torch {torch.__version__}; table "
          f"{rows:,} x {dim} fp32 ({rows * dim * 4 / 2**30:.1f} GiB) vs codes {rows:,} x {m_count} "
          f"uint8 + codebooks [{m_count}, {k}, {sub}]; batch {batch:,}, {per_bag} ids per bag")
    gen = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, k, (rows, m_count), generator=gen, device=device).to(torch.uint8)
    books = torch.randn(m_count, k, sub, generator=gen, device=device).requires_grad_(True)

    # 1. correctness at the benchmark shape, fresh inputs, every element
    for mode, weighted in [("sum", False), ("sum", True), ("mean", False)]:
        lengths = torch.randint(0, 2 * per_bag + 1, (batch,), generator=gen, device=device)
        lengths[::7] = 0
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        ids = torch.randint(0, rows, (int(lengths.sum()),), generator=gen, device=device)
        w = torch.rand(ids.numel(), generator=gen, device=device) if weighted else None
        upstream = torch.randn(batch, dim, generator=gen, device=device)
        out = triton_lookup.pq_embedding_bag_triton(codes, books, ids, offsets, w, mode)
        (grad,) = torch.autograd.grad(out, books, upstream)
        ref, ref_grad = reference64(torch, codes, books.detach(), ids, offsets, w, mode, upstream)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-2, rtol=1e-4)
        print(f"# correct: {mode}{' weighted' if weighted else ''}: {out.numel():,} outputs, max "
              f"abs error {(out.double() - ref).abs().max():.2e}; {grad.numel():,} gradient "
              f"entries, max relative error "
              f"{((grad.double() - ref_grad).abs() / ref_grad.abs().clamp(min=1)).max():.2e}")
        del out, grad, ref, ref_grad

    # 2. timings (the dense table is allocated only now: 23.8 GiB)
    dense = torch.randn(rows, dim, device=device, generator=gen).requires_grad_(True)
    offsets = torch.arange(0, n + 1, per_bag, device=device)
    upstream = torch.randn(batch, dim, generator=gen, device=device)
    bandwidth = copy_bandwidth(torch, device, timer, min(2**31, rows * dim))
    lines: List[str] = []
    for dist in ("uniform", "zipf"):
        ids = (torch.randint(0, rows, (n,), generator=gen, device=device) if dist == "uniform"
               else zipf_ids(torch, rows, n, device, gen))
        def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
            return lambda: torch.no_grad()(fn)()

        methods: Dict[str, Callable[[], object]] = {
            "dense F.embedding_bag": no_grad(lambda: F.embedding_bag(
                ids, dense, offsets, include_last_offset=True)),
            "PQ Triton": no_grad(
                lambda: triton_lookup.pq_embedding_bag_triton(codes, books, ids, offsets)),
            "PQ plain PyTorch": no_grad(
                lambda: reference.pq_embedding_bag(codes, books, ids, offsets)),
            "code gather alone": lambda: codes[ids],
            "dense fwd+bwd (sparse grad)": lambda: F.embedding_bag(
                ids, dense, offsets, include_last_offset=True, sparse=True
            ).backward(upstream),
            "PQ Triton fwd+bwd": lambda: triton_lookup.pq_embedding_bag_triton(
                codes, books, ids, offsets).backward(upstream),
        }
        times: Dict[str, List[float]] = {key: [] for key in methods}
        peak: Dict[str, int] = {}
        for key, fn in methods.items():  # warm-up (compiles the kernels) and memory
            fn()
            dense.grad = books.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak[key] = torch.cuda.max_memory_allocated() - before
            dense.grad = books.grad = None
        for _ in range(args.repeats):
            for key, fn in methods.items():
                times[key].append(timer(fn))
                dense.grad = books.grad = None
        ms = {key: statistics.median(v) for key, v in times.items()}
        id_bytes = n * ids.element_size() + offsets.numel() * 8
        out_bytes = batch * dim * 4
        floors = {  # bytes each lookup must move at least
            "dense F.embedding_bag": id_bytes + n * dim * 4 + out_bytes,
            "PQ Triton": id_bytes + n * m_count + books.numel() * 4 + out_bytes,
        }
        sector_floor = id_bytes + n * 32 + out_bytes  # one 32-byte DRAM sector per code row
        for key in methods:
            base = ("dense F.embedding_bag" if "fwd" not in key else "dense fwd+bwd (sparse grad)")
            floor = floors.get(key)
            floor_txt = (f" floor {1e3 * floor / bandwidth:6.3f} ms ({floor / 2**20:7.1f} MiB, "
                         f"{100 * (1e3 * floor / bandwidth) / ms[key]:5.1f}% of it)"
                         if floor else "")
            mem = f"{peak[key] / 2**20:8.1f} MiB" if key in peak else "    n/a"
            lines.append(f"{dist:<8} {key:<28} {ms[key]:8.3f} ms  {ms[base] / ms[key]:6.2f}x vs "
                         f"dense  step memory {mem}{floor_txt}")
        lines.append(f"{dist:<8} {'PQ Triton, 32 B sector floor':<28} "
                     f"{1e3 * sector_floor / bandwidth:8.3f} ms "
                     f"({sector_floor / 2**20:.1f} MiB at {bandwidth / 1e12:.2f} TB/s copy bandwidth)")
    print("\n".join(lines))
    print(f"# stored: dense {rows * dim * 4 / 2**30:.2f} GiB; PQ {rows * m_count / 2**30:.2f} GiB "
          f"codes + {books.numel() * 4 / 2**10:.0f} KiB codebooks")


if __name__ == "__main__":
    main()
