"""MEC end to end over several seeds: embedding memory ratio and test AUC / log loss of the
uncompressed and the compressed model, each pair measured in the same run.

    # the synthetic claim (>= 50x, AUC within 0.002): 1M rows, largest table 2M ids
    python benchmarks/end_to_end.py --format synthetic --config benchmarks/synthetic_large.yaml
    # the real Criteo sample, spread over seeds
    python benchmarks/end_to_end.py --format criteo --data ../shared/data/criteo_sample_8k.tsv \\
        --preset sample --seeds 0 1 2 3 4
    # MEC against the alternatives at equal memory (mec run --compare), 3 seeds
    python benchmarks/end_to_end.py --format synthetic --preset sample \\
        --config benchmarks/compare_dev.yaml --seeds 0 1 2 --compare
    # only the comparison (prepare, pre-train, compare: no stage 2 / 3 / report of its own)
    python benchmarks/end_to_end.py --format synthetic \\
        --config benchmarks/planted_300k_compare.yaml --seeds 0 1 2 --compare-only

Seeds vary model initialisation, shuffling and the quantizer (``--seed`` of ``mec``); the data
split stays fixed. Prints one line per seed and the mean and standard deviation, and writes
``<out>/summary.json``. With ``--compare``, also the test AUC per (method, ratio) as mean +- std
over the seeds, with the ratio reached, beside a plain factorization machine trained on the same
split (``benchmarks/fm_reference.py``, when present), in ``<out>/comparisons.md`` and a plot
``<out>/compare_auc_vs_memory.png``. ``--compare-only`` brings only ``compare`` up to date
(and what it reads: the data and the pre-training), not the run's own stage 2, fine-tuning and
report: the per-seed line and the summary then give the comparison alone. ``--variant DIR
SUFFIX`` (with ``--compare-only``) adds each seed's comparisons from ``DIR/seed<S>``, runs of
other settings on copies of the same pre-training, their methods named ``METHOD SUFFIX`` in the
table, the plot and the per-seed differences (against the same method of ``--out``, k-means PQ
and the baseline)::

    # the gradient-trained mec (in /tmp/quality2) beside the runs of benchmarks/planted_300k_compare.yaml
    python benchmarks/end_to_end.py --format synthetic --config benchmarks/planted_300k_compare.yaml \
        --compare-only --collect --no-fm --seeds 0 1 2 --out /tmp/quality/runs \
        --variant /tmp/quality2 "(gradient)"
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchrec_mec.data import EncodedDataset  # noqa: E402
from torchrec_mec.pipeline import (  # noqa: E402
    DataSource,
    load_settings,
    run,
    run_stages,
    stage_dir,
)
from torchrec_mec.pipeline.compare import COMPARISONS_FILE, read_comparisons  # noqa: E402


def one_run(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    overrides = {"pretrain.seed": seed, "finetune.seed": seed, "compress.quantizer.seed": seed,
                 **dict(args.set)}
    settings = load_settings(args.preset, args.config, overrides)
    out = os.path.join(args.out, f"seed{seed}")
    started = time.perf_counter()
    if args.compare_only:
        return compare_only(args, seed, settings, out, started)
    report = run(args.data, args.format, out, settings, progress=not args.no_progress,
                 compare=args.compare)
    row = {
        "seed": seed,
        "ratio": report["memory"]["ratio"],
        "baseline_bytes": report["memory"]["baseline_bytes"],
        "mec_bytes": report["memory"]["mec_bytes"],
        "baseline_auc": report["baseline"]["auc"],
        "mec_auc": report["mec"]["auc"],
        "auc_gap": report["auc_change"],
        "baseline_logloss": report["baseline"]["logloss"],
        "mec_logloss": report["mec"]["logloss"],
        "compressed_tables": sum(t["compressed"] for t in report["tables"].values()),
        "tables": len(report["tables"]),
        "seconds": time.perf_counter() - started,
    }
    data = EncodedDataset(stage_dir(out, "data"))
    if data.is_synthetic:
        row["bayes_auc"] = data.bayes_auc("test")
    if args.compare:
        row["comparisons"] = report["comparisons"]
        row["fm_auc"] = None if args.no_fm else fm_reference_auc(data, seed)
    return row


def compare_only(args: argparse.Namespace, seed: int, settings: Any, out: str,
                 started: float) -> Dict[str, Any]:
    """One seed's ``compare`` stage (and the data and pre-training it reads) brought up to
    date in ``out``, without the run's own stage 2, fine-tuning and report."""
    if not args.collect:
        run_stages(out, "compare", settings, source=DataSource(args.format, args.data),
                   redo=("prepare", "pretrain", "compare"), progress=not args.no_progress)
    rows = read_comparisons(stage_dir(out, "compare"))["comparisons"]
    for folder, suffix in args.variant:
        rows += variant_rows(rows, os.path.join(folder, f"seed{seed}"), suffix)
    data = EncodedDataset(stage_dir(out, "data"))
    return {"seed": seed, "comparisons": rows,
            "fm_auc": None if args.no_fm else fm_reference_auc(data, seed),
            "bayes_auc": data.bayes_auc("test") if data.is_synthetic else None,
            "seconds": time.perf_counter() - started}


def variant_rows(rows: List[Dict[str, Any]], run_dir: str, suffix: str) -> List[Dict[str, Any]]:
    """The comparisons of ``run_dir`` but its baseline, each method named ``METHOD SUFFIX``;
    none (said on stdout) where ``run_dir`` has no finished comparison.

    Raises:
        ValueError: its baseline is not the one of ``rows`` (another pre-training).
    """
    if not os.path.isfile(os.path.join(stage_dir(run_dir, "compare"), COMPARISONS_FILE)):
        print(f"{run_dir}: no finished comparison, no '{suffix}' rows for it", flush=True)
        return []
    other = read_comparisons(stage_dir(run_dir, "compare"))["comparisons"]
    ours = [(r["auc"], r["logloss"]) for r in rows if r["method"] == "baseline"]
    theirs = [(r["auc"], r["logloss"]) for r in other if r["method"] == "baseline"]
    if ours != theirs:
        raise ValueError(f"{run_dir}: its baseline {theirs} is not the one it is compared with "
                         f"{ours}: not the same pre-training")
    return [{**r, "method": f"{r['method']} {suffix}"} for r in other if r["method"] != "baseline"]


def fm_reference_auc(data: EncodedDataset, seed: int) -> Optional[float]:
    """Test AUC of the plain factorization machine of ``benchmarks/fm_reference.py`` on the
    same split, or None where that file is not there."""
    try:
        from fm_reference import train_fm
    except ImportError:
        return None
    return train_fm(data, seed=seed).test_auc


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and standard deviation of the defined values (an undefined AUC is None), and how
    many there were."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None, 0
    return (statistics.fmean(defined), statistics.stdev(defined) if len(defined) > 1 else 0.0,
            len(defined))


def _pm(values: Sequence[Optional[float]], digits: int = 4) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} +- {std:.{digits}f}" + (f" ({n} seeds)" if n < len(values) else "")


def comparison_table(rows: List[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """The comparisons of every seed's run as a markdown table (mean +- std per method and
    ratio; unreachable cells say so) and as JSON."""
    cells: Dict[Tuple[str, Optional[float]], List[Dict[str, Any]]] = {}
    for r in rows:
        for c in r["comparisons"]:
            cells.setdefault((c["method"], c["target_ratio"]), []).append(c)
    lines = ["| method | target ratio | ratio reached | embedding bytes | test AUC "
             "(mean +- std) | test log loss |", "|---|---|---|---|---|---|"]
    out: Dict[str, Any] = {}
    for (method, target), cs in cells.items():
        where = "-" if target is None else f"{target:g}x"
        if all(c["unreachable"] for c in cs):
            lines.append(f"| {method} | {where} | unreachable: {cs[0]['unreachable']} | | | |")
            out[f"{method}@{where}"] = {"unreachable": cs[0]["unreachable"]}
            continue
        aucs = [c["auc"] for c in cs]
        ratio, _, _ = mean_std([c["ratio"] for c in cs])
        lines.append(f"| {method} | {where} | {ratio:.1f}x | {cs[0]['bytes']:,} | {_pm(aucs)} | "
                     f"{_pm([c['logloss'] for c in cs])} |")
        out[f"{method}@{where}"] = {"ratio": ratio, "auc": mean_std(aucs)[:2],
                                    "aucs": aucs, "bytes": [c["bytes"] for c in cs]}
    fm = [r["fm_auc"] for r in rows]
    lines.append(f"| FM reference (plain, full tables) | - | - | - | {_pm(fm)} | |")
    out["fm_reference"] = {"auc": mean_std(fm)[:2], "aucs": fm}
    return "\n".join(lines), out


def paired_differences(rows: List[Dict[str, Any]], method: str = "mec",
                       other: str = "kmeans_pq") -> Dict[str, Tuple[Optional[float],
                                                                  Optional[float], int]]:
    """Per target ratio, the test AUC of ``method`` minus that of ``other`` in the same seed's
    run (same pre-training; same memory, or the float32 model for ``other="baseline"``), as
    mean, standard deviation and number of seeds."""
    diffs: Dict[str, List[float]] = {}
    for r in rows:
        auc = {(c["method"], c["target_ratio"]): c["auc"] for c in r["comparisons"]}
        for (m, target), a in auc.items():
            b = auc.get((other, None if other == "baseline" else target))
            if m == method and target is not None and a is not None and b is not None:
                diffs.setdefault(f"{target:g}x", []).append(a - b)
    return {k: mean_std(v) for k, v in diffs.items()}


def plot_comparison(table: Dict[str, Any], path: str, title: str) -> None:
    """Test AUC (mean +- std over seeds) against the memory ratio reached, log x."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    curves: Dict[str, List[Tuple[float, float, float]]] = {}
    for key, v in table.items():
        method = key.split("@")[0]
        if method in ("baseline", "fm_reference") or "ratio" not in v or v["auc"][0] is None:
            continue
        curves.setdefault(method, []).append((v["ratio"], *v["auc"]))
    for method, points in curves.items():
        x, y, err = zip(*sorted(points))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    for key, style, label in (("baseline@-", "--", "baseline (float32)"),
                              ("fm_reference", ":", "FM reference")):
        mean = table.get(key, {}).get("auc", (None,))[0]
        if mean is not None:
            ax.axhline(mean, color="black", linestyle=style, linewidth=0.9,
                       label=f"{label} {mean:.4f}")
    ax.set_xscale("log")
    ax.set(xlabel="embedding memory ratio (float32 tables / bytes)", ylabel="test AUC",
           title=title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=["criteo", "avazu", "synthetic"])
    parser.add_argument("--data", help="raw data file (not for synthetic)")
    parser.add_argument("--preset", default="published")
    parser.add_argument("--config", help="YAML/JSON settings file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compare", action="store_true",
                        help="also mec compare: the alternatives at equal memory")
    parser.add_argument("--compare-only", action="store_true",
                        help="only mec compare (with the data and pre-training it reads)")
    parser.add_argument("--collect", action="store_true",
                        help="with --compare-only: run nothing, read each seed's comparisons")
    parser.add_argument("--no-fm", action="store_true", help="no FM reference")
    parser.add_argument("--variant", nargs=2, action="append", default=[],
                        metavar=("DIR", "SUFFIX"),
                        help="with --compare-only: also DIR/seed<S>'s comparisons (copies of "
                             "the same pre-training), methods named 'METHOD SUFFIX'")
    parser.add_argument("--set", nargs="*", default=[], type=lambda kv: kv.split("=", 1),
                        metavar="KEY=VALUE", help="settings overrides for every seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchrec_mec").setLevel(logging.INFO)

    args.compare = args.compare or args.compare_only
    rows: List[Dict[str, Any]] = []
    for seed in args.seeds:
        rows.append(one_run(args, seed))
        r = rows[-1]
        if args.compare_only:
            print(f"seed {seed}: {len(r['comparisons'])} comparison cells, FM reference "
                  f"{_auc(r['fm_auc'])}, {r['seconds']:.0f} s", flush=True)
            continue
        print(f"seed {seed}: {r['compressed_tables']}/{r['tables']} tables compressed, "
              f"ratio {r['ratio']:.1f}x, AUC {_auc(r['baseline_auc'])} -> {_auc(r['mec_auc'])} "
              f"({_auc(r['auc_gap'], '+')}), logloss {r['baseline_logloss']:.4f} -> "
              f"{r['mec_logloss']:.4f}, {r['seconds']:.0f} s", flush=True)
    summary: Dict[str, Any] = {"runs": rows, "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(args)}
    for key in () if args.compare_only else ("ratio", "baseline_auc", "mec_auc", "auc_gap",
                                              "baseline_logloss", "mec_logloss"):
        mean, std, n = mean_std([r[key] for r in rows])
        summary[key] = {"mean": mean, "std": std, "runs": n}
        print(f"{key:17s} {_pm([r[key] for r in rows])}")
    os.makedirs(args.out, exist_ok=True)
    if args.compare:
        text, table = comparison_table(rows)
        summary["comparisons"] = table
        pairs = [("mec", "kmeans_pq"), ("mec", "baseline"), ("kmeans_pq", "baseline"),
                 ("mec", "hashing"), ("mec", "small_dim"), ("hashing", "baseline")]
        for folder, suffix in args.variant:
            methods = {c["method"] for r in rows for c in r["comparisons"]
                       if c["method"].endswith(f" {suffix}")}
            pairs += [(m, o) for m in sorted(methods)
                      for o in (m[:-len(suffix) - 1], "kmeans_pq", "hashing", "baseline")]
        for method, other in dict.fromkeys(pairs):  # kmeans_pq SUFFIX: one pair twice
            diffs = summary[f"{method}_minus_{other}"] = paired_differences(rows, method, other)
            text += "".join(f"\n{method} - {other} at {k}, per seed: {m:+.4f} +- {sd:.4f} "
                            f"({n} seeds)" for k, (m, sd, n) in diffs.items())
        print(text)
        with open(os.path.join(args.out, "comparisons.md"), "w") as f:
            f.write(text + "\n")
        plot_comparison(table, os.path.join(args.out, "compare_auc_vs_memory.png"),
                        f"test AUC at equal embedding memory ({len(rows)} seeds)")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def _auc(value: Optional[float], sign: str = "") -> str:
    return "undefined" if value is None else f"{value:{sign}.4f}"


if __name__ == "__main__":
    main()
