"""`mec run --format criteo_1tb` on a tiny generated set of TorchRec's preprocessed Criteo 1TB
arrays: the stages read them in place through BinaryCriteoDataset (checked against the adapter
opened directly: splits, table sizes), and the run directory holds no copy of them."""
import json
import os

import numpy as np
import pytest

from tests.pipeline_testing import tiny_settings
from torchrec_mec.cli import main
from torchrec_mec.data import BinaryCriteoDataset
from torchrec_mec.pipeline import load_model, read_metrics
from torchrec_mec.pipeline.prepare import DataSource, open_dataset, prepare

ROWS = (400, 300, 200)  # days 0 and 1 train; day 2 is halved into val and test


@pytest.fixture(scope="module")
def criteo_1tb(tmp_path_factory):
    """day_<d>_{dense,sparse,labels}.npy as torchrec.datasets.criteo writes them: cat_0 takes 60
    values (a table to compress), the other 25 features 3."""
    root = tmp_path_factory.mktemp("criteo_1tb")
    rng = np.random.default_rng(0)
    for day, rows in enumerate(ROWS):
        sparse = rng.integers(0, 3, (rows, 26)).astype(np.int32)
        sparse[:, 0] = rng.integers(0, 60, rows)
        labels = (rng.random((rows, 1)) < 0.2 + 0.01 * sparse[:, :1]).astype(np.int32)
        np.save(root / f"day_{day}_dense.npy", rng.random((rows, 13)).astype(np.float32))
        np.save(root / f"day_{day}_sparse.npy", sparse)
        np.save(root / f"day_{day}_labels.npy", labels)
    return str(root)


def test_run_reads_the_npy_files_in_place(criteo_1tb, tmp_path):
    out = str(tmp_path / "run")
    flags = [f"{k}={json.dumps(v)}" for k, v in {
        "model.embedding_dim": 8, "model.dense_hidden_sizes": [16],
        "model.over_hidden_sizes": [16], "pretrain.epochs": 1, "pretrain.batch_size": 128,
        "finetune.epochs": 1, "finetune.batch_size": 128, "compress.min_rows": 40,
        "compress.quantizer": {"num_subspaces": 2, "codebook_size": 16, "epochs": 1,
                               "samples_per_epoch": 256, "batch_size": 128, "eval_rows": 0,
                               "early_stopping_patience": 0, "kmeans_points_per_centroid": 2},
        "evaluate.batch_size": 128}.items()]
    assert main(["run", "--data", criteo_1tb, "--format", "criteo_1tb", "--out", out,
                 "--preset", "sample", "--no-progress", "--set", *flags]) == 0
    direct = BinaryCriteoDataset(criteo_1tb, train_days=[0, 1], eval_day=2)
    assert os.listdir(os.path.join(out, "data")) == ["manifest.json"]  # no copy of the arrays
    opened = open_dataset(os.path.join(out, "data"))
    assert isinstance(opened, BinaryCriteoDataset)
    assert [opened.num_rows(s) for s in ("train", "val", "test")] == [700, 100, 100]
    metrics = read_metrics(os.path.join(out, "evaluate", "metrics.mec"))
    assert metrics["mec"]["num_samples"] == direct.num_rows("test") == 100
    model, _ = load_model(os.path.join(out, "pretrain"))
    sizes = {c.name: c.num_embeddings
             for c in model.embedding_bag_collection.embedding_bag_configs()}
    assert sizes == {f"t_{f}": n for f, n in direct.num_embeddings.items()}
    assert list(metrics["memory"]["tables"]) and metrics["memory"]["tables"]["t_cat_0"][
        "compressed"]


def test_criteo_1tb_needs_a_folder_of_at_least_two_days(tmp_path):
    with pytest.raises(ValueError, match="needs --data \\(the folder of day_<d>_\\*.npy"):
        DataSource("criteo_1tb")
    (tmp_path / "day_0_dense.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 1 day\\(s\\)"):
        prepare(str(tmp_path), "criteo_1tb", str(tmp_path / "data"), tiny_settings())
