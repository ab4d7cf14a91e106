"""Stage 1's baseline against the plain FM reference, on one prepared split, over seeds.

    PYTHONPATH=. .venv/bin/python benchmarks/stage1_fm.py --data FILE --format criteo \\
        --out runs/s1_criteo [--config benchmarks/planted_dev.yaml] [--set KEY=VALUE ...] \\
        [--seeds 0 1 2]

Prepares the data once (``DIR/data``, the settings' ``data`` section), then per seed runs
stage 1 (``pipeline.pretrain`` with ``pretrain.seed`` = the seed; everything else as the
settings say) and the FM (``fm_reference.train_fm``, same seed), and prints validation and test
AUC and log loss of both, mean +- std over the seeds, the planted ceiling when the file has a
``.planted.json`` sidecar (``torchrec_mec.data.planted_tsv``), and writes ``DIR/stage1_fm.json``.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List

import torch

from torchrec_mec.data import EncodedDataset
from torchrec_mec.pipeline import evaluate_model, load_model, load_settings, prepare, pretrain
from torchrec_mec.pipeline.parallel import DistContext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fm_reference import mean_std, train_fm  # noqa: E402

KEYS = ("val_auc", "val_logloss", "test_auc", "test_logloss")


def stage1_scores(data_dir: str, out_dir: str, settings: Any) -> Dict[str, Any]:
    """Runs stage 1 into ``out_dir`` and scores the model it keeps on val and test."""
    start = time.perf_counter()
    pretrain(data_dir, out_dir, settings, progress=False)
    seconds = time.perf_counter() - start
    model, meta = load_model(out_dir)
    ds, ctx = EncodedDataset(data_dir), DistContext(0, 1, torch.device("cpu"))
    out: Dict[str, Any] = {}
    for split in ("val", "test"):
        m = evaluate_model(model, ds, split, settings.evaluate.batch_size, ctx, progress=False)
        out[f"{split}_auc"], out[f"{split}_logloss"] = m.auc, m.logloss
    history = meta["history"]
    out.update(best_epoch=history["best_epoch"], batch_size=history.get("batch_size"),
               epochs_run=history["epochs"][-1]["epoch"], seconds=seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", required=True, choices=("criteo", "avazu"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="published")
    parser.add_argument("--config")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    base = load_settings(args.preset, args.config, overrides)
    data_dir = os.path.join(args.out, "data")
    prepare(args.data, args.format, data_dir, base, progress=False)
    dataset = EncodedDataset(data_dir)
    rows: Dict[str, List[Dict[str, Any]]] = {"stage1": [], "fm": []}
    for seed in args.seeds:
        settings = load_settings(args.preset, args.config,
                                 {**overrides, "pretrain.seed": str(seed)})
        rows["stage1"].append(stage1_scores(data_dir, os.path.join(args.out, f"pretrain_{seed}"),
                                            settings))
        rows["fm"].append(asdict(train_fm(dataset, seed=seed)))
        for name in rows:
            print(f"seed {seed} {name}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in rows[name][-1].items()), flush=True)
    summary: Dict[str, Any] = {"data": args.data, "seeds": args.seeds, "runs": rows,
                               "settings": base.to_dict()["pretrain"],
                               "rows": dataset.manifest["num_rows"],
                               "largest_table": max(dataset.num_embeddings.values())}
    sidecar = args.data + ".planted.json"
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            summary["ceiling_auc"] = json.load(f)["ceiling_auc"]
    print(f"{args.data}: {summary['rows']}, largest table {summary['largest_table']} rows")
    for key in KEYS:
        print(f"  {key:13s} stage 1 {mean_std([r[key] for r in rows['stage1']])}   "
              f"FM {mean_std([r[key] for r in rows['fm']])}")
    gap = [a["test_auc"] - b["test_auc"] for a, b in zip(rows["stage1"], rows["fm"])]
    print(f"  test AUC stage 1 - FM (per seed): {mean_std(gap)}")
    if "ceiling_auc" in summary:
        print(f"  planted ceiling test AUC {summary['ceiling_auc']['test']:.4f}")
    with open(os.path.join(args.out, "stage1_fm.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
