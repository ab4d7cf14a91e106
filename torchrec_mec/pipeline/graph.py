"""The stage graph: every stage of a run, what it reads and writes, and the function that does it.

This is the one place the pipeline's stages are declared. The runner (``runner.py``), ``mec run``,
every ``mec <stage>`` sub-command and the TorchX component in ``launchers/`` read it; adding a
stage means adding one :class:`Stage` to :data:`STAGES`.

Inputs and outputs are paths relative to the run directory; a path ending in ``/`` is a folder
and stands for every file under it (a data set, a torch.distributed.checkpoint directory). Each
input must be an output, or lie inside an output folder, of an earlier stage: that is what
orders the stages and what the lineage records (``lineage.py``).
"""
import logging
import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torchrec_mec.pipeline.compare import COMPARISONS_FILE, compare
from torchrec_mec.pipeline.compress import CODES_DIR, COMPRESSED_FILE, compress
from torchrec_mec.pipeline.evaluate import evaluate
from torchrec_mec.pipeline.finetune import finetune
from torchrec_mec.pipeline.lineage import record_path, stale
from torchrec_mec.pipeline.outputs import (
    COUNTS_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TABLES_DIR,
    stage_dir,
)
from torchrec_mec.pipeline.parallel import init_distributed, run_on_main
from torchrec_mec.pipeline.prepare import DataSource, prepare
from torchrec_mec.pipeline.pretrain import pretrain
from torchrec_mec.pipeline.report import PLOTS_DIR, REPORT_FILE, write_report
from torchrec_mec.pipeline.settings import (
    DataFacts,
    Settings,
    SettingsError,
    check_compress,
    check_training,
    check_update,
)
from torchrec_mec.pipeline.update import PROMOTED_FILE, update

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCall:
    """What a stage's body is given.

    Args:
        run_dir (str): the run directory.
        settings (Optional[Settings]): the run's settings (``None`` for stages that read none).
        source (Optional[DataSource]): the raw data (only ``prepare`` reads it).
        force (bool): start the stage over: drop its checkpoints and partial results.
        progress (bool): show progress bars.

    Example::

        >>> StageCall("runs/x", None, None, False, True).folder("pretrain")
        'runs/x/pretrain'
    """

    run_dir: str
    settings: Optional[Settings]
    source: Optional[DataSource]
    force: bool
    progress: bool

    def folder(self, name: str) -> str:
        return stage_dir(self.run_dir, name)

    def need_settings(self) -> Settings:
        if self.settings is None:
            raise ValueError("this stage reads settings; none were given")
        return self.settings


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    Args:
        name (str): the stage's name, also its ``mec`` sub-command.
        help (str): one line for ``mec --help``.
        inputs (Tuple[str, ...]): what it reads (run-directory paths; ``x/`` is a folder).
        outputs (Tuple[str, ...]): what it writes; verified before the stage is skipped.
        reads (Optional[Callable[[StageCall], Any]]): the part of the settings (and source) it
            depends on, recorded in its lineage; a change makes it rerun. ``None``: none.
        body (Callable[[StageCall], Any]): runs the stage on every rank.
        needs_rows (Tuple[str, ...]): the splits it cannot do without (``train``, ``test``).
        check (Optional[Callable[[Settings, DataFacts, int], None]]): checks its settings
            against the prepared data set and the number of processes.
        optional_inputs (Tuple[str, ...]): outputs of stages it does not depend on, read when
            present: their digests (or ``lineage.ABSENT``) are recorded, so one that appears or
            changes makes it rerun, but they are never brought up to date for it; the body
            checks that they are current (``lineage.stale``).

    Both checks run for every stage that may run as soon as the data set is ready, before any
    later stage starts (the splits of all stages first).

    Example::

        >>> stage("compress").inputs
        ('pretrain/tables/', 'pretrain/counts.mec')
    """

    name: str
    help: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    reads: Optional[Callable[[StageCall], Any]]
    body: Callable[[StageCall], Any]
    needs_rows: Tuple[str, ...] = ()
    check: Optional[Callable[[Settings, DataFacts, int], None]] = None
    optional_inputs: Tuple[str, ...] = ()

    def settings_of(self, call: StageCall) -> Any:
        """What :attr:`reads` returns, as plain JSON (lists, not tuples)."""
        return None if self.reads is None else _plain(self.reads(call))


def _pretrain_reads(c: StageCall) -> Dict[str, Any]:
    s = c.need_settings()
    return {"model": s.model, "pretrain": s.pretrain, "eval_batch_size": s.evaluate.batch_size}


def _finetune_reads(c: StageCall) -> Dict[str, Any]:
    s = c.need_settings()
    return {"finetune": s.finetune, "eval_batch_size": s.evaluate.batch_size,
            "new_ids": s.new_ids}


def _update_reads(c: StageCall) -> Dict[str, Any]:
    s = c.need_settings()
    return {"update": s.update, "eval_batch_size": s.evaluate.batch_size}


def _prepare_reads(c: StageCall) -> Dict[str, Any]:
    if c.source is None:
        raise ValueError("prepare needs a data source (--data / --format)")
    return {"source": c.source.stamp(), "data": c.need_settings().data}


def _prepare(c: StageCall) -> None:
    assert c.source is not None  # the runner refuses to run prepare without one
    prepare(c.source.path, c.source.format, c.folder("data"), c.need_settings(), force=c.force,
            progress=c.progress)


def _pretrain(c: StageCall) -> None:
    pretrain(c.folder("data"), c.folder("pretrain"), c.need_settings(), force=c.force,
             progress=c.progress)


def _compress(c: StageCall) -> None:
    compress(c.folder("pretrain"), c.folder("compress"), c.need_settings(), force=c.force,
             progress=c.progress)


def _finetune(c: StageCall) -> None:
    finetune(c.folder("data"), c.folder("pretrain"), c.folder("compress"), c.folder("finetune"),
             c.need_settings(), force=c.force, progress=c.progress)


def _evaluate(c: StageCall) -> None:
    evaluate(c.folder("data"), c.folder("pretrain"), c.folder("finetune"), c.folder("evaluate"),
             c.need_settings(), progress=c.progress)


def _update(c: StageCall) -> None:
    update(c.folder("data"), c.folder("finetune"), c.folder("update"), c.need_settings(),
           force=c.force, progress=c.progress)


def _compare_reads(c: StageCall) -> Dict[str, Any]:
    s = c.need_settings()
    return {"compare": s.compare, "model": s.model, "pretrain": s.pretrain,
            "compress": s.compress, "finetune": s.finetune, "new_ids": s.new_ids,
            "eval_batch_size": s.evaluate.batch_size}


def _compare(c: StageCall) -> None:
    compare(c.folder("data"), c.folder("pretrain"), c.folder("compare"), c.need_settings(),
            force=c.force, progress=c.progress)


def _check_compare(settings: Settings, data: DataFacts, world_size: int) -> None:
    if world_size > 1:
        raise SettingsError("mec compare runs in one process (not under torchrun)")
    check_training("compare", settings.pretrain, data, world_size)


def _report(c: StageCall) -> None:
    def on_main() -> None:
        cmp = stage("compare")
        problem = stale(c.run_dir, cmp.name, cmp.inputs, cmp.outputs)
        if problem is not None and os.path.exists(record_path(c.run_dir, cmp.name)):
            logger.warning("report: leaving out the comparisons of compare, which is out of "
                           "date (%s); `mec compare --out %s` redoes them", problem, c.run_dir)
        write_report(c.run_dir, comparisons=problem is None)

    run_on_main(on_main, init_distributed())


def _files(folder: str, *names: str) -> Tuple[str, ...]:
    return tuple(f"{folder}/{n}" for n in names)


STAGES: Tuple[Stage, ...] = (
    Stage("prepare", "encode the raw data set (or generate the synthetic one) into DIR/data",
          inputs=(), outputs=("data/",), reads=_prepare_reads, body=_prepare),
    Stage("pretrain", "stage 1: train the model with full tables, count id popularity",
          inputs=("data/",), outputs=_files("pretrain", MODEL_FILE, TABLES_DIR, COUNTS_FILE),
          reads=_pretrain_reads, body=_pretrain, needs_rows=("train",),
          check=lambda s, d, w: check_training("pretrain", s.pretrain, d, w)),
    Stage("compress", "stage 2: MEC-quantize the tables (a --target-ratio, or >= min_rows rows)",
          inputs=_files("pretrain", TABLES_DIR, COUNTS_FILE),
          outputs=_files("compress", COMPRESSED_FILE, CODES_DIR),
          reads=lambda c: c.need_settings().compress, body=_compress,
          check=lambda s, d, w: check_compress(s, d)),
    Stage("finetune", "stage 3: train the model on codes (QuantizedEmbeddingBagCollection)",
          inputs=("data/", *_files("pretrain", MODEL_FILE, TABLES_DIR, COUNTS_FILE),
                  *_files("compress", COMPRESSED_FILE, CODES_DIR)),
          outputs=_files("finetune", MODEL_FILE, TABLES_DIR), reads=_finetune_reads,
          body=_finetune, needs_rows=("train",),
          check=lambda s, d, w: check_training("finetune", s.finetune, d, w)),
    Stage("evaluate", "stage 4: test AUC, log loss and embedding memory of both models",
          inputs=("data/", *_files("pretrain", MODEL_FILE, TABLES_DIR),
                  *_files("finetune", MODEL_FILE, TABLES_DIR)),
          outputs=_files("evaluate", METRICS_FILE), reads=lambda c: c.need_settings().evaluate,
          body=_evaluate, needs_rows=("test",)),
    Stage("compare", "MEC against k-means PQ, a smaller dimension, hashing, int8 and int4 at "
                     "equal embedding memory (compare.ratios; costly: not part of mec run)",
          inputs=("data/", *_files("pretrain", MODEL_FILE, TABLES_DIR, COUNTS_FILE)),
          outputs=("compare/",), reads=_compare_reads, body=_compare,
          needs_rows=("train", "test"), check=_check_compare),
    Stage("report", "write DIR/report.json and DIR/plots from the stages' outputs",
          inputs=("data/manifest.json", *_files("pretrain", MODEL_FILE, COUNTS_FILE),
                  *_files("compress", COMPRESSED_FILE), *_files("finetune", MODEL_FILE),
                  *_files("evaluate", METRICS_FILE)),
          outputs=(REPORT_FILE, PLOTS_DIR + "/"), reads=None, body=_report,
          optional_inputs=(f"compare/{COMPARISONS_FILE}",)),
    Stage("update", "new ids: train the fine-tuned model on the traffic since compression "
                    "(update.split), then give the busiest new ids codes (no stage 2 rerun)",
          inputs=("data/", *_files("finetune", MODEL_FILE, TABLES_DIR)),
          outputs=_files("update", MODEL_FILE, TABLES_DIR, PROMOTED_FILE), reads=_update_reads,
          body=_update, check=check_update),
)
"""Every stage, in an order where each one comes after the stages it reads from."""

STAGE_NAMES: Tuple[str, ...] = tuple(s.name for s in STAGES)
DATA_STAGE = "prepare"
"""The stage that reads the raw data (``StageCall.source``); the others read its data set."""


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
        ValueError: no such stage (the message lists them).
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"no stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def producer(path: str) -> Stage:
    """The stage that writes ``path`` (an output of it, or a file inside an output folder).

    >>> producer("data/manifest.json").name, producer("pretrain/tables/__0_0.distcp").name
    ('prepare', 'pretrain')
    """
    for s in STAGES:
        if any(path == out or (out.endswith("/") and path.startswith(out)) for out in s.outputs):
            return s
    raise ValueError(f"no stage writes {path!r}")


def upstream(name: str) -> List[Stage]:
    """The stages ``name`` depends on, directly or not, then ``name`` itself, in graph order.

    >>> [s.name for s in upstream("compress")]
    ['prepare', 'pretrain', 'compress']
    """
    needed = {name}
    frontier = [stage(name)]
    while frontier:
        for path in frontier.pop().inputs:
            s = producer(path)
            if s.name not in needed:
                needed.add(s.name)
                frontier.append(s)
    return [s for s in STAGES if s.name in needed]


def downstream(name: str) -> List[Stage]:
    """The stages that depend on ``name``, directly or not, in graph order.

    >>> [s.name for s in downstream("finetune")]
    ['evaluate', 'report', 'update']
    """
    return [s for s in STAGES if s.name != name and name in {u.name for u in upstream(s.name)}]


def _check_graph() -> None:
    """Each input is written by an earlier stage; names and outputs are unique."""
    seen: List[str] = []
    for s in STAGES:
        if s.name in seen:
            raise AssertionError(f"two stages called {s.name!r}")
        for path in (*s.inputs, *s.optional_inputs):
            if producer(path).name not in seen:
                raise AssertionError(f"{s.name} reads {path!r}, written by a later stage")
        seen.append(s.name)
    outputs = [os.path.normpath(o) for s in STAGES for o in s.outputs]
    if len(set(outputs)) != len(outputs):
        raise AssertionError("two stages write the same output")


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as the JSON a lineage record stores."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_check_graph()

RUN_STAGE_NAMES: Tuple[str, ...] = tuple(s.name for s in upstream("report"))
"""The stages ``mec run`` brings up to date: everything the report reads (not ``update``, which
runs on its own, after fine-tuning, nor ``compare``, which ``mec run --compare`` adds)."""
