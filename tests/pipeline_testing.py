"""Small settings and data shared by the pipeline tests (seconds per stage on 2 cores)."""
import os
from pathlib import Path
from typing import Any, Dict

from torchrec_mec.pipeline import Settings, load_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo_sample_8k.tsv"
AVAZU_SAMPLE = SHARED_DATA / "avazu_sample_9k.csv"
MISSING_SAMPLE = (f"the real samples are not in {SHARED_DATA} (they sit beside the repository "
                  "in ../shared/data; tests on generated data still run)")

TINY: Dict[str, Any] = {
    "model.embedding_dim": 8, "model.dense_hidden_sizes": [16], "model.over_hidden_sizes": [16],
    "model.dcn_num_layers": 1, "model.dcn_low_rank_dim": 4, "model.deepfm_dimension": 8,
    "data.synthetic.num_rows": 3000, "data.synthetic.table_sizes": [800, 400, 30, 5],
    "data.synthetic.num_dense": 3,
    "pretrain.epochs": 2, "pretrain.batch_size": 128,
    "finetune.epochs": 1, "finetune.batch_size": 128, "finetune.keep_best": False,
    "compress.min_rows": 300,
    "compress.quantizer": {"num_subspaces": 2, "codebook_size": 16, "epochs": 2,
                           "samples_per_epoch": 1024, "batch_size": 512, "eval_rows": 0,
                           "early_stopping_patience": 0, "kmeans_points_per_centroid": 16},
    "evaluate.batch_size": 512,
}
"""Overrides of the ``sample`` preset: 4 tables (801, 401, 31, 6 rows), the two large ones
compressed with M = 2, K = 16; fine-tuning keeps its last epoch (so it always trains)."""


def tiny_settings(**extra: Any) -> Settings:
    """``TINY`` plus ``extra`` (dotted keys with ``__`` for dots: ``pretrain__epochs=1``)."""
    return load_settings("sample", overrides={**TINY, **{k.replace("__", "."): v
                                                         for k, v in extra.items()}})


def tiny_flags() -> list:
    """``TINY`` as ``mec --set`` arguments."""
    import json

    return ["--set"] + [f"{k}={json.dumps(v)}" for k, v in TINY.items()]


def repo_env() -> Dict[str, str]:
    """The environment for a subprocess that imports this checkout."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_criteo(path: Path, num_rows: int, *, positives: float = 0.25, c1_values: int = 400,
                 seed: int = 0) -> str:
    """A Criteo-format TSV of ``num_rows`` rows: C1 takes ``c1_values`` values (a table of about
    that many rows), the other 25 features three values each; a ``positives`` share of labels is
    1 (0.0: a single class)."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(num_rows):
        label = int(rng.random() < positives)
        ints = [str(rng.randint(0, 9)) for _ in range(13)]
        cats = [f"{rng.randrange(c1_values):08x}"] + [f"{rng.randrange(3):08x}" for _ in range(25)]
        lines.append("\t".join([str(label), *ints, *cats]) + "\n")
    path.write_text("".join(lines))
    return str(path)
