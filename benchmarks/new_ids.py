"""New ids after compression: test AUC and memory of four ways to serve them, same data, same run.

A time-split planted data set (``SyntheticConfig`` with a drift, docs/data.md): the training
split (the first 60% of rows) holds only old ids; from the validation split on (the traffic
after compression, 20%), 30% of the draws of the three largest features are ids that did not
exist before; the test split (last 20%) has the same drift. Per seed (model and quantizer seeds;
the data set is the same), one pipeline run pre-trains DLRM on the training split and compresses
its large tables (stages 1 and 2, ``torchrec_mec.pipeline``); then each model trains one pass
over the validation split (the same batches) and is scored on the test split:

* uncompressed: the pre-trained model (full tables have rows for the new ids, which the pass
  trains);
* OOV-only: the compressed model (``compressed_model``) where every new id of a table reads one
  shared row, trainable (a fallback table of one row: the out-of-vocabulary row);
* fallback: a hashed fallback table of ``--fallback-fraction`` of the coded rows per table;
* fallback + promotion: the same, plus ``--promotion-fraction`` promotion slots; the pass is cut
  into ``--rounds`` consecutive parts and after each part the new ids seen at least
  ``--min-count`` times so far are promoted (``torchrec_mec.quantize.promote_frequent``, what
  ``mec update`` runs after its training), most frequent first.

Memory: ``memory_report()`` of each embedding collection (codes, codebooks, full tables,
fallback tables and promoted ids; float32 tables for the uncompressed model). "Recovered" is
(AUC - AUC of OOV-only) / (AUC of uncompressed - AUC of OOV-only).

    PYTHONPATH=. python benchmarks/new_ids.py                 # the figures in docs/new_ids.md
    PYTHONPATH=. python benchmarks/new_ids.py --quick         # a smoke test (about a minute)
"""
import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_mec.data import EncodedDataset
from torchrec_mec.models import CTRModel, table_name
from torchrec_mec.modules import ProductQuantizedTable, QuantizedEmbeddingBagCollection
from torchrec_mec.pipeline import DataSource, NewIdSettings, load_model, load_settings, run_stages
from torchrec_mec.pipeline.evaluate import evaluate_model
from torchrec_mec.pipeline.finetune import compressed_model
from torchrec_mec.pipeline.parallel import init_distributed
from torchrec_mec.pipeline.settings import TrainSettings
from torchrec_mec.pipeline.training import build_optimizer
from torchrec_mec.quantize import promote_frequent

TABLES = [200_000, 100_000, 20_000, 5_000, 1_000, 100, 20, 5]
NEW_IDS = [20_000, 10_000, 2_000, 0, 0, 0, 0, 0]


def settings(rows: int, seed: int, quick: bool):
    table_sizes = [max(t // 10, 5) for t in TABLES] if quick else TABLES
    new_ids = [n // 10 for n in NEW_IDS] if quick else NEW_IDS
    return load_settings("sample", overrides={
        "model": {"embedding_dim": 16, "dense_hidden_sizes": [64], "over_hidden_sizes": [64, 32]},
        "data.split": [0.6, 0.2, 0.2],
        "data.synthetic": {"num_rows": rows, "table_sizes": table_sizes, "new_ids": new_ids,
                           "new_id_share": 0.3, "new_id_start": 0.6, "num_dense": 13},
        "pretrain": {"epochs": 1, "batch_size": 1024, "dense_lr": 1e-3, "embedding_lr": 0.05,
                     "seed": seed, "keep_best": False},
        "compress.min_rows": 500 if quick else 5000,
        "compress.quantizer": {"num_subspaces": 4, "codebook_size": 256, "epochs": 10,
                               "samples_per_epoch": 16384, "batch_size": 2048, "seed": seed},
    })


def new_id_share(data: EncodedDataset, model: CTRModel) -> Dict[str, float]:
    """Of the test split: the share of lookups of tables with a fallback that read new ids,
    and the share of rows with at least one."""
    sparse = torch.from_numpy(data.arrays("test")["sparse"][:].astype("int64"))
    qebc = model.embedding_bag_collection
    new = torch.zeros(sparse.shape[0], dtype=torch.bool)
    lookups = new_lookups = 0
    for j, f in enumerate(data.schema.sparse_names):
        table = qebc.embedding_bags[table_name(f)]
        if isinstance(table, ProductQuantizedTable) and table.fallback is not None:
            is_new = sparse[:, j] >= table.coded_rows
            lookups += sparse.shape[0]
            new_lookups += int(is_new.sum())
            new |= is_new
    return {"lookups": new_lookups / lookups, "rows": float(new.float().mean())}


def stream_pass(model: CTRModel, data: EncodedDataset, train: TrainSettings,
                after_part: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
                parts: int = 1) -> None:
    """One pass over the validation split (the traffic after compression), batches shuffled by
    ``train.seed``; ``after_part(counts so far)`` runs after each of ``parts`` consecutive
    parts. Adam for dense parts, Adagrad for tables, codebooks and fallbacks (as the pipeline)."""
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for bag in module.embedding_bags.values():
                bag.sparse = True  # as the pipeline's single-process training
    optimizer, _ = build_optimizer(model, train)
    batches = list(data.batches("val", train.batch_size, shuffle=True, seed=train.seed))
    part = -(-len(batches) // parts)
    counts = {table_name(f): torch.zeros(n, dtype=torch.int64) for f, n in data.num_embeddings.items()}
    model.train()
    for i, batch in enumerate(batches):
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_part is None:
            continue
        for f, jt in batch.sparse_features.to_dict().items():
            counts[table_name(f)] += torch.bincount(jt.values(), minlength=counts[table_name(f)].numel())
        if (i + 1) % part == 0 or i + 1 == len(batches):
            after_part(counts)


def memory(model: CTRModel) -> int:
    ebc = model.embedding_bag_collection
    if isinstance(ebc, QuantizedEmbeddingBagCollection):
        return ebc.memory_report().total_bytes
    return sum(p.numel() * p.element_size() for p in ebc.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--fallback-fraction", type=float, default=0.001)
    parser.add_argument("--promotion-fraction", type=float, default=0.008)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small tables and rows: a smoke test")
    parser.add_argument("--out", help="run directories (default: a temporary folder)")
    args = parser.parse_args()
    rows = 20_000 if args.quick else args.rows
    root = args.out or tempfile.mkdtemp(prefix="new_ids_")
    ctx = init_distributed()
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {torch.get_num_threads()}"
          f" threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    names = ["uncompressed", "OOV-only", "fallback", "fallback + promotion"]
    results: Dict[str, Dict[str, List[float]]] = {n: {"auc": [], "bytes": []} for n in names}
    for seed in args.seeds:
        s = settings(rows, seed, args.quick)
        out = os.path.join(root, f"seed{seed}")
        run_stages(out, "compress", s, source=DataSource("synthetic"),
                   redo=("prepare", "pretrain", "compress"), progress=False)
        data = EncodedDataset(os.path.join(out, "data"))
        pretrain, compress = os.path.join(out, "pretrain"), os.path.join(out, "compress")
        torch.manual_seed(seed)
        models = {
            "uncompressed": load_model(pretrain)[0],
            # ceil(1e-9 x coded rows) = 1 fallback row per table: the shared OOV row
            "OOV-only": compressed_model(pretrain, compress, NewIdSettings(fallback_fraction=1e-9)),
            "fallback": compressed_model(pretrain, compress,
                                         NewIdSettings(fallback_fraction=args.fallback_fraction)),
            "fallback + promotion": compressed_model(pretrain, compress, NewIdSettings(
                fallback_fraction=args.fallback_fraction,
                promotion_fraction=args.promotion_fraction)),
        }
        share = new_id_share(data, models["fallback"])
        stream = TrainSettings(epochs=1, batch_size=1024, dense_lr=1e-3, embedding_lr=0.05,
                               seed=seed, keep_best=False)
        for name, model in models.items():
            if name == "fallback + promotion":
                qebc = model.embedding_bag_collection
                stream_pass(model, data, stream, parts=args.rounds,
                            after_part=lambda counts, q=qebc: promote_frequent(q, counts, args.min_count))
                promoted = sum(t.num_promoted for t in qebc.embedding_bags.values()
                               if isinstance(t, ProductQuantizedTable))
            else:
                stream_pass(model, data, stream)
            metrics = evaluate_model(model.eval(), data, "test", 8192, ctx, progress=False)
            results[name]["auc"].append(float(metrics.auc))
            results[name]["bytes"].append(float(memory(model)))
        print(f"seed {seed}: test AUC " + ", ".join(f"{n} {results[n]['auc'][-1]:.4f}" for n in names)
              + f"; {promoted} ids promoted; new ids: {100 * share['lookups']:.1f}% of the drifting"
              f" tables' test lookups, {100 * share['rows']:.1f}% of test rows "
              f"({time.time() - started:.0f} s)", flush=True)

    def stat(values: List[float]) -> str:
        return f"{statistics.mean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

    oov, full = results["OOV-only"], results["uncompressed"]
    print(f"\n{'model':<22} {'test AUC (mean +- std)':>24} {'recovered':>10} {'embedding bytes':>16}"
          f" {'vs OOV-only':>12}")
    for name in names:
        r = results[name]
        recovered = [(a - o) / (u - o) for a, o, u in zip(r["auc"], oov["auc"], full["auc"])]
        extra = statistics.mean(r["bytes"]) / statistics.mean(oov["bytes"]) - 1
        print(f"{name:<22} {stat(r['auc']):>24} {100 * statistics.mean(recovered):>9.0f}%"
              f" {statistics.mean(r['bytes']):>16,.0f} {100 * extra:>+11.2f}%")
    gap = [u - o for u, o in zip(full["auc"], oov["auc"])]
    print(f"# OOV-only loses {stat(gap)} AUC against the uncompressed model; 'recovered' is the "
          f"mean over seeds of the share of it a model wins back. {len(args.seeds)} seeds, "
          f"{time.time() - started:.0f} s, load average {os.getloadavg()[0]:.1f} at end; runs in {root}")


if __name__ == "__main__":
    main()
