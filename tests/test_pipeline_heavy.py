"""The synthetic claim, at scale (excluded from CI; ``pytest -m heavy``, tens of minutes on 2
cores): on the planted synthetic data with a 2M-id largest table, ``mec run`` reaches an
embedding memory ratio of at least 50x with test AUC within 0.002 of the uncompressed model.
Settings: ``benchmarks/synthetic_large.yaml``; figures in docs/pipeline.md."""
import os
from pathlib import Path

import pytest

from torchrec_mec.pipeline import load_settings, run

CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_large.yaml"


@pytest.mark.heavy
def test_synthetic_large_tables_50x_within_0002_auc(tmp_path):
    settings = load_settings(config_file=str(CONFIG))
    assert max(settings.data.synthetic.table_sizes) >= 1_000_000
    report = run(None, "synthetic", os.path.join(tmp_path, "run"), settings, progress=False)
    assert report["memory"]["ratio"] >= 50
    assert abs(report["mec"]["auc"] - report["baseline"]["auc"]) <= 0.002
