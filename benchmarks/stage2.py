"""Stage 2 variants on pre-trained models: test AUC, traffic-weighted error, memory and time.

For every pre-trained run (``--runs``: run directories whose ``pretrain/`` is done, one per
pre-training seed), every quantizer variant (``--variants``) and every quantizer seed
(``--seeds``), runs the pipeline's stage 2 (``compress``) into ``<run>/bench/<name>/``, scores
the compressed model on the validation and test splits before fine-tuning and, with
``--finetune``, after stage 3 (``finetune``, the run's settings), next to the uncompressed model
scored in the same process. Prints one line per result and a summary (mean +- std over runs
and seeds) and writes ``--out`` (JSON).

    # the settings the runs were made with, then the variants at a memory budget
    PYTHONPATH=. .venv/bin/python benchmarks/stage2.py --config runs/dev.yaml \\
        --runs runs/dev0 runs/dev1 runs/dev2 --target-ratio 50 \\
        --variants kmeans_pq mec_kmeans mec --seeds 0 1 2 --finetune

Variants (``VARIANTS``): ``kmeans_pq`` (plain k-means PQ, every row weighing 1: MEC's terms
off), ``mec_kmeans`` (MEC's traffic weighting, its k-means initialisation only, no gradient
training), ``mec`` (the default quantizer), ``mec_published`` (MEC with its published
``max(1, floor(log2 n))`` weights), ``mec_unseen_mean`` / ``mec_unseen_keep`` (``mec_kmeans``
with the rows never seen in training decoded to the codes of their mean, or kept exactly:
what an unseen row should decode to), ``mec_distill`` / ``mec_kmeans_distill`` /
``kmeans_pq_distill`` (``mec`` / ``mec_kmeans`` / ``kmeans_pq`` with stage 3 distilled from the
pre-trained model, ``finetune.distill_weight`` 0.5). "traffic error" is the squared reconstruction error per
lookup on the validation split's traffic (rows never seen in training included), summed over
tables; "stage 2 s" the wall and CPU seconds of ``compress``.
"""
import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec_mec.artifacts import load_artifact  # noqa: E402
from torchrec_mec.data import EncodedDataset  # noqa: E402
from torchrec_mec.models import table_name  # noqa: E402
from torchrec_mec.pipeline import (  # noqa: E402
    compress,
    compressed_model,
    evaluate_model,
    finetune,
    load_compressed,
    load_model,
    load_settings,
    stage_dir,
)
from torchrec_mec.pipeline.compress import CODES_DIR, CODES_KIND  # noqa: E402
from torchrec_mec.pipeline.state_dirs import ONE_PROCESS, save_state  # noqa: E402
from torchrec_mec.pipeline.parallel import DistContext  # noqa: E402
from torchrec_mec.pipeline.settings import Settings  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """A stage-2 configuration: settings overrides, and an optional rewrite of the codes of
    the rows never seen in training (``unseen``: ``"mean"`` or ``"keep"``)."""

    overrides: Dict[str, Any]
    unseen: Optional[str] = None


VARIANTS: Dict[str, Variant] = {
    "kmeans_pq": Variant({"compress.method": "kmeans_pq"}),
    "mec_kmeans": Variant({"compress.quantizer.epochs": 0}),
    "mec": Variant({}),
    "mec_published": Variant({"compress.quantizer.weighting": "published"}),
    "mec_unseen_mean": Variant({"compress.quantizer.epochs": 0}, unseen="mean"),
    "mec_unseen_keep": Variant({"compress.quantizer.epochs": 0}, unseen="keep"),
    "mec_distill": Variant({"finetune.distill_weight": 0.5}),
    "mec_kmeans_distill": Variant({"compress.quantizer.epochs": 0,
                                   "finetune.distill_weight": 0.5}),
    "kmeans_pq_distill": Variant({"compress.method": "kmeans_pq",
                                  "finetune.distill_weight": 0.5}),
}


def rewrite_unseen(compress_dir: str, pretrain_dir: str) -> None:
    """Gives the rows never seen in training the codes nearest the mean of those rows.
    (``keep``, the unseen rows exactly as they were, has no codes: it is measured on the
    decoded model, :func:`decoded_model`.)"""
    tables = load_model(pretrain_dir)[0].embedding_bag_collection.state_dict()
    counts, _ = load_artifact(os.path.join(pretrain_dir, "counts.mec"))
    codes = {}
    for t, c in load_compressed(compress_dir).items():
        weight = tables[f"embedding_bags.{t}.weight"]
        unseen = counts[t] == 0
        if bool(unseen.any()):
            m, _, d = c.codebooks.shape
            target = weight[unseen].mean(0).view(m, 1, d)
            nearest = (c.codebooks - target).pow(2).sum(-1).argmin(-1)  # [M]
            c.codes[unseen] = nearest.to(c.codes.dtype)
        codes[f"embedding_bags.{t}.codes"] = c.codes
        codes[f"embedding_bags.{t}.codebooks"] = c.codebooks
    save_state(os.path.join(compress_dir, CODES_DIR), codes, ONE_PROCESS, CODES_KIND, {})


def decoded_model(pretrain_dir: str, compress_dir: str, keep_unseen: bool) -> torch.nn.Module:
    """The pre-trained model with each compressed table replaced by its decoded rows (rows
    never seen in training kept as they were with ``keep_unseen``)."""
    model, _ = load_model(pretrain_dir)
    counts, _ = load_artifact(os.path.join(pretrain_dir, "counts.mec"))
    with torch.no_grad():
        for t, c in load_compressed(compress_dir).items():
            decoded = c.codebooks[torch.arange(c.codes.shape[1]), c.codes.long()].flatten(1)
            weight = model.embedding_bag_collection.embedding_bags[t].weight
            if keep_unseen:
                unseen = counts[t] == 0
                decoded[unseen] = weight[unseen]
            weight.copy_(decoded)
    return model


def traffic_error(pretrain_dir: str, compress_dir: str, dataset: EncodedDataset) -> float:
    """Squared reconstruction error per lookup on the validation traffic, summed over tables."""
    tables = load_model(pretrain_dir)[0].embedding_bag_collection.state_dict()
    val = {table_name(f): c.double() for f, c in dataset.id_counts("val").items()}
    total = 0.0
    for t, c in load_compressed(compress_dir).items():
        decoded = c.codebooks[torch.arange(c.codes.shape[1]), c.codes.long()].flatten(1)
        err = (decoded - tables[f"embedding_bags.{t}.weight"]).pow(2).sum(1).double()
        total += float((err * val[t]).sum() / val[t].sum())
    return total


def scores(model: torch.nn.Module, dataset: EncodedDataset, batch: int) -> Dict[str, float]:
    ctx = DistContext(0, 1, torch.device("cpu"))
    out = {}
    for split in ("val", "test"):
        m = evaluate_model(model, dataset, split, batch, ctx, progress=False)
        out[f"{split}_auc"], out[f"{split}_logloss"] = m.auc, m.logloss
    return out


def one(run: str, name: str, seed: int, settings: Settings, args: argparse.Namespace,
        dataset: EncodedDataset) -> Dict[str, Any]:
    variant = VARIANTS[name]
    overrides = {**variant.overrides, "compress.quantizer.seed": seed}
    if args.target_ratio is not None:
        overrides["compress.target_ratio"] = args.target_ratio
    s = load_settings(args.preset, args.config, {**overrides, **dict(args.set)})
    pre = stage_dir(run, "pretrain")
    out = os.path.join(run, "bench", f"{name}_r{args.target_ratio}_s{seed}")
    started, cpu = time.perf_counter(), time.process_time()
    compress(pre, os.path.join(out, "compress"), s, progress=args.progress)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if variant.unseen == "mean":
        rewrite_unseen(os.path.join(out, "compress"), pre)
    row: Dict[str, Any] = {"run": run, "variant": name, "seed": seed, "stage2_s": seconds,
                           "stage2_cpu_s": cpu,
                           "traffic_error": traffic_error(pre, os.path.join(out, "compress"),
                                                          dataset)}
    model = compressed_model(pre, os.path.join(out, "compress"))
    mem = model.embedding_bag_collection.memory_report()
    row["ratio"] = mem.ratio
    row["shapes"] = {t: list(c.codebooks.shape[:2])
                     for t, c in load_compressed(os.path.join(out, "compress")).items()}
    if variant.unseen == "keep":
        model = decoded_model(pre, os.path.join(out, "compress"), keep_unseen=True)
    row.update({f"before_{k}": v for k, v in scores(model, dataset, args.eval_batch).items()})
    if args.finetune and variant.unseen != "keep":
        fine = os.path.join(out, "finetune")
        finetune(stage_dir(run, "data"), pre, os.path.join(out, "compress"), fine, s,
                 force=True, progress=args.progress)
        tuned, _ = load_model(fine)
        row.update({f"after_{k}": v for k, v in scores(tuned, dataset, args.eval_batch).items()})
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run dirs with pretrain/ done")
    parser.add_argument("--preset", default="published")
    parser.add_argument("--config", help="the settings file the runs were made with")
    parser.add_argument("--set", nargs="*", default=[], type=lambda kv: kv.split("=", 1),
                        metavar="KEY=VALUE", help="further overrides for every variant")
    parser.add_argument("--variants", nargs="+", default=["kmeans_pq", "mec_kmeans", "mec"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--target-ratio", type=float)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--finetune", action="store_true", help="also score after stage 3")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--eval-batch", type=int, default=16384)
    parser.add_argument("--keep", action="store_true", help="keep each variant's folder")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default="runs/stage2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    baselines: Dict[str, Dict[str, float]] = {}
    for run in args.runs:
        dataset = EncodedDataset(stage_dir(run, "data"))
        base, _ = load_model(stage_dir(run, "pretrain"))
        baselines[run] = scores(base, dataset, args.eval_batch)
        print(f"{run}: baseline val AUC {baselines[run]['val_auc']:.4f}, test AUC "
              f"{baselines[run]['test_auc']:.4f}", flush=True)
        for name in args.variants:
            for seed in args.seeds:
                r = one(run, name, seed, load_settings(args.preset, args.config), args, dataset)
                for k in ("val_auc", "test_auc", "val_logloss", "test_logloss"):
                    for when in ("before", "after"):
                        if f"{when}_{k}" in r:
                            r[f"{when}_{k}_change"] = r[f"{when}_{k}"] - baselines[run][k]
                rows.append(r)
                after = (f", after stage 3 {r['after_test_auc_change']:+.4f}"
                         if "after_test_auc_change" in r else "")
                print(f"  {name:16s} seed {seed}: {r['ratio']:.1f}x, traffic error "
                      f"{r['traffic_error']:.4f}, test AUC change before stage 3 "
                      f"{r['before_test_auc_change']:+.4f}{after}; stage 2 "
                      f"{r['stage2_s']:.0f} s (cpu {r['stage2_cpu_s']:.0f} s)", flush=True)
    print(f"\n{'variant':16s} {'ratio':>7s} {'traffic error':>17s} {'test AUC change before':>24s} "
          f"{'after stage 3':>18s} {'val AUC change after':>21s} {'stage 2 cpu s':>14s}")
    for name in args.variants:
        sel = [r for r in rows if r["variant"] == name]
        pick: Callable[[str], List[float]] = lambda k: [r[k] for r in sel if k in r]  # noqa: E731
        print(f"{name:16s} {statistics.fmean(pick('ratio')):7.1f} "
              f"{_mean_std(pick('traffic_error')):>17s} "
              f"{_mean_std(pick('before_test_auc_change')):>24s} "
              f"{_mean_std(pick('after_test_auc_change')):>18s} "
              f"{_mean_std(pick('after_val_auc_change')):>21s} "
              f"{statistics.fmean(pick('stage2_cpu_s')):14.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "baselines": baselines, "rows": rows,
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                   "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
