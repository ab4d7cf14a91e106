"""The MEC pipeline as functions over explicit inputs and outputs (paths in, paths out).

``run`` chains them; the ``mec`` command, the TorchX components in ``launchers/``, the tests and
notebooks all call these same functions::

    from torchrec_mec.pipeline import load_settings, run
    report = run("train.txt", "criteo", "runs/criteo", load_settings("published"))

Stages and their folders under a run directory ``DIR`` (see ``outputs.py``): ``prepare`` ->
``DIR/data``, ``pretrain`` -> ``DIR/pretrain``, ``compress`` -> ``DIR/compress``, ``finetune``
-> ``DIR/finetune``, ``evaluate`` -> ``DIR/evaluate``, then ``write_report`` ->
``DIR/report.json`` and ``DIR/plots/``.
"""
from torchrec_mec.pipeline.compress import compress, load_compressed
from torchrec_mec.pipeline.evaluate import Metrics, evaluate, evaluate_model, read_metrics
from torchrec_mec.pipeline.finetune import compressed_model, finetune
from torchrec_mec.pipeline.outputs import load_model, stage_dir
from torchrec_mec.pipeline.pretrain import pretrain
from torchrec_mec.pipeline.report import build_report, summary, write_report
from torchrec_mec.pipeline.run import FORMATS, prepare, run
from torchrec_mec.pipeline.settings import (
    PRESETS,
    CompressSettings,
    DataSettings,
    EvaluateSettings,
    Settings,
    SettingsError,
    TrainSettings,
    load_settings,
)

__all__ = [
    "FORMATS",
    "PRESETS",
    "CompressSettings",
    "DataSettings",
    "EvaluateSettings",
    "Metrics",
    "Settings",
    "SettingsError",
    "TrainSettings",
    "build_report",
    "compress",
    "compressed_model",
    "evaluate",
    "evaluate_model",
    "finetune",
    "load_compressed",
    "load_model",
    "load_settings",
    "prepare",
    "pretrain",
    "read_metrics",
    "run",
    "stage_dir",
    "summary",
    "write_report",
]
