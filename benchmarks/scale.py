"""Real-size tables: what building a model of them costs before any table is allocated.

Builds a QEBC of two 1B-row tables (D = 128, M = 8, K = 256: 16 GB of codes once allocated) on the
``meta`` device, and, as the baseline in the same process, TorchRec's ``EmbeddingBagCollection``
of the same tables on ``meta``. Per module: the median build time over repeats and the growth of
the process's peak RSS during the builds (``/proc/self/clear_refs`` resets the peak first).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--rows 1000000000 --repeats 20]
"""
import argparse
import statistics
import time
from typing import Callable, Dict

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig

META = torch.device("meta")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(build: Callable[[], torch.nn.Module], repeats: int) -> Dict[str, float]:
    """Median seconds per build and the peak RSS growth (bytes) over all builds."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) restarts from the current RSS
    before = _status("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_rss_growth": _status("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10**9)
    parser.add_argument("--tables", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    names = [f"t{i}" for i in range(args.tables)]
    qebc_tables = [
        QuantizedEmbeddingBagConfig(name=n, num_embeddings=args.rows, embedding_dim=args.dim,
                                    feature_names=[f"f_{n}"], num_subspaces=8, codebook_size=256)
        for n in names
    ]
    ebc_tables = [
        EmbeddingBagConfig(name=n, num_embeddings=args.rows, embedding_dim=args.dim,
                           feature_names=[f"f_{n}"])
        for n in names
    ]
    qebc = measure(lambda: QuantizedEmbeddingBagCollection(qebc_tables, device=META), args.repeats)
    ebc = measure(lambda: EmbeddingBagCollection(ebc_tables, device=META), args.repeats)
    report = QuantizedEmbeddingBagCollection(qebc_tables, device=META).memory_report()
    print(f"{args.tables} tables x {args.rows:,} rows x {args.dim} on meta "
          f"(would hold {report.total_bytes / 2**30:.1f} GiB compressed, "
          f"{report.baseline_bytes / 2**30:.1f} GiB as float32)")
    print("| module | build ms (median) | peak RSS growth MiB |")
    print("|---|---|---|")
    for name, result in [("QEBC (M=8, K=256)", qebc), ("TorchRec EBC (baseline)", ebc)]:
        print(f"| {name} | {result['seconds'] * 1e3:.2f} | {result['peak_rss_growth'] / 2**20:.1f} |")
    print(f"QEBC / EBC build time: {qebc['seconds'] / ebc['seconds']:.2f}x")


if __name__ == "__main__":
    main()
