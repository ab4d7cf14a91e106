"""The runner: brings one stage of a run directory up to date, with a lock, lineage and verification.

``mec run``, every ``mec <stage>`` and the TorchX component come here::

    run_stages("runs/x", "report", settings, source=DataSource("synthetic"), redo=STAGE_NAMES)

Under the run directory's lock (``lock.py``; under torchrun rank 0 holds it for the job), the
runner walks the target and the stages it depends on (``graph.upstream``) in order. For each,
rank 0 decides and every rank follows:

- **up to date**, skipped: its lineage record (``lineage.py``) exists, every file it wrote still
  hashes to the recorded sha256 (each byte read), each input's digest now equals the one it
  read, and, for a stage the runner may run, the settings it reads are those it ran with;
- otherwise it **runs**, if the runner may run it (the target always; the stages in ``redo``,
  e.g. all of them for ``mec run``), with the reason logged; outputs found damaged are redone
  from scratch (``force``). A stage is marked as running when it starts (the mark goes when
  its record is written): outputs that a run killed or failed part-way changed then read as
  "has not finished" and the stage resumes (its checkpoints, ``mec compare``'s finished
  cells), not as damage redone from scratch; a failed run that changed nothing leaves the
  stage up to date;
- a stage the runner may not run is **refused** with :class:`StageError`, which names the stage,
  what is wrong and the commands that fix it, before anything runs: ``mec report`` in a run whose
  pre-training was redone since the evaluation refuses rather than pair the new model with the
  old metrics.

Before the first stage after ``prepare``, the settings of every stage that may run are checked
against the prepared data set (``Stage.check``), so a wrong setting stops the run before hours of
training rather than after.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Iterator, List, NamedTuple, Optional

from torchrec_mec.artifacts import ArtifactError
from torchrec_mec.data import SPLITS
from torchrec_mec.pipeline.prepare import open_dataset
from torchrec_mec.pipeline.graph import (
    DATA_STAGE,
    STAGE_NAMES,
    Stage,
    StageCall,
    downstream,
    upstream,
)
from torchrec_mec.pipeline.lineage import (
    ABSENT,
    Digests,
    changed_inputs,
    clear_running,
    StageRecord,
    damaged_outputs,
    now,
    mark_running,
    read_record,
    was_interrupted,
    settings_digest,
    write_record,
)
from torchrec_mec.pipeline.lock import RunLock
from torchrec_mec.pipeline.outputs import stage_dir
from torchrec_mec.pipeline.parallel import DistContext, init_distributed, run_on_main
from torchrec_mec.pipeline.prepare import DataSource
from torchrec_mec.pipeline.settings import DataFacts, Settings, check_splits

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage the runner may not run is not up to date (not finished, stale or damaged), or
    cannot run; the message names it, says why and gives the way out.

    Example::

        >>> str(StageError("compress is stale"))
        'compress is stale'
    """


class StageOutcome(NamedTuple):
    """What the runner did with one stage.

    Args:
        ran (bool): whether the stage ran.
        reason (str): why it ran, or ``"up to date"``.

    Example::

        >>> StageOutcome(ran=False, reason="up to date").ran
        False
    """

    ran: bool
    reason: str


def run_stages(
    run_dir: str,
    target: str,
    settings: Optional[Settings] = None,
    *,
    source: Optional[DataSource] = None,
    redo: Collection[str] = (),
    force: Collection[str] = (),
    progress: bool = True,
) -> Dict[str, StageOutcome]:
    """Brings ``target`` in ``run_dir`` up to date: runs it and the stages it depends on that are
    not up to date and may run, skips verified ones, refuses the rest (see the module notes).

    Every rank of a torchrun job calls this; rank 0 holds the lock and decides.

    Args:
        run_dir (str): the run directory (created if missing).
        target (str): a stage name (``graph.STAGE_NAMES``).
        settings (Optional[Settings]): the settings of the stages that may run; ``None`` when
            they read none (``report``).
        source (Optional[DataSource]): the raw data, needed if ``prepare`` has to run.
        redo (Collection[str]): stages besides ``target`` that may run when not up to date.
        force (Collection[str]): stages to rerun from scratch even if up to date.
        progress (bool): show progress bars.

    Returns:
        Dict[str, StageOutcome]: per stage considered, in order, whether it ran and why.

    Raises:
        RunLockedError: another process holds the run directory (names it).
        StageError: a stage that may not run is not up to date, or ``prepare`` must run and
            no source was given.
        SettingsError: a setting does not fit the data set or the number of processes.
        ValueError: ``run_dir`` is a file, or an unknown stage name.

    Example::

        >>> import tempfile
        >>> from torchrec_mec.pipeline import load_settings
        >>> s = load_settings("sample", overrides={"data.synthetic.num_rows": 500})
        >>> run_dir = tempfile.mkdtemp()
        >>> done = run_stages(run_dir, "prepare", s, source=DataSource("synthetic"),
        ...                   progress=False)
        >>> done["prepare"].ran, run_stages(run_dir, "prepare", s, progress=False)["prepare"]
        (True, StageOutcome(ran=False, reason='up to date'))
    """
    unknown = ({target} | set(redo) | set(force)) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"no stage {sorted(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir} is a file, not a directory")
    chain = upstream(target)
    may_run = {target, *redo}
    if settings is None:
        needs = [s.name for s in chain if s.name in may_run and s.reads is not None]
        if needs:
            raise ValueError(f"stages {needs} read settings; give them")
    ctx = init_distributed()
    runner = _Runner(run_dir, settings, source, progress, ctx, target)
    outcomes: Dict[str, StageOutcome] = {}
    with _hold_run_lock(run_dir, ctx):
        for i, s in enumerate(chain):
            decision = run_on_main(
                lambda: runner.decide(s, s.name in may_run, s.name in force), ctx)
            if decision.run:
                runner.execute(s, decision)
            outcomes[s.name] = StageOutcome(decision.run, decision.reason)
            if s.name == DATA_STAGE and settings is not None:
                later = [t for t in chain[i + 1:] if t.name in may_run]
                run_on_main(lambda: runner.check(later), ctx)
    return outcomes


@contextmanager
def _hold_run_lock(run_dir: str, ctx: DistContext) -> Iterator[None]:
    """Holds the run directory's lock for the ``with`` block, once per job: rank 0 takes it and
    every rank learns the outcome, so either the whole job goes on or every rank raises
    :class:`RunLockedError`."""
    lock = RunLock(run_dir) if ctx.is_main else None

    def take() -> None:
        assert lock is not None  # called on rank 0 only
        lock.acquire()

    run_on_main(take, ctx)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@dataclass(frozen=True)
class _Decision:
    run: bool
    reason: str
    force: bool = False
    inputs: Dict[str, str] = field(default_factory=dict)


class _Runner:
    """The state of one :func:`run_stages` call; ``decide`` and ``check`` run on rank 0."""

    def __init__(self, run_dir: str, settings: Optional[Settings], source: Optional[DataSource],
                 progress: bool, ctx: DistContext, target: str):
        self.run_dir, self.settings, self.source = run_dir, settings, source
        self.progress, self.ctx, self.target = progress, ctx, target
        self.digests = Digests(run_dir)

    def call(self, force: bool) -> StageCall:
        return StageCall(self.run_dir, self.settings, self.source, force, self.progress)

    def decide(self, s: Stage, may_run: bool, forced: bool) -> _Decision:
        inputs: Dict[str, str] = {}
        for path in s.inputs:
            digest = self.digests.digest(path)
            if digest is None:  # its producer was just verified or run: a bug, not a user error
                raise RuntimeError(f"{s.name}: input {path} is missing after its stage ran")
            inputs[path] = digest
        for path in s.optional_inputs:
            inputs[path] = self.digests.digest(path) or ABSENT
        record, problem = read_record(self.run_dir, s.name)
        what = "has not finished"
        if record is not None:
            problem = damaged_outputs(record, self.digests, s.outputs)
            what = "has damaged outputs"
            if problem is None:
                problem, what = changed_inputs(record, inputs), "is out of date"
            unknown_source = s.name == DATA_STAGE and self.source is None  # "as prepared"
            if problem is None and may_run and s.reads is not None and not unknown_source:
                problem = _changed_settings(record.settings, s.settings_of(self.call(False)))
        if what == "has damaged outputs" and problem is not None and was_interrupted(
                self.run_dir, s.name):
            problem, what = f"its last run did not finish ({problem})", "has not finished"
        damaged = problem is not None and what == "has damaged outputs"
        if problem is None and not forced:
            clear_running(self.run_dir, s.name)  # a failed run that changed nothing
            self._log("%s: up to date (%s verified)", s.name, ", ".join(s.outputs))
            return _Decision(False, "up to date")
        if problem is not None and not may_run:
            raise StageError(self._refusal(s, what, problem))
        if s.name == DATA_STAGE and self.source is None:
            raise StageError(f"prepare has to run ({problem}) but no data source was given: "
                             "add --data FILE --format FORMAT (or --format synthetic)")
        reason = problem if problem is not None else "--force"
        if damaged:
            logger.warning("%s: damaged outputs, redoing the stage from scratch: %s", s.name,
                           problem)
        return _Decision(True, reason, force=forced or damaged, inputs=inputs)

    def execute(self, s: Stage, decision: _Decision) -> None:
        self._log("%s: running (%s)", s.name, decision.reason)
        call = self.call(decision.force)
        # Outputs of the earlier record that a run killed part-way changed are then its own
        # work, resumed from the stage's checkpoints, not damage redone from scratch.
        run_on_main(lambda: mark_running(self.run_dir, s.name), self.ctx)
        try:
            s.body(call)
        except ArtifactError as e:
            if "--force" in str(e):
                raise
            raise ArtifactError(f"{e} ({s.name}: if this is the stage's own file, `mec {s.name} "
                                "--force` starts the stage over; or delete it)") from None

        def record() -> None:
            outputs: Dict[str, Dict[str, str]] = {}
            for path in s.outputs:
                files = self.digests.files(path)
                if files is None:
                    raise RuntimeError(f"{s.name} finished without writing {path}")
                outputs[path] = files
            write_record(self.run_dir, StageRecord(s.name, now(), self.ctx.world_size,
                                                   s.settings_of(call), decision.inputs, outputs))

        run_on_main(record, self.ctx)

    def check(self, stages: List[Stage]) -> None:
        assert self.settings is not None
        data = open_dataset(stage_dir(self.run_dir, "data"))
        facts = DataFacts({split: data.num_rows(split) for split in SPLITS}, data.num_embeddings)
        check_splits(facts, {s.name: s.needs_rows for s in stages})
        for s in stages:
            if s.check is not None:
                s.check(self.settings, facts, self.ctx.world_size)

    def _refusal(self, s: Stage, what: str, problem: str) -> str:
        before = [t.name for t in downstream(s.name)
                  if t.name in {u.name for u in upstream(self.target)} and t.name != self.target]
        commands = ", then ".join(
            f"`mec {n} --out {self.run_dir}{' --data FILE --format FORMAT' * (n == 'prepare')}`"
            for n in [s.name, *before])
        redone = "; it redoes a damaged stage from scratch" if what == "has damaged outputs" else ""
        return (f"{self.target} needs {s.name}, which {what}: {problem}. Run {commands} with "
                f"the settings you want (or `mec run`) first{redone}. {self.target} never uses "
                "outputs of different runs together.")

    def _log(self, message: str, *args: Any) -> None:
        if self.ctx.is_main:
            logger.info(message, *args)


def _changed_settings(recorded: Any, current: Any) -> Optional[str]:
    if settings_digest(recorded) == settings_digest(current):
        return None
    diffs = _differences(recorded, current, "")
    shown = "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")
    return f"its settings changed: {shown or 'different values'}"


def _differences(old: Any, new: Any, path: str) -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path or 'settings'} {old!r} -> {new!r}"]
