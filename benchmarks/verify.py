"""What verifying a finished stage costs: the runner hashes every byte of its outputs (sha256,
streamed in 8 MiB blocks) before it skips it. Measured against a plain read of the same files
in the same process, both from the page cache (the files are read once before timing), so the
ratio is the cost of hashing on top of reading.

    python benchmarks/verify.py --mib 1024 --files 4
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec_mec.pipeline.lineage import Digests  # noqa: E402

BLOCK = 8 << 20


def plain_read(paths) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                total += len(block)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="total size of the outputs")
    parser.add_argument("--files", type=int, default=4, help="number of output files")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        folder = os.path.join(run_dir, "stage")
        os.makedirs(folder)
        paths = []
        size = (args.mib << 20) // args.files
        for i in range(args.files):
            path = os.path.join(folder, f"part{i}.bin")
            with open(path, "wb") as f:
                for _ in range(0, size, BLOCK):
                    f.write(os.urandom(min(BLOCK, size)))
            paths.append(path)
        total = plain_read(paths)  # into the page cache
        reads, hashes = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain_read(paths)
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            Digests(run_dir).files("stage/")  # a new instance: nothing remembered
            hashes.append(time.perf_counter() - start)
    read_s, hash_s = statistics.median(reads), statistics.median(hashes)
    mib = total / 2**20
    print(f"{datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, "
          f"{mib:.0f} MiB in {args.files} files, median of {args.repeats}")
    print(f"  plain read        {read_s:6.2f} s  {mib / read_s:7.0f} MiB/s")
    print(f"  verify (sha256)   {hash_s:6.2f} s  {mib / hash_s:7.0f} MiB/s")
    print(f"  verify / read     {hash_s / read_s:6.1f}x")


if __name__ == "__main__":
    main()
