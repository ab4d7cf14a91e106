"""``prepare`` (the data step) and ``run`` (every stage, then the report)."""
import logging
from typing import Any, Dict, Optional

from torchrec_mec.data import prepare_dataset
from torchrec_mec.pipeline.compress import compress
from torchrec_mec.pipeline.evaluate import evaluate
from torchrec_mec.pipeline.finetune import finetune
from torchrec_mec.pipeline.outputs import stage_dir
from torchrec_mec.pipeline.parallel import barrier, init_distributed
from torchrec_mec.pipeline.pretrain import pretrain
from torchrec_mec.pipeline.report import write_report
from torchrec_mec.pipeline.settings import Settings

logger = logging.getLogger(__name__)

FORMATS = ("criteo", "avazu", "synthetic")


def prepare(
    data: Optional[str],
    format: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Encodes the raw data set (or generates the synthetic one) into ``out_dir``.

    Under torchrun rank 0 prepares and the others wait. A finished set with the same source
    and settings is reused (``prepare_dataset`` checks its checksums).

    Args:
        data (Optional[str]): the raw file (Criteo TSV, Avazu CSV); ``None`` for ``synthetic``.
        format (str): ``"criteo"``, ``"avazu"`` or ``"synthetic"``.
        out_dir (str): the data set folder (``DIR/data`` in a run).
        settings (Settings): uses ``data``.
        force (bool): prepare again even if a matching set exists.
        progress (bool): show progress bars.

    Returns:
        str: ``out_dir``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "synthetic" and data is not None:
        raise ValueError("--format synthetic generates its data: give no --data "
                         "(its settings are data.synthetic.*)")
    if format != "synthetic" and data is None:
        raise ValueError(f"--format {format} needs --data (the raw file)")
    ctx = init_distributed()
    if ctx.is_main:
        s = settings.data
        prepare_dataset(data, format, out_dir, min_count=s.min_count, split=s.split, seed=s.seed,
                        bad_rows=s.bad_rows, max_rows=s.max_rows,
                        synthetic=s.synthetic if format == "synthetic" else None,
                        overwrite=force, progress=progress)
    barrier(ctx)
    return out_dir


def run(
    data: Optional[str],
    format: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """MEC end to end: prepare, pre-train, compress, fine-tune, evaluate, report.

    Each stage writes under ``out_dir/<stage>`` and is skipped when its outputs are up to date,
    so a killed run continues where it stopped (training from its last checkpoint).

    Args:
        data (Optional[str]): the raw file; ``None`` for ``format="synthetic"``.
        format (str): ``"criteo"``, ``"avazu"`` or ``"synthetic"``.
        out_dir (str): the run directory.
        settings (Settings): all stages' settings.
        force (bool): rerun every stage.
        progress (bool): show progress bars.

    Returns:
        Dict[str, Any]: the report (also in ``out_dir/report.json``) on rank 0; ``{}`` on the
        other ranks.
    """
    d = {stage: stage_dir(out_dir, stage) for stage in
         ("data", "pretrain", "compress", "finetune", "evaluate")}
    common = {"force": force, "progress": progress}
    prepare(data, format, d["data"], settings, **common)
    pretrain(d["data"], d["pretrain"], settings, **common)
    compress(d["pretrain"], d["compress"], settings, **common)
    finetune(d["data"], d["pretrain"], d["compress"], d["finetune"], settings, **common)
    evaluate(d["data"], d["pretrain"], d["finetune"], d["evaluate"], settings, **common)
    ctx = init_distributed()
    report = write_report(out_dir) if ctx.is_main else {}
    barrier(ctx)
    return report
