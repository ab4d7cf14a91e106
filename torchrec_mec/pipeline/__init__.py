"""The MEC pipeline: stages as functions over explicit inputs and outputs, one declared graph of
them (``graph.STAGES``) and one runner (``run_stages``) that brings a run directory up to date
under a lock, with lineage and verified outputs.

``run`` runs every stage; the ``mec`` command, the TorchX component in ``launchers/`` and the
tests go through the same runner, and notebooks can call the stage functions directly::

    from torchrec_mec.pipeline import load_settings, run
    report = run("train.txt", "criteo", "runs/criteo", load_settings("published"))

Stages and what they write under a run directory ``DIR`` (see ``graph.py``): ``prepare`` ->
``DIR/data``, ``pretrain`` -> ``DIR/pretrain``, ``compress`` -> ``DIR/compress``, ``finetune``
-> ``DIR/finetune``, ``evaluate`` -> ``DIR/evaluate``, ``report`` -> ``DIR/report.json`` and
``DIR/plots/``; each one's lineage in ``DIR/lineage/<stage>.json``. ``update`` (``mec update``,
not part of ``run``) -> ``DIR/update``: new ids promoted to codes (docs/new_ids.md); ``compare``
(``mec compare`` or ``run(..., compare=True)``) -> ``DIR/compare``: MEC against the alternatives
at equal embedding memory.
"""
from torchrec_mec.pipeline.compare import compare, read_comparisons
from torchrec_mec.pipeline.compress import compress, load_compressed
from torchrec_mec.pipeline.evaluate import Metrics, evaluate, evaluate_model, read_metrics
from torchrec_mec.pipeline.finetune import compressed_model, finetune
from torchrec_mec.pipeline.graph import RUN_STAGE_NAMES, STAGE_NAMES, STAGES, Stage, StageCall
from torchrec_mec.pipeline.lock import RunLock, RunLockedError
from torchrec_mec.pipeline.outputs import load_model, stage_dir
from torchrec_mec.pipeline.prepare import FORMATS, DataSource, prepare
from torchrec_mec.pipeline.pretrain import pretrain
from torchrec_mec.pipeline.report import build_report, read_report, summary, write_report
from torchrec_mec.pipeline.run import run
from torchrec_mec.pipeline.runner import StageError, StageOutcome, run_stages
from torchrec_mec.pipeline.training import TrainingDivergedError
from torchrec_mec.pipeline.settings import (
    PRESETS,
    CompressSettings,
    DataSettings,
    EvaluateSettings,
    FinetuneSettings,
    NewIdSettings,
    Settings,
    SettingsError,
    TrainSettings,
    UpdateSettings,
    load_settings,
)
from torchrec_mec.pipeline.update import update

__all__ = [
    "FORMATS",
    "PRESETS",
    "RUN_STAGE_NAMES",
    "STAGES",
    "STAGE_NAMES",
    "CompressSettings",
    "DataSettings",
    "DataSource",
    "EvaluateSettings",
    "FinetuneSettings",
    "NewIdSettings",
    "Metrics",
    "RunLock",
    "RunLockedError",
    "Settings",
    "SettingsError",
    "Stage",
    "StageCall",
    "StageError",
    "StageOutcome",
    "TrainSettings",
    "TrainingDivergedError",
    "UpdateSettings",
    "build_report",
    "compare",
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
    "read_comparisons",
    "read_metrics",
    "read_report",
    "run",
    "run_stages",
    "stage_dir",
    "summary",
    "update",
    "write_report",
]
