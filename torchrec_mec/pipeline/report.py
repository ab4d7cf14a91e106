"""The run's report: ``report.json``, PNG plots and a short summary for the terminal.

Everything is read back from the stages' artifacts, so ``mec report`` describes what the
stages actually ran with, even when they were run one by one with different flags.
"""
import datetime
import json
import math
import os
import platform
import shutil
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from iopath.common.file_io import g_pathmgr
from matplotlib.figure import Figure

from torchrec_mec.artifacts import load_artifact
from torchrec_mec.pipeline.compare import describe, read_comparisons
from torchrec_mec.pipeline.compress import load_compressed
from torchrec_mec.pipeline.evaluate import read_metrics
from torchrec_mec.pipeline.prepare import data_summary
from torchrec_mec.pipeline.outputs import (
    COUNTS_FILE,
    COUNTS_KIND,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_KIND,
    stage_dir,
)
REPORT_FILE = "report.json"
PLOTS_DIR = "plots"
POPULAR_SHARE = 0.10
"""Code-usage plots: the most frequent 10% of a table's ids (by training count) are "popular"."""
RARE_SHARE = 0.50
"""... and the least frequent 50% are "rare"."""
FEW_OF_A_CLASS = 100
"""A test split with fewer positives (or negatives) than this gets a warning: its AUC moves by
several hundredths with the split alone."""


def versions() -> Dict[str, str]:
    """Versions of Python, the platform and the packages the run used."""
    import fbgemm_gpu
    import torchrec

    import torchrec_mec

    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "torch": torch.__version__,
            "torchrec": torchrec.__version__,
            "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "unknown"),
            "torchrec_mec": torchrec_mec.__version__}


def build_report(run_dir: str, comparisons: bool = False) -> Dict[str, Any]:
    """The report of the run in ``run_dir`` as a JSON-able dict (no files written).

    Keys: ``baseline`` and ``mec`` (``auc``, ``None`` where undefined; ``logloss``,
    ``num_samples``, ``num_positives``), ``auc_change`` (``None`` if either AUC is), ``warnings``
    (what makes the figures unreliable, e.g. a test split of one class), ``memory``
    (``baseline_bytes``, ``mec_bytes``, ``ratio``, ``target_ratio`` or ``None``), ``tables``
    (per table: ``rows``, ``dim``, ``compressed``, ``num_subspaces`` and ``codebook_size`` (0
    when full), ``bytes_before``, ``bytes_after``, ``codes_bytes``, ``codebooks_bytes``,
    ``quantizer`` statistics or ``None``, ``plan``: the budget allocator's choice and error
    estimate, or ``None`` without a target ratio, ``table_weight``: the allocator's weight of
    the table's error, the model's sensitivity to it, or ``None`` when uniform), ``training``
    (both histories), ``data``, ``settings`` (as each stage recorded them), ``versions``,
    ``created``. With ``comparisons`` (``mec compare`` ran and is current), also
    ``comparisons``: its rows (see ``torchrec_mec.pipeline.compare.compare``), and
    ``comparisons_plot``: the AUC-memory plot.

    Raises:
        ArtifactError: a stage output missing or corrupted (names the file).
    """
    data = data_summary(stage_dir(run_dir, "data"))
    if data is None:
        raise FileNotFoundError(f"{os.path.join(stage_dir(run_dir, 'data'), 'manifest.json')} "
                                "not found: run `mec prepare` (or `mec run`) first")
    _, pre = load_artifact(os.path.join(stage_dir(run_dir, "pretrain"), MODEL_FILE),
                           expect_kind=MODEL_KIND)
    _, fine = load_artifact(os.path.join(stage_dir(run_dir, "finetune"), MODEL_FILE),
                            expect_kind=MODEL_KIND)
    compressed = load_compressed(stage_dir(run_dir, "compress"))
    _, comp_meta = load_artifact(os.path.join(stage_dir(run_dir, "compress"), "compressed.mec"))
    metrics = read_metrics(os.path.join(stage_dir(run_dir, "evaluate"), METRICS_FILE))
    plan = comp_meta.get("plan") or {}
    table_weights = comp_meta.get("table_weights") or {}
    tables = {}
    for name, t in metrics["memory"]["tables"].items():
        shape = compressed[name].codebooks.shape[:2] if name in compressed else (0, 0)
        tables[name] = {"rows": t["rows"], "dim": t["dim"], "compressed": t["compressed"],
                        "num_subspaces": int(shape[0]), "codebook_size": int(shape[1]),
                        "bytes_before": t["baseline_bytes"], "bytes_after": t["total_bytes"],
                        "codes_bytes": t["codes_bytes"], "codebooks_bytes": t["codebooks_bytes"],
                        "quantizer": compressed[name].stats if name in compressed else None,
                        "plan": plan.get(name), "table_weight": table_weights.get(name)}
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": os.path.abspath(run_dir),
        "baseline": metrics["baseline"],
        "mec": metrics["mec"],
        "auc_change": (None if metrics["mec"]["auc"] is None or metrics["baseline"]["auc"] is None
                       else metrics["mec"]["auc"] - metrics["baseline"]["auc"]),
        "warnings": metric_warnings(metrics["baseline"]),
        "memory": {**{k: metrics["memory"][k] for k in ("baseline_bytes", "mec_bytes", "ratio")},
                   "target_ratio": comp_meta["settings"].get("target_ratio")},
        "tables": tables,
        "training": {"pretrain": {**pre["history"], "world_size": pre["world_size"]},
                     "finetune": {**fine["history"], "world_size": fine["world_size"]}},
        "data": data,
        "settings": {**pre["settings"], "compress": comp_meta["settings"],
                     **fine["settings"], "evaluate": metrics["settings"]},
        "versions": versions(),
    }
    if comparisons:
        compared = read_comparisons(stage_dir(run_dir, "compare"))
        report["comparisons"] = compared["comparisons"]
        report["comparisons_plot"] = os.path.join(stage_dir(run_dir, "compare"), compared["plot"])
    return report


def metric_warnings(test: Mapping[str, Any]) -> List[str]:
    """Warnings about the test split behind a model's metrics (``num_samples``,
    ``num_positives``): one class only (AUC undefined), or few of a class (AUC noisy).

    Example::

        >>> metric_warnings({"num_samples": 300, "num_positives": 0})
        ['test AUC is undefined: the test split holds one class only (0 positives of 300 rows)']
        >>> metric_warnings({"num_samples": 1000, "num_positives": 40})
        ['the test split has only 40 positives (of 1000 rows): its AUC moves by several hundredths
        with the split alone']
    """
    n, pos = test["num_samples"], test["num_positives"]
    if pos in (0, n):
        return [f"test AUC is undefined: the test split holds one class only ({pos} positives "
                f"of {n} rows)"]
    few = min(pos, n - pos)
    if few < FEW_OF_A_CLASS:
        kind = "positives" if pos <= n - pos else "negatives"
        return [f"the test split has only {few} {kind} (of {n} rows): its AUC moves by several "
                "hundredths with the split alone"]
    return []


def read_report(run_dir: str) -> Dict[str, Any]:
    """``run_dir/report.json`` as written by :func:`write_report`."""
    with g_pathmgr.open(os.path.join(run_dir, REPORT_FILE), "r") as f:
        return json.load(f)


def write_report(run_dir: str, comparisons: bool = False) -> Dict[str, Any]:
    """Writes ``run_dir/report.json`` and the PNG plots under ``run_dir/plots`` (replacing the
    folder, so no plot of an earlier report stays); returns the report (with ``plots``: the PNG
    paths). ``comparisons``: include those of ``mec compare`` (see :func:`build_report`)."""
    report = build_report(run_dir, comparisons)
    plots = os.path.join(run_dir, PLOTS_DIR)
    shutil.rmtree(plots, ignore_errors=True)
    g_pathmgr.mkdirs(plots)
    paths = [plot_training_curves(report, os.path.join(plots, "training_curves.png")),
             plot_memory(report, os.path.join(plots, "memory.png"))]
    compressed = load_compressed(stage_dir(run_dir, "compress"))
    if compressed:
        counts, _ = load_artifact(os.path.join(stage_dir(run_dir, "pretrain"), COUNTS_FILE),
                                  expect_kind=COUNTS_KIND)
        for name, table in sorted(compressed.items()):
            path = os.path.join(plots, f"code_usage_{name}.png")
            paths.append(plot_code_usage(name, table.codes, table.codebooks.shape[1],
                                         counts[name], path))
    report["plots"] = paths
    tmp = os.path.join(run_dir, REPORT_FILE + ".tmp")
    with g_pathmgr.open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(run_dir, REPORT_FILE))
    return report


def summary(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal: what was gained and what it cost.

    Example::

        >>> print(summary({"baseline": {"auc": 0.75, "logloss": 0.47}, "mec": {"auc": 0.749,
        ...     "logloss": 0.471}, "memory": {"baseline_bytes": 4 * 2**20, "mec_bytes": 2**19,
        ...     "ratio": 8.0}, "tables": {"t": {"compressed": True}, "u": {"compressed": False}},
        ...     "settings": {"model": {"name": "dlrm"}}, "run_dir": "runs/x"}))
        MEC (dlrm): 1 of 2 tables compressed
          embedding memory  4.00 MiB -> 512.0 KiB  (8.0x smaller)
          test AUC          0.7500 -> 0.7490  (-0.0010)
          test log loss     0.4700 -> 0.4710  (+0.0010)
          report: runs/x/report.json
    """
    b, m, mem = report["baseline"], report["mec"], report["memory"]
    n_comp = sum(1 for t in report["tables"].values() if t["compressed"])
    if b["auc"] is None or m["auc"] is None:
        auc = "undefined (see the warning below)"
    else:
        auc = f"{b['auc']:.4f} -> {m['auc']:.4f}  ({m['auc'] - b['auc']:+.4f})"
    lines = [
        f"MEC ({report['settings']['model']['name']}): {n_comp} of {len(report['tables'])} "
        f"tables compressed",
        f"  embedding memory  {_bytes(mem['baseline_bytes'])} -> {_bytes(mem['mec_bytes'])}  "
        f"({mem['ratio']:.1f}x smaller)",
        f"  test AUC          {auc}",
        f"  test log loss     {b['logloss']:.4f} -> {m['logloss']:.4f}  "
        f"({m['logloss'] - b['logloss']:+.4f})",
    ]
    fine = report.get("training", {}).get("finetune", {})
    if fine.get("best_epoch") is not None:
        lines.append(f"  fine-tuning       kept epoch {fine['best_epoch']} of "
                     f"{len(fine['epochs']) - 1} (lowest validation log loss; 0 = none)")
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    if report.get("comparisons"):
        lines.append("  at equal embedding memory (mec compare):")
        lines += [f"    {describe(r)}" for r in report["comparisons"]]
    lines.append(f"  report: {os.path.join(report['run_dir'], REPORT_FILE)}")
    return "\n".join(lines)


def plot_training_curves(report: Mapping[str, Any], path: str) -> str:
    """Training loss per step and validation AUC per epoch (0: the starting state), of
    pre-training (the baseline) and of MEC fine-tuning, drawn after it (fine-tuning starts from
    the pre-training epoch that was kept, starred)."""
    pre, fine = report["training"]["pretrain"], report["training"]["finetune"]
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_auc = fig.subplots(1, 2)
    offset = len(pre["step_loss"])
    for hist, start, label, color in ((pre, 0, "pre-training (full tables)", "tab:blue"),
                                      (fine, offset, "MEC fine-tuning (codes)", "tab:orange")):
        loss = np.asarray(hist["step_loss"], dtype=float)
        if loss.size:
            steps = np.arange(start + 1, start + loss.size + 1)
            ax_loss.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(steps, _smooth(loss), color=color, label=label)
        epochs = hist["epochs"]
        ax_auc.plot([start + e["step"] for e in epochs], [_number(e["val_auc"]) for e in epochs],
                    marker="o", color=color, label=label)
        kept = [e for e in epochs if e["epoch"] == hist.get("best_epoch")]
        if kept:
            ax_auc.plot([start + kept[0]["step"]], [_number(kept[0]["val_auc"])], marker="*",
                        markersize=16, color=color, linestyle="none",
                        label=f"kept: epoch {kept[0]['epoch']} (lowest val log loss)")
    for name, label, color in (("baseline", "baseline", "tab:blue"), ("mec", "MEC", "tab:orange")):
        if report[name]["auc"] is not None:
            ax_auc.axhline(report[name]["auc"], color=color, linestyle="--", linewidth=0.8,
                           label=f"test AUC {label} {report[name]['auc']:.4f}")
    ax_loss.set(title="training loss (global batch mean; line: moving average)", xlabel="step",
                ylabel="binary cross-entropy")
    ax_auc.set(title="validation AUC (epoch 0: starting state)", xlabel="step", ylabel="AUC")
    ax_loss.legend()
    ax_auc.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_memory(report: Mapping[str, Any], path: str) -> str:
    """Bytes of every table before and after compression (log scale), largest first."""
    tables = sorted(report["tables"].items(), key=lambda kv: -kv[1]["bytes_before"])
    names = [n for n, _ in tables]
    fig = Figure(figsize=(8, 1.5 + 0.28 * len(names)))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y - 0.2, [t["bytes_before"] for _, t in tables], height=0.4, color="tab:blue",
            label="float32 table")
    ax.barh(y + 0.2, [t["bytes_after"] for _, t in tables], height=0.4, color="tab:orange",
            label="after MEC (codes + codebooks, or the full table)")
    ax.set_yticks(y, [f"{n} ({t['rows']:,} rows, "
                      + (f"M={t['num_subspaces']} K={t['codebook_size']})" if t["compressed"]
                         else "full)") for n, t in tables], fontsize="small")
    ax.invert_yaxis()
    ax.set_xscale("log")
    mem = report["memory"]
    target = (f", target {mem['target_ratio']:g}x" if mem.get("target_ratio") is not None
              else "")
    ax.set(xlabel="bytes", title=f"embedding memory: {_bytes(mem['baseline_bytes'])} -> "
                                 f"{_bytes(mem['mec_bytes'])} ({mem['ratio']:.1f}x{target})")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def code_usage(codes: torch.Tensor, codebook_size: int, counts: torch.Tensor
               ) -> Dict[str, np.ndarray]:
    """Share of each codeword, per codebook, among popular and among rare ids.

    Popular ids are the top ``POPULAR_SHARE`` by training count, rare ids the bottom
    ``RARE_SHARE`` (the quantizer's statistics take the top 1%, too few ids to show usage in
    the small tables of the samples).

    Returns:
        ``{"popular": [M, K], "rare": [M, K]}``, rows summing to 1.

    Example::

        >>> codes = torch.tensor([[0], [0], [1], [1]], dtype=torch.uint8)
        >>> u = code_usage(codes, 2, torch.tensor([100, 50, 1, 1]))
        >>> u["popular"].tolist(), u["rare"].tolist()
        ([[1.0, 0.0]], [[0.0, 1.0]])
    """
    n = codes.shape[0]
    order = torch.argsort(counts, stable=True)
    groups = {"popular": order[n - max(1, math.ceil(POPULAR_SHARE * n)):],
              "rare": order[: max(1, int(RARE_SHARE * n))]}
    out = {}
    for name, rows in groups.items():
        c = codes[rows].long()
        use = np.stack([np.bincount(c[:, m].numpy(), minlength=codebook_size)
                        for m in range(codes.shape[1])]).astype(float)
        out[name] = use / use.sum(axis=1, keepdims=True)
    return out


def plot_code_usage(name: str, codes: torch.Tensor, codebook_size: int, counts: torch.Tensor,
                    path: str) -> str:
    """One panel per codebook: how popular and rare ids spread over its codewords (codewords
    sorted by their share in the two groups together), with each group's perplexity."""
    usage = code_usage(codes, codebook_size, counts)
    m_count = codes.shape[1]
    cols = min(m_count, 4)
    rows = math.ceil(m_count / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    k = np.arange(codebook_size)
    for m in range(m_count):
        ax = axes[m]
        order = np.argsort(-(usage["popular"][m] + usage["rare"][m]), kind="stable")
        for group, color in (("popular", "tab:red"), ("rare", "tab:blue")):
            share = usage[group][m][order]
            ax.fill_between(k, share, step="mid", alpha=0.35, color=color)
            ax.step(k, share, where="mid", color=color, linewidth=0.8,
                    label=f"{group} ids (perplexity {_perplexity(share):.0f})")
        ax.set_yscale("log")
        ax.set(title=f"codebook {m}", xlabel=f"codeword (of K={codebook_size}, by use)",
               ylabel="share of ids (log)")
        ax.legend(fontsize="x-small")
    for ax in axes[m_count:]:
        ax.set_visible(False)
    fig.suptitle(f"{name}: code usage of the top {POPULAR_SHARE:.0%} and bottom "
                 f"{RARE_SHARE:.0%} of ids by training count ({codes.shape[0]:,} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _number(value: Optional[float]) -> float:
    """A metric for plotting: ``None`` (undefined) as NaN, which leaves a gap."""
    return math.nan if value is None else value


def _perplexity(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _smooth(values: np.ndarray, window: Optional[int] = None) -> np.ndarray:
    window = window or max(1, len(values) // 50)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if n / size < 100 else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"

