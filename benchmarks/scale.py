"""Real-size tables: what building a model of them costs before any table is allocated, and what
each rank holds while the pipeline runs on them.

Default mode: builds a QEBC of two 1B-row tables (D = 128, M = 8, K = 256: 16 GB of codes once allocated) on the
``meta`` device, and, as the baseline in the same process, TorchRec's ``EmbeddingBagCollection``
of the same tables on ``meta``. Per module: the median build time over repeats and the growth of
the process's peak RSS during the builds (``/proc/self/clear_refs`` resets the peak first).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--rows 1000000000 --repeats 20]

``--pipeline DIR``: pretrain -> compress -> finetune -> evaluate on a generated data set whose
tables (``--tables`` x ``--rows`` x ``--dim``, float32) are large and whose rows are few (the point
is memory, not AUC), each stage a fresh job of 2 gloo ranks; then finetune and evaluate again in
1 process from the same pre-training and compression. Prints each rank's peak RSS per stage
against the tables' total and the target (0.6 x tables + 1 GiB), and both evaluations' metrics.
``--embedding-optimizer rowwise_adagrad`` pre-trains with one Adagrad value per row instead of
one per element.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --pipeline /tmp/scale --tables 4 \
        --rows 4194304 --dim 128 --embedding-optimizer rowwise_adagrad
"""
import argparse
import json
import os
import socket
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.pipeline.optimizers import EMBEDDING_OPTIMIZERS

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


def _stage_entry(rank: int, world_size: int, port: int, stage: str, args: Dict[str, Any],
                 result: str) -> None:
    """One rank of one stage in a fresh process (torchrun's environment, one torch thread);
    writes its peak RSS."""
    from torchrec_mec.pipeline import compress, evaluate, finetune, pretrain
    from torchrec_mec.pipeline.parallel import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    init_distributed()
    settings = _settings(args)
    run, data = args["dir"], os.path.join(args["dir"], "data")
    ft, ev = f"finetune_{world_size}", f"evaluate_{world_size}"
    start = time.perf_counter()
    if stage == "pretrain":
        pretrain(data, os.path.join(run, "pretrain"), settings, progress=False)
    elif stage == "compress":
        compress(os.path.join(run, "pretrain"), os.path.join(run, "compress"), settings,
                 progress=False)
    elif stage == "finetune":
        finetune(data, os.path.join(run, "pretrain"), os.path.join(run, "compress"),
                 os.path.join(run, ft), settings, progress=False)
    else:
        evaluate(data, os.path.join(run, "pretrain"), os.path.join(run, ft),
                 os.path.join(run, ev), settings, progress=False)
    with open(f"{result}.rank{rank}", "w") as f:
        json.dump({"peak_rss": _status("VmHWM"), "seconds": time.perf_counter() - start}, f)


def _settings(args: Dict[str, Any]) -> Any:
    from torchrec_mec.pipeline import load_settings

    return load_settings("sample", overrides={
        "model.embedding_dim": args["dim"], "model.dense_hidden_sizes": [32],
        "model.over_hidden_sizes": [32],
        "data.synthetic.num_rows": args["data_rows"],
        "data.synthetic.table_sizes": [args["rows"] - 1] * args["tables"],
        "data.synthetic.num_dense": 4,
        "pretrain.epochs": 1, "pretrain.batch_size": 512, "pretrain.keep_best": False,
        "pretrain.embedding_optimizer": args["embedding_optimizer"],
        "finetune.epochs": 1, "finetune.batch_size": 512, "finetune.keep_best": False,
        "evaluate.batch_size": 1024, "compress.min_rows": 1000,
        "compress.quantizer": {"num_subspaces": 16, "codebook_size": 256, "epochs": 1,
                               "samples_per_epoch": 4096, "batch_size": 1024, "eval_rows": 0,
                               "early_stopping_patience": 0, "kmeans_points_per_centroid": 8}})


def pipeline(args: argparse.Namespace) -> None:
    """The stages on 2 ranks, then finetune and evaluate on 1; prints peak RSS per rank."""
    import torch.multiprocessing as mp

    from torchrec_mec.data import prepare_dataset
    from torchrec_mec.pipeline import read_metrics

    conf = {"dir": args.pipeline, "rows": args.rows, "tables": args.tables, "dim": args.dim,
            "data_rows": args.data_rows, "embedding_optimizer": args.embedding_optimizer}
    settings = _settings(conf)
    prepare_dataset(None, "synthetic", os.path.join(args.pipeline, "data"), progress=False,
                    synthetic=settings.data.synthetic)
    total = args.tables * args.rows * args.dim * 4
    rows: List[Dict[str, Any]] = []
    for stage, world_size in [("pretrain", 2), ("compress", 2), ("finetune", 2),
                              ("evaluate", 2), ("finetune", 1), ("evaluate", 1)]:
        result = os.path.join(args.pipeline, f"rss_{stage}_{world_size}")
        mp.spawn(_stage_entry, args=(world_size, _free_port(), stage, conf, result),
                 nprocs=world_size, join=True)
        for rank in range(world_size):
            with open(f"{result}.rank{rank}") as f:
                rows.append({"stage": stage, "world_size": world_size, "rank": rank,
                             **json.load(f)})
    print(f"{args.tables} tables x {args.rows:,} rows x {args.dim} float32 = "
          f"{total / 2**30:.2f} GiB; {args.data_rows:,} data rows; pre-trained with "
          f"{args.embedding_optimizer}; target per rank "
          f"0.6 x tables + 1 GiB = {(0.6 * total + 2**30) / 2**30:.2f} GiB")
    print("| stage | processes | rank | peak RSS GiB | / tables | within target | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['world_size']} | {r['rank']} | {r['peak_rss'] / 2**30:.2f} | "
              f"{r['peak_rss'] / total:.2f} | "
              f"{'yes' if r['peak_rss'] <= 0.6 * total + 2**30 else 'NO'} | "
              f"{r['seconds']:.0f} |")
    for world_size in (2, 1):
        m = read_metrics(os.path.join(args.pipeline, f"evaluate_{world_size}", "metrics.mec"))
        print(f"evaluate on {world_size}: baseline AUC {m['baseline']['auc']:.4f} logloss "
              f"{m['baseline']['logloss']:.4f}; MEC AUC {m['mec']['auc']:.4f} logloss "
              f"{m['mec']['logloss']:.4f}; memory ratio {m['memory']['ratio']:.1f}x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10**9)
    parser.add_argument("--tables", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pipeline", metavar="DIR",
                        help="run the stages on 2 (and 1) processes in DIR, print peak RSS")
    parser.add_argument("--data-rows", type=int, default=4000,
                        help="generated data rows of --pipeline")
    parser.add_argument("--embedding-optimizer", default="adagrad",
                        choices=EMBEDDING_OPTIMIZERS,
                        help="pre-training's pretrain.embedding_optimizer (--pipeline)")
    args = parser.parse_args()
    if args.pipeline:
        pipeline(args)
        return
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
