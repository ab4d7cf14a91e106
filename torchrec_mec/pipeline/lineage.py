"""Lineage: what each stage of a run consumed and produced, checked before anything is trusted.

When a stage finishes, the runner writes ``DIR/lineage/<stage>.json``::

    {"kind": "torchrec_mec-stage-record", "version": 1, "stage": "compress",
     "finished": "2026-11-30T10:00:00+00:00", "world_size": 1,
     "settings": {...the settings the stage read...}, "settings_sha256": "...",
     "inputs":  {"pretrain/tables/": "<sha256>", "pretrain/counts.mec": "<sha256>"},
     "outputs": {"compress/compressed.mec": {...}, "compress/codes/": {...}}}

Paths are relative to the run directory; a path ending in ``/`` is a folder and stands for every
file under it (a data set, or a checkpoint directory). ``inputs`` holds the digest of each input
exactly as the stage read it, ``outputs`` the sha256 of every file it wrote. A stage is up to
date only if its outputs still hash to the recorded values (every byte is read: a truncated file
or one flipped byte is found) and its inputs' current digests equal the recorded ones.
"""
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from torchrec_mec.data._files import sha256_file

RECORD_DIR = "lineage"
RECORD_KIND = "torchrec_mec-stage-record"
RECORD_VERSION = 1
ABSENT = "absent"
"""The digest recorded for an optional input that did not exist when the stage ran."""


class Digests:
    """sha256 of the files and folders of a run directory, each file read in full (streamed) and
    hashed at most once per instance while its size, mtime, ctime and inode stay the same.

    Args:
        run_dir (str): the run directory; paths given to :meth:`files` are relative to it.

    Example::

        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(run_dir, "a"))
        >>> _ = open(os.path.join(run_dir, "a", "x.bin"), "wb").write(b"abc")
        >>> Digests(run_dir).files("a/")
        {'a/x.bin': 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}
        >>> Digests(run_dir).files("a/y.bin") is None
        True
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._memo: Dict[str, Tuple[Tuple[int, int, int, int], str]] = {}

    def files(self, rel: str) -> Optional[Dict[str, str]]:
        """``{file: sha256}`` of the file ``rel``, or of every file under the folder ``rel/``
        (sorted); ``None`` if it does not exist (a folder must hold at least one file)."""
        path = os.path.join(self.run_dir, rel)
        if not rel.endswith("/"):
            return {rel: self._sha256(path)} if os.path.isfile(path) else None
        if not os.path.isdir(path):
            return None
        found = sorted(os.path.relpath(os.path.join(root, name), self.run_dir)
                       for root, _, names in os.walk(path) for name in names)
        return {f: self._sha256(os.path.join(self.run_dir, f)) for f in found} or None

    def digest(self, rel: str) -> Optional[str]:
        """One sha256 for ``rel`` (a file's own, or a folder's over its files' names and sums)."""
        files = self.files(rel)
        if files is None:
            return None
        return combined_digest(files) if rel.endswith("/") else files[rel]

    def _sha256(self, path: str) -> str:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        memo = self._memo.get(path)
        if memo is None or memo[0] != key:
            memo = (key, sha256_file(path))
            self._memo[path] = memo
        return memo[1]


def combined_digest(files: Mapping[str, str]) -> str:
    """sha256 over ``{file: sha256}`` (names and sums), the digest of a folder.

    >>> combined_digest({"a": "1"}) == combined_digest({"a": "1"}) != combined_digest({"a": "2"})
    True
    """
    return hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()).hexdigest()


def settings_digest(settings: Any) -> str:
    """sha256 of a JSON-able settings tree (key order does not matter).

    >>> settings_digest({"a": 1, "b": [2]}) == settings_digest({"b": [2], "a": 1})
    True
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """What one stage consumed and produced (``DIR/lineage/<stage>.json``).

    Args:
        stage (str): the stage's name.
        finished (str): when it finished (ISO 8601, UTC).
        world_size (int): processes that ran it.
        settings (Any): the settings it read (JSON-able).
        inputs (Dict[str, str]): input path -> its digest when the stage read it.
        outputs (Dict[str, Dict[str, str]]): output path -> ``{file: sha256}`` of what it wrote.

    Example::

        >>> r = StageRecord("compress", "2026-01-01T00:00:00+00:00", 1, {"m": 4},
        ...                 {"pretrain/counts.mec": "ab"}, {"compress/c.mec": {"compress/c.mec": "cd"}})
        >>> StageRecord.from_json(r.to_json()) == r
        True
    """

    stage: str
    finished: str
    world_size: int
    settings: Any
    inputs: Dict[str, str]
    outputs: Dict[str, Dict[str, str]]

    def to_json(self) -> Dict[str, Any]:
        return {"kind": RECORD_KIND, "version": RECORD_VERSION, "stage": self.stage,
                "finished": self.finished, "world_size": self.world_size,
                "settings": self.settings, "settings_sha256": settings_digest(self.settings),
                "inputs": self.inputs, "outputs": self.outputs}

    @staticmethod
    def from_json(tree: Mapping[str, Any]) -> "StageRecord":
        if tree.get("kind") != RECORD_KIND or tree.get("version") != RECORD_VERSION:
            raise ValueError(f"not a v{RECORD_VERSION} {RECORD_KIND}")
        return StageRecord(str(tree["stage"]), str(tree["finished"]), int(tree["world_size"]),
                           tree["settings"], dict(tree["inputs"]),
                           {k: dict(v) for k, v in tree["outputs"].items()})


def record_path(run_dir: str, stage: str) -> str:
    """``DIR/lineage/<stage>.json``.

    >>> record_path("runs/x", "pretrain")
    'runs/x/lineage/pretrain.json'
    """
    return os.path.join(run_dir, RECORD_DIR, f"{stage}.json")


def read_record(run_dir: str, stage: str) -> Tuple[Optional[StageRecord], Optional[str]]:
    """The stage's record, or ``(None, why)``: never written, or unreadable (named)."""
    path = record_path(run_dir, stage)
    if not os.path.isfile(path):
        return None, f"no record of it finishing ({path})"
    try:
        with open(path, "r", encoding="utf-8") as f:
            return StageRecord.from_json(json.load(f)), None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its record {path} is unreadable ({e})"


def write_record(run_dir: str, record: StageRecord) -> None:
    """Writes the record atomically (temporary name, then rename)."""
    path = record_path(run_dir, record.stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record.to_json(), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    clear_running(run_dir, record.stage)


def running_path(run_dir: str, stage: str) -> str:
    """Where the marker of a started, not yet finished run of ``stage`` is written."""
    return os.path.join(run_dir, RECORD_DIR, f"{stage}.running")


def mark_running(run_dir: str, stage: str) -> None:
    """Marks ``stage`` as started; :func:`write_record` clears the mark when it finishes."""
    path = running_path(run_dir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(now())


def clear_running(run_dir: str, stage: str) -> None:
    """Removes the mark of :func:`mark_running`, if any."""
    path = running_path(run_dir, stage)
    if os.path.isfile(path):
        os.remove(path)


def was_interrupted(run_dir: str, stage: str) -> bool:
    """Whether a run of ``stage`` started and did not finish (killed or failed)."""
    return os.path.isfile(running_path(run_dir, stage))


def now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def damaged_outputs(record: StageRecord, digests: Digests,
                    declared: Iterable[str]) -> Optional[str]:
    """What is wrong with the outputs ``record`` lists, or ``None`` if every file still hashes
    to its recorded sha256.

    Args:
        record (StageRecord): the stage's record.
        digests (Digests): hashes the files as they are now.
        declared (Iterable[str]): the outputs the stage declares today; a record listing others
            was written by another version of the stage.
    """
    declared = sorted(declared)
    if sorted(record.outputs) != declared:
        return (f"its record lists outputs {sorted(record.outputs)}, the stage now writes "
                f"{declared} (another version wrote it)")
    problems: List[str] = []
    for rel, recorded in sorted(record.outputs.items()):
        current = digests.files(rel) or {}
        for name in sorted(recorded.keys() - current.keys()):
            problems.append(f"{os.path.join(digests.run_dir, name)} is missing")
        for name in sorted(current.keys() - recorded.keys()):
            problems.append(f"{os.path.join(digests.run_dir, name)} was not written by it")
        for name in sorted(recorded.keys() & current.keys()):
            if recorded[name] != current[name]:
                problems.append(f"{os.path.join(digests.run_dir, name)} does not match the "
                                f"sha256 recorded when {record.stage} finished (truncated or "
                                "modified)")
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def changed_inputs(record: StageRecord, inputs: Mapping[str, str]) -> Optional[str]:
    """Which inputs' digests now (``inputs``) differ from those the stage read, or ``None``.

    Example::

        >>> r = StageRecord("compress", "t", 1, {}, {"pretrain/counts.mec": "ab"}, {})
        >>> changed_inputs(r, {"pretrain/counts.mec": "ab"}) is None
        True
        >>> changed_inputs(r, {"pretrain/counts.mec": "cd"})
        'pretrain/counts.mec changed since it ran (the stage that writes it ran again)'
    """
    changed = [p for p, digest in inputs.items() if record.inputs.get(p) != digest]
    if not changed:
        return None
    return (f"{', '.join(changed)} changed since it ran (the stage that writes "
            f"{'them' if len(changed) > 1 else 'it'} ran again)")


def stale(run_dir: str, stage: str, inputs: Iterable[str],
          outputs: Iterable[str]) -> Optional[str]:
    """Why the outputs of ``stage`` in ``run_dir`` cannot be used with the current files: not
    finished, damaged outputs or changed inputs (``inputs`` must exist); ``None`` if current.
    For a stage's body that reads another stage's outputs when present (an optional input).
    """
    record, problem = read_record(run_dir, stage)
    if record is None:
        return problem
    digests = Digests(run_dir)
    return damaged_outputs(record, digests, outputs) or changed_inputs(
        record, {p: digests.digest(p) or ABSENT for p in inputs})
