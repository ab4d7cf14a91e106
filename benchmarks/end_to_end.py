"""MEC end to end over several seeds: embedding memory ratio and test AUC / log loss of the
uncompressed and the compressed model, each pair measured in the same run.

    # the synthetic claim (>= 50x, AUC within 0.002): 1M rows, largest table 2M ids
    python benchmarks/end_to_end.py --format synthetic --config benchmarks/synthetic_large.yaml
    # the real Criteo sample, spread over seeds
    python benchmarks/end_to_end.py --format criteo --data ../shared/data/criteo_sample_8k.tsv \\
        --preset sample --seeds 0 1 2 3 4

Seeds vary model initialisation, shuffling and the quantizer (``--seed`` of ``mec``); the data
split stays fixed. Prints one line per seed and the mean and standard deviation, and writes
``<out>/summary.json``.
"""
import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec_mec.data import EncodedDataset  # noqa: E402
from torchrec_mec.pipeline import load_settings, run, stage_dir  # noqa: E402


def one_run(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    overrides = {"pretrain.seed": seed, "finetune.seed": seed, "compress.quantizer.seed": seed}
    settings = load_settings(args.preset, args.config, overrides)
    out = os.path.join(args.out, f"seed{seed}")
    started = time.perf_counter()
    report = run(args.data, args.format, out, settings, progress=not args.no_progress)
    row = {
        "seed": seed,
        "ratio": report["memory"]["ratio"],
        "baseline_bytes": report["memory"]["baseline_bytes"],
        "mec_bytes": report["memory"]["mec_bytes"],
        "baseline_auc": report["baseline"]["auc"],
        "mec_auc": report["mec"]["auc"],
        "auc_gap": report["mec"]["auc"] - report["baseline"]["auc"],
        "baseline_logloss": report["baseline"]["logloss"],
        "mec_logloss": report["mec"]["logloss"],
        "compressed_tables": sum(t["compressed"] for t in report["tables"].values()),
        "tables": len(report["tables"]),
        "seconds": time.perf_counter() - started,
    }
    data = EncodedDataset(stage_dir(out, "data"))
    if data.is_synthetic:
        row["bayes_auc"] = data.bayes_auc("test")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=["criteo", "avazu", "synthetic"])
    parser.add_argument("--data", help="raw data file (not for synthetic)")
    parser.add_argument("--preset", default="published")
    parser.add_argument("--config", help="YAML/JSON settings file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchrec_mec").setLevel(logging.INFO)

    rows: List[Dict[str, Any]] = []
    for seed in args.seeds:
        rows.append(one_run(args, seed))
        r = rows[-1]
        print(f"seed {seed}: {r['compressed_tables']}/{r['tables']} tables compressed, "
              f"ratio {r['ratio']:.1f}x, AUC {r['baseline_auc']:.4f} -> {r['mec_auc']:.4f} "
              f"({r['auc_gap']:+.4f}), logloss {r['baseline_logloss']:.4f} -> "
              f"{r['mec_logloss']:.4f}, {r['seconds']:.0f} s", flush=True)
    summary: Dict[str, Any] = {"runs": rows, "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(args)}
    for key in ("ratio", "baseline_auc", "mec_auc", "auc_gap", "baseline_logloss",
                "mec_logloss"):
        values = [r[key] for r in rows]
        summary[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(f"{key:17s} mean {summary[key]['mean']:.4f}  std {summary[key]['std']:.4f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
