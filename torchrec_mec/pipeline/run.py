"""``run``: MEC end to end, every stage of the graph brought up to date, then the report."""
from typing import Any, Dict, Optional, Tuple

from torchrec_mec.pipeline.graph import RUN_STAGE_NAMES, upstream
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
    compare: bool = False,
) -> Dict[str, Any]:
    """MEC end to end: prepare, pre-train, compress, fine-tune, evaluate, report (and, with
    ``compare``, ``mec compare`` before the report, which then holds its comparisons).

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
        compare (bool): also run the ``compare`` stage (costly: it trains a model per method
            and ratio).

    Returns:
        Dict[str, Any]: the report (also in ``out_dir/report.json``) on rank 0; ``{}`` on the
        other ranks.
    """
    source = DataSource(format, data)
    forced: Tuple[str, ...] = ()
    if compare:
        forced = tuple(s.name for s in upstream("compare")) if force else ()
        run_stages(out_dir, "compare", settings, source=source,
                   redo=(*RUN_STAGE_NAMES, "compare"), force=forced, progress=progress)
    run_stages(out_dir, "report", settings, source=source, redo=RUN_STAGE_NAMES,
               force=[s for s in RUN_STAGE_NAMES if s not in forced] if force else (),
               progress=progress)
    return read_report(out_dir) if init_distributed().is_main else {}
