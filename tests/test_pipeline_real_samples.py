"""``mec run`` on the real Criteo and Avazu samples in ../shared/data (skipped without them)."""
import json
import os

import pytest

from tests.pipeline_testing import AVAZU_SAMPLE, CRITEO_SAMPLE, MISSING_SAMPLE
from torchrec_mec.cli import main

QUICK = ["--set", "data.max_rows=2000", "pretrain.epochs=1", "finetune.epochs=1",
         "compress.min_rows=64", "compress.quantizer.epochs=1",
         "compress.quantizer.samples_per_epoch=2048",
         "compress.quantizer.early_stopping_patience=0"]


@pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason=MISSING_SAMPLE)
def test_criteo_sample_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "criteo")
    assert main(["run", "--data", str(CRITEO_SAMPLE), "--format", "criteo", "--out", out,
                 "--preset", "sample", "--no-progress", *QUICK]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["data"]["num_rows"]["train"] + report["data"]["num_rows"]["val"] \
        + report["data"]["num_rows"]["test"] == 2000
    assert len(report["tables"]) == 26
    big = {t for t, v in report["tables"].items() if v["rows"] >= 64}
    assert big and {t for t, v in report["tables"].items() if v["compressed"]} == big
    assert report["memory"]["ratio"] > 1.5
    for model in ("baseline", "mec"):
        assert 0.5 < report[model]["auc"] < 1.0
    assert "tables compressed" in capsys.readouterr().out


@pytest.mark.skipif(not AVAZU_SAMPLE.exists(), reason=MISSING_SAMPLE)
def test_avazu_sample_with_deepfm(tmp_path):
    """Avazu has no dense features; DeepFM's dense arch gets a constant input."""
    out = str(tmp_path / "avazu")
    assert main(["run", "--data", str(AVAZU_SAMPLE), "--format", "avazu", "--out", out,
                 "--preset", "sample", "--model", "deepfm", "--no-progress", *QUICK]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["settings"]["model"]["name"] == "deepfm"
    assert any(v["compressed"] for v in report["tables"].values())
    assert 0.0 < report["mec"]["auc"] < 1.0
