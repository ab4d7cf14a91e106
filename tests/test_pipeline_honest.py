"""Honest results: an undefined AUC is null (not 0.0) with a warning, a diverged training stops
with the stage, the step and the learning rates, and a data set too small to split says so
before any training."""
import os

import numpy as np

from tests.pipeline_testing import tiny_flags, write_criteo
from torchrec_mec.cli import main
from torchrec_mec.pipeline import read_report
from torchrec_mec.pipeline.report import metric_warnings, summary

CRITEO_TINY = ["--set", "data.min_count=1", "compress.min_rows=300"]


def test_single_class_test_split_gives_a_null_auc_and_a_warning(tmp_path, capsys):
    """Issue 11: with all labels 0 the summary said `test AUC 0.0000 -> 0.0000`."""
    data = write_criteo(tmp_path / "zeros.tsv", 1500, positives=0.0)
    out = str(tmp_path / "run")
    assert main(["run", "--data", data, "--format", "criteo", "--out", out, "--preset", "sample",
                 "--no-progress", *tiny_flags(), *CRITEO_TINY]) == 0
    printed = capsys.readouterr().out
    report = read_report(out)
    n_test = len(np.load(os.path.join(out, "data", "test", "labels.npy")))
    assert report["baseline"]["auc"] is None and report["mec"]["auc"] is None
    assert report["auc_change"] is None
    with open(os.path.join(out, "report.json")) as f:
        assert '"auc": null' in f.read()
    assert report["baseline"]["num_positives"] == 0 and report["baseline"]["num_samples"] == n_test
    assert "test AUC          undefined" in printed
    assert (f"warning: test AUC is undefined: the test split holds one class only (0 positives "
            f"of {n_test} rows)") in printed
    # Validation was one class too: its AUC is recorded as undefined, never as 0.0.
    assert all(e["val_auc"] is None for e in report["training"]["pretrain"]["epochs"])


def test_few_positives_warn_with_the_count():
    assert metric_warnings({"num_samples": 10_000, "num_positives": 9_950}) == [
        "the test split has only 50 negatives (of 10000 rows): its AUC moves by several "
        "hundredths with the split alone"]
    assert metric_warnings({"num_samples": 10_000, "num_positives": 100}) == []
    text = summary({"baseline": {"auc": 0.7, "logloss": 0.5}, "mec": {"auc": 0.71, "logloss": 0.5},
                    "memory": {"baseline_bytes": 8, "mec_bytes": 4, "ratio": 2.0}, "tables": {},
                    "settings": {"model": {"name": "dlrm"}}, "run_dir": "r",
                    "warnings": metric_warnings({"num_samples": 500, "num_positives": 12})})
    assert "  warning: the test split has only 12 positives (of 500 rows)" in text


def test_one_row_file_says_the_splits_are_empty_before_training(tmp_path, capsys):
    """Issue 11: a 1-row file failed inside torchmetrics ("No samples to concatenate")."""
    data = write_criteo(tmp_path / "one.tsv", 1)
    out = tmp_path / "run"
    status = main(["run", "--data", data, "--format", "criteo", "--out", str(out), "--preset",
                   "sample", "--no-progress", *tiny_flags(), *CRITEO_TINY])
    err = capsys.readouterr().err
    assert status in (1, 2) and "split is empty (" in err, err
    assert not (out / "pretrain").exists()


def test_diverged_training_stops_naming_stage_step_and_learning_rates(tmp_path, capsys):
    """Issue 11: with learning rates of 1e30 the loss was NaN, keep_best kept the untrained
    epoch 0 and the summary claimed +0.119 AUC."""
    out = str(tmp_path / "run")
    assert main(["prepare", "--format", "synthetic", "--out", out, "--preset", "sample",
                 "--no-progress", *tiny_flags()]) == 0
    status = main(["pretrain", "--out", out, "--preset", "sample", "--no-progress",
                   *tiny_flags(), "pretrain.dense_lr=1e30", "pretrain.embedding_lr=1e30"])
    err = capsys.readouterr().err
    assert status == 1
    assert "mec pretrain: error: pretrain: the training loss is " in err
    assert "dense_lr=1e+30 and embedding_lr=1e+30: training diverged" in err
    step = int(err.split(" at step ")[1].split()[0])
    assert step >= 1
    assert not os.path.exists(os.path.join(out, "pretrain", "model.mec"))
    assert not os.path.exists(os.path.join(out, "lineage", "pretrain.json"))
