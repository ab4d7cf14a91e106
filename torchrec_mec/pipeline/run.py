"""``run``: MEC end to end, every stage of the graph brought up to date, then the report."""
from typing import Any, Dict, Optional

from torchrec_mec.pipeline.graph import RUN_STAGE_NAMES
from torchrec_mec.pipeline.parallel import init_distributed
from torchrec_mec.pipeline.prepare import DataSource
from torchrec_mec.pipeline.report import read_report
from torchrec_mec.pipeline.runner import run_stages
from torchrec_mec.pipeline.settings import Settings


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

    Every stage that is not up to date runs (``runner.run_stages`` with every stage allowed to
    run): a killed run continues where it stopped (training from its last checkpoint), a changed
    setting or input redoes the stages it affects, damaged outputs are redone, and finished,
    verified stages are skipped.

    Args:
        data (Optional[str]): the raw file; ``None`` for ``format="synthetic"``.
        format (str): ``"criteo"``, ``"avazu"`` or ``"synthetic"``.
        out_dir (str): the run directory.
        settings (Settings): all stages' settings.
        force (bool): rerun every stage from scratch.
        progress (bool): show progress bars.

    Returns:
        Dict[str, Any]: the report (also in ``out_dir/report.json``) on rank 0; ``{}`` on the
        other ranks.
    """
    run_stages(out_dir, "report", settings, source=DataSource(format, data),
               redo=RUN_STAGE_NAMES, force=RUN_STAGE_NAMES if force else (), progress=progress)
    return read_report(out_dir) if init_distributed().is_main else {}
