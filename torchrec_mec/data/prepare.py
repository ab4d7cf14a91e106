"""``prepare_dataset``: raw files or a synthetic config in, an ``EncodedDataset`` directory out."""
import json
import logging
import os
import shutil
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from iopath.common.file_io import g_pathmgr

from torchrec_mec.data._random import stream_key, uniform
from torchrec_mec.data.avazu import AVAZU_SCHEMA, read_avazu_csv
from torchrec_mec.data.criteo import CRITEO_SCHEMA, read_criteo_tsv
from torchrec_mec.data._files import (
    FORMAT_KIND,
    FORMAT_VERSION,
    MANIFEST,
    close_array,
    open_array,
    read_manifest,
    write_manifest,
)
from torchrec_mec.data.encoded import EncodedDataset
from torchrec_mec.data.schema import (
    SPLITS,
    BadRowReport,
    CorruptDatasetError,
    DataFormatError,
    DataSchema,
    RawChunk,
    check_fractions,
)
from torchrec_mec.data.synthetic import SyntheticConfig, write_synthetic
from torchrec_mec.data.vocab import ValueCounter

logger = logging.getLogger(__name__)

Reader = Callable[..., Iterator[RawChunk]]
_FORMATS: Dict[str, Tuple[Reader, DataSchema]] = {
    "criteo": (read_criteo_tsv, CRITEO_SCHEMA),
    "avazu": (read_avazu_csv, AVAZU_SCHEMA),
}
DEFAULT_MIN_COUNT = 3
"""TorchRec's Criteo frequency threshold (``torchrec.datasets.criteo.FREQUENCY_THRESHOLD``)."""


def assign_splits(lines: np.ndarray, seed: int, split: Sequence[float]) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each row, a pure function of its line number and
    ``seed``: the same rows land in the same split whatever the chunking or ``max_rows``.

    Args:
        lines (np.ndarray): 1-based line numbers of the rows.
        seed (int): the split seed.
        split (Sequence[float]): (train, val, test) fractions summing to 1.

    Example::

        >>> s = assign_splits(np.arange(1, 100_001), seed=0, split=(0.8, 0.1, 0.1))
        >>> np.bincount(s).round(-3).tolist()
        [80000, 10000, 10000]
    """
    train, val, test = check_fractions(split)
    u = uniform(lines.astype(np.uint64), stream_key(seed, "split"))
    cut_test = train + val if test > 0 else 2.0  # float sums must not leak rows into "test"
    return ((u >= train).astype(np.uint8) + (u >= cut_test)).astype(np.uint8)


def prepare_dataset(
    source: Union[None, str, Mapping[str, str]],
    format: str,
    out_dir: str,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    bad_rows: str = "report",
    max_rows: Optional[int] = None,
    synthetic: Optional[SyntheticConfig] = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_rows: int = 65536,
) -> EncodedDataset:
    """Encodes a raw CTR data set (or generates a synthetic one) into ``out_dir``.

    Text formats take two passes, both streaming: the raw file is parsed once (rows assigned
    to splits, categorical values counted on the training split, arrays staged on disk), then
    staged ids are mapped to vocabulary ids and written split by split. Memory is O(chunk) plus
    the distinct categorical values. Re-running with the same arguments (and unchanged source
    files) reuses the finished set after checking its checksums; different arguments, or
    ``overwrite=True``, prepare it again.

    Args:
        source (None | str | Mapping[str, str]): one raw file, split by ``split`` and ``seed``;
            or ``{"train": path, "val": path, "test": path}`` (val/test optional) for
            pre-split files (``split`` is then unused); ``None`` for ``"synthetic"``.
        format (str): ``"criteo"`` (TSV), ``"avazu"`` (CSV) or ``"synthetic"``.
        out_dir (str): local output directory (created).
        min_count (int): values seen fewer times in the training split map to OOV id 0.
            Unused for synthetic data, whose ids are the configured tables.
        split (Sequence[float]): (train, val, test) fractions. Text rows are assigned by a hash
            of (seed, line number); synthetic rows, being i.i.d., in contiguous ranges.
        seed (int): split seed; for synthetic data also the generator seed.
        bad_rows (str): ``"report"`` skips bad rows, counts them and lists the first 100 with
            line numbers in the manifest (``EncodedDataset.bad_rows``); ``"fail"`` raises
            ``DataFormatError`` at the first one.
        max_rows (Optional[int]): read at most this many data lines per source file.
        synthetic (Optional[SyntheticConfig]): the generator settings for ``"synthetic"``
            (default ``SyntheticConfig()``).
        overwrite (bool): prepare again even if a matching finished set exists. A new set is
            built beside the old one (``.<name>.new-<pid>``) and replaces it only once complete,
            so a failed re-prepare leaves the old set as it was.
        progress (bool): show tqdm progress bars.
        chunk_rows (int): rows per processing chunk (does not change the result).

    Returns:
        EncodedDataset: the opened prepared set.

    Raises:
        FileNotFoundError: a source file is missing.
        FileExistsError: ``out_dir`` holds files but is not a prepared data set (never
            replaced).
        DataFormatError: an empty source, a bad header, no valid rows, or (with
            ``bad_rows="fail"``) a bad row; the message names file, line and column.
        CorruptDatasetError: a finished set with these arguments whose files do not match
            their checksums (delete it, or pass ``overwrite=True``).

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> ds = prepare_dataset(None, "synthetic", out, progress=False,
        ...     synthetic=SyntheticConfig(num_rows=2000, table_sizes=(100, 10), num_dense=3))
        >>> [ds.num_rows(s) for s in ("train", "val", "test")]
        [1600, 200, 200]
        >>> again = prepare_dataset(None, "synthetic", out, progress=False,  # reused as is
        ...     synthetic=SyntheticConfig(num_rows=2000, table_sizes=(100, 10), num_dense=3))
        >>> again.manifest == ds.manifest
        True
    """
    if format not in (*_FORMATS, "synthetic"):
        raise ValueError(f"format must be one of {(*_FORMATS, 'synthetic')}, got {format!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    BadRowReport(bad_rows)  # validates the policy before any work
    check_fractions(split)
    if format == "synthetic":
        if source is not None:
            raise ValueError("format 'synthetic' takes source=None (settings go in `synthetic`)")
        synthetic = synthetic or SyntheticConfig()
        fingerprint = {"format": format, "split": list(split), "seed": seed,
                       "synthetic": asdict(synthetic)}
    else:
        if synthetic is not None:
            raise ValueError(f"`synthetic` is only for format 'synthetic', not {format!r}")
        sources = _sources(source)
        fingerprint = {"format": format, "sources": {s: _stamp(p) for s, p in sources},
                       "min_count": min_count, "seed": seed, "bad_rows": bad_rows,
                       "max_rows": max_rows}
        if sources[0][0] == "all":
            fingerprint["split"] = list(split)
    fingerprint = json.loads(json.dumps(fingerprint))

    _recover_interrupted_swap(out_dir)
    try:
        old = read_manifest(out_dir) if os.path.isdir(out_dir) else None
    except CorruptDatasetError:
        if not overwrite:
            raise
        old = None  # an unreadable manifest: replaced below
    if old is not None and not overwrite and old.get("fingerprint") == fingerprint:
        logger.info("reusing the prepared data set in %s", out_dir)
        return EncodedDataset(out_dir, verify=True)
    _check_replaceable(out_dir)

    # Built beside the old set and swapped in once complete: a failure leaves the old one as is.
    build = _beside(out_dir, "new", os.getpid())
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    try:
        if format == "synthetic":
            assert synthetic is not None  # defaulted above
            body = write_synthetic(synthetic, build, seed=seed, split=split, progress=progress,
                                   chunk_rows=chunk_rows)
            body.update(bad_rows=BadRowReport("report").to_dict(), vocabulary=None)
        else:
            body = _encode_text(sources, format, build, min_count=min_count, split=split,
                                seed=seed, report=BadRowReport(bad_rows), max_rows=max_rows,
                                progress=progress, chunk_rows=chunk_rows)
            body["synthetic"] = None
        write_manifest(build, {"kind": FORMAT_KIND, "format_version": FORMAT_VERSION,
                               "fingerprint": fingerprint, **body})
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _swap_in(build, out_dir)
    return EncodedDataset(out_dir)


def _beside(out_dir: str, what: str, pid: int) -> str:
    """``<parent>/.<name>.<what>-<pid>``: a folder next to ``out_dir`` (same file system, so a
    rename moves it)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.{what}-{pid}")


def _leftovers(out_dir: str, what: str) -> List[str]:
    """Folders ``_beside(out_dir, what, pid)`` of processes that have ended."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    prefix = f".{name}.{what}-"
    found = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            found.append(os.path.join(parent, entry))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_interrupted_swap(out_dir: str) -> None:
    """Puts back an old set moved aside by a swap that was killed before the new one was moved
    in, and removes half-built sets of processes that have ended."""
    for old in _leftovers(out_dir, "old"):
        if not os.path.exists(out_dir) and os.path.isfile(os.path.join(old, MANIFEST)):
            os.rename(old, out_dir)
            logger.warning("%s: put back the data set a killed re-prepare had moved aside", out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for new in _leftovers(out_dir, "new"):
        shutil.rmtree(new, ignore_errors=True)


def _check_replaceable(out_dir: str) -> None:
    """A folder that holds something other than a data set is never replaced."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file, not a data set folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) \
            and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir} holds files but no {MANIFEST}: it is not a prepared "
                              "data set, so it is not replaced; give a new or empty folder, or "
                              "delete it")


def _swap_in(build: str, out_dir: str) -> None:
    """Moves the finished set ``build`` to ``out_dir``; an old set there is moved aside first
    and removed after (a kill in between is undone by ``_recover_interrupted_swap``)."""
    if os.path.exists(out_dir):
        aside = _beside(out_dir, "old", os.getpid())
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(out_dir, aside)
        os.rename(build, out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(build, out_dir)


def _sources(source: Union[None, str, Mapping[str, str]]) -> List[Tuple[str, str]]:
    if source is None:
        raise ValueError("a source file (or {'train': ..., 'val': ..., 'test': ...}) is required")
    pairs = [("all", source)] if isinstance(source, str) else list(source.items())
    names = [s for s, _ in pairs]
    if not isinstance(source, str) and ("train" not in names or not set(names) <= set(SPLITS)):
        raise ValueError(f"source splits must include 'train' and be among {SPLITS}, "
                         f"got {names}")
    for _, path in pairs:
        if not g_pathmgr.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    return pairs


def _stamp(path: str) -> Dict[str, Any]:
    """What identifies a source file's version cheaply: its path, size and mtime."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": path}


def _encode_text(sources: List[Tuple[str, str]], format: str, out_dir: str, *, min_count: int,
                 split: Sequence[float], seed: int, report: BadRowReport,
                 max_rows: Optional[int], progress: bool, chunk_rows: int) -> Dict[str, Any]:
    reader, schema = _FORMATS[format]
    num_dense, num_sparse = schema.num_dense, schema.num_sparse
    staging = os.path.join(out_dir, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    counters = [ValueCounter() for _ in range(num_sparse)]
    split_counts = np.zeros(len(SPLITS), dtype=np.int64)
    names = ("labels", "dense", "sparse", "split")
    try:
        # Pass 1: parse, assign splits, count training values, stage rows in file order.
        staged = {n: open(os.path.join(staging, n), "wb") for n in names}
        try:
            for split_name, path in sources:
                for chunk in reader(path, report, chunk_rows=chunk_rows, max_rows=max_rows,
                                    progress=progress):
                    if split_name == "all":
                        splits = assign_splits(chunk.lines, seed, split)
                    else:
                        splits = np.full(len(chunk), SPLITS.index(split_name), dtype=np.uint8)
                    train = splits == 0
                    provisional = np.empty((len(chunk), num_sparse), dtype=np.int64)
                    for f, counter in enumerate(counters):
                        provisional[:, f] = counter.add(chunk.sparse[f], train)
                    staged["labels"].write(chunk.labels.tobytes())
                    staged["dense"].write(np.ascontiguousarray(chunk.dense).tobytes())
                    staged["sparse"].write(provisional.tobytes())
                    staged["split"].write(splits.tobytes())
                    split_counts += np.bincount(splits, minlength=len(SPLITS))
        finally:
            for handle in staged.values():
                handle.close()
        total = int(split_counts.sum())
        if total == 0:
            raise DataFormatError(", ".join(p for _, p in sources), None, None,
                                  f"no valid rows ({report.count} bad rows)\n{report}")
        if split_counts[0] == 0:
            raise ValueError(f"the training split is empty ({total} valid rows); check `split`")

        # Pass 2: staged provisional ids -> vocabulary ids, rows scattered to their splits.
        built = [c.build(min_count) for c in counters]
        remaps = [remap for _, remap in built]
        stage = {
            "labels": np.memmap(os.path.join(staging, "labels"), np.float32, "r", shape=(total,)),
            "dense": (np.memmap(os.path.join(staging, "dense"), np.float32, "r",
                                shape=(total, num_dense)) if num_dense
                      else np.zeros((total, 0), np.float32)),
            "sparse": np.memmap(os.path.join(staging, "sparse"), np.int64, "r",
                                shape=(total, num_sparse)),
            "split": np.memmap(os.path.join(staging, "split"), np.uint8, "r", shape=(total,)),
        }
        out = {s: {"dense": open_array(out_dir, f"{s}/dense.npy", np.float32, (n, num_dense)),
                   "sparse": open_array(out_dir, f"{s}/sparse.npy", np.int32, (n, num_sparse)),
                   "labels": open_array(out_dir, f"{s}/labels.npy", np.float32, (n,))}
               for s, n in zip(SPLITS, split_counts.tolist())}
        offsets = dict.fromkeys(SPLITS, 0)
        for start in range(0, total, chunk_rows):
            rows = slice(start, min(start + chunk_rows, total))
            provisional = np.asarray(stage["sparse"][rows])
            ids = np.empty(provisional.shape, dtype=np.int32)
            for f, remap in enumerate(remaps):
                ids[:, f] = remap[provisional[:, f]]
            splits = np.asarray(stage["split"][rows])
            for k, s in enumerate(SPLITS):
                mask = splits == k
                n = int(mask.sum())
                if n:
                    lo, hi = offsets[s], offsets[s] + n
                    out[s]["dense"][lo:hi] = stage["dense"][rows][mask]
                    out[s]["sparse"][lo:hi] = ids[mask]
                    out[s]["labels"][lo:hi] = stage["labels"][rows][mask]
                    offsets[s] = hi
        del stage
        files = {}
        for s in SPLITS:
            for name, array in out[s].items():
                files[f"{s}/{name}.npy"] = close_array(out_dir, f"{s}/{name}.npy", array)
        vocab_files = {}
        for name, (vocab, _) in zip(schema.sparse_names, built):
            rel = f"vocab/{name}.npy"
            files[rel] = close_array(out_dir, rel, np.array(vocab.values, dtype=str)
                                     if vocab.values else np.zeros(0, dtype="<U1"))
            vocab_files[name] = rel
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if report.count:
        logger.warning("%s: %s", out_dir, str(report).splitlines()[0] + " (see manifest)")
    return {
        "schema": schema.to_dict(),
        "num_rows": dict(zip(SPLITS, split_counts.tolist())),
        "num_embeddings": {name: vocab.num_embeddings
                           for name, (vocab, _) in zip(schema.sparse_names, built)},
        "bad_rows": report.to_dict(),
        "vocabulary": {"min_count": min_count, "files": vocab_files},
        "files": files,
    }
