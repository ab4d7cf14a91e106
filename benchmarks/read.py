"""Text reading speed: the numpy readers against the line-by-line reference readers.

Writes a random Criteo-layout TSV and an Avazu-layout CSV (Zipf-distributed categorical values,
log-normal integers, some missing), then times, in this process and alternating old and new:
the Criteo reader alone, the Avazu reader alone, and ``prepare_dataset`` on the Criteo file
(reading, vocabulary counting, staging and writing; the old pipeline is the same function with
the reference reader, whose string lists take the one-value-at-a-time counting path). Prints
rows/s (wall and CPU) and the new/old ratio, and checks that both give the same output.

    PYTHONPATH=. .venv/bin/python benchmarks/read.py                  # 300k rows, best of 3
    PYTHONPATH=. .venv/bin/python benchmarks/read.py --rows 1000000 --repeats 1
"""
import argparse
import datetime
import hashlib
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from tests.reference_readers import read_avazu_csv_reference, read_criteo_tsv_reference
from torchrec_mec.data import (
    AVAZU_COLUMNS,
    BadRowReport,
    prepare_dataset,
    read_avazu_csv,
    read_criteo_tsv,
)
from torchrec_mec.data import prepare


def categorical(rng: np.random.Generator, rows: int, vocabulary: int, width: int) -> np.ndarray:
    """Zipf-distributed hex values (``width`` digits), 4% empty."""
    ids = rng.zipf(1.2, rows) % vocabulary
    values = np.array([f"{(i * 2654435761) % 16**width:0{width}x}" for i in range(vocabulary)])
    out = values[ids]
    out[rng.random(rows) < 0.04] = ""
    return out


def write_criteo(path: str, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    columns = [(rng.random(rows) < 0.25).astype(int).astype(str)]
    for j in range(13):
        ints = (np.floor(np.exp(rng.normal(1, 2, rows))) - (j == 1) * 2).astype(np.int64)
        text = ints.astype(str)
        text[rng.random(rows) < 0.1] = ""
        columns.append(text)
    for vocabulary in (1000, 500, 200_000, 50_000, 300, 20, 10_000, 600, 3, 50_000, 5000,
                       200_000, 3000, 27, 10_000, 200_000, 10, 4000, 2000, 4, 200_000, 15, 15,
                       50_000, 80, 40_000):
        columns.append(categorical(rng, rows, vocabulary, 8))
    _write_rows(path, columns, "\t")


def write_avazu(path: str, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    columns = [rng.integers(1 << 62, size=rows).astype(str),
               (rng.random(rows) < 0.17).astype(int).astype(str),
               np.char.add("1410", np.char.zfill((rng.integers(21, 31, rows) * 100
                                                   + rng.integers(0, 24, rows)).astype(str), 4))]
    for k in range(21):
        columns.append(categorical(rng, rows, [7, 50, 3000, 20000][k % 4], [4, 8][k % 2]))
    _write_rows(path, columns, ",", header=",".join(AVAZU_COLUMNS))


def _write_rows(path: str, columns: List[np.ndarray], sep: str, header: str = "") -> None:
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        for start in range(0, len(columns[0]), 65536):
            block = [c[start : start + 65536].tolist() for c in columns]
            f.write("".join(sep.join(fields) + "\n" for fields in zip(*block)))


def read_case(reader: Callable, path: str) -> Tuple[int, str]:
    """Rows read (the timed part: chunks are dropped as they come)."""
    return sum(len(chunk) for chunk in reader(path, BadRowReport())), ""


def read_digest(reader: Callable, path: str) -> str:
    """A digest of every row a reader yields (untimed: decoding values costs more than reading)."""
    hashes: List = [hashlib.sha256() for _ in range(3)]
    for chunk in reader(path, BadRowReport()):
        if len(hashes) == 3:
            hashes += [hashlib.sha256() for _ in chunk.sparse]
        for h, array in zip(hashes, (chunk.lines, chunk.labels, chunk.dense)):
            h.update(np.ascontiguousarray(array).tobytes())
        for h, column in zip(hashes[3:], chunk.sparse):
            h.update("".join((v.decode() if isinstance(v, bytes) else v) + "\x00"
                             for v in list(column)).encode())
    return "".join(h.hexdigest() for h in hashes)


def prepare_case(reader: Callable, path: str) -> Tuple[int, str]:
    """``prepare_dataset`` with ``reader`` for Criteo: rows and a digest of the files written."""
    saved = prepare._FORMATS["criteo"]
    prepare._FORMATS["criteo"] = (reader, saved[1])
    try:
        ds = prepare_dataset(path, "criteo", tempfile.mkdtemp(), progress=False)
    finally:
        prepare._FORMATS["criteo"] = saved
    files = sorted((k, v["sha256"]) for k, v in ds.manifest["files"].items())
    return sum(ds.manifest["num_rows"].values()), hashlib.sha256(str(files).encode()).hexdigest()


def timed(run: Callable[[], Tuple[int, str]], repeats: int) -> Tuple[float, float, int, str]:
    """Best wall and CPU seconds over ``repeats`` runs, the rows and the output digest."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        rows, digest = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), rows, digest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--repeats", type=int, default=3, help="runs per case; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    folder = tempfile.mkdtemp()
    criteo, avazu = os.path.join(folder, "day.tsv"), os.path.join(folder, "train.csv")
    write_criteo(criteo, args.rows, args.seed)
    write_avazu(avazu, args.rows, args.seed)
    print(f"{datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}; {args.rows} rows: Criteo "
          f"{os.path.getsize(criteo) / 2**20:.0f} MiB, Avazu {os.path.getsize(avazu) / 2**20:.0f}"
          f" MiB; best of {args.repeats}")
    cases: Dict[str, Tuple[Callable, Callable, Callable, str]] = {
        "Criteo reader": (read_case, read_criteo_tsv_reference, read_criteo_tsv, criteo),
        "Avazu reader": (read_case, read_avazu_csv_reference, read_avazu_csv, avazu),
        "Criteo prepare_dataset": (prepare_case, read_criteo_tsv_reference, read_criteo_tsv,
                                   criteo),
    }
    print("| case | old rows/s (wall / CPU) | new rows/s (wall / CPU) | new / old (wall / CPU) |")
    print("|---|---|---|---|")
    for name, (case, old_reader, new_reader, path) in cases.items():
        old = timed(lambda: case(old_reader, path), args.repeats)
        new = timed(lambda: case(new_reader, path), args.repeats)
        same = old[2:] == new[2:]
        if case is read_case:
            same = same and read_digest(old_reader, path) == read_digest(new_reader, path)
        if not same:
            raise SystemExit(f"{name}: the old and new readers give different output")
        rows = new[2]
        print(f"| {name} | {rows / old[0]:,.0f} / {rows / old[1]:,.0f} | "
              f"{rows / new[0]:,.0f} / {rows / new[1]:,.0f} | "
              f"{old[0] / new[0]:.1f}x / {old[1] / new[1]:.1f}x |")


if __name__ == "__main__":
    main()
