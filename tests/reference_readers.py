"""The line-by-line Criteo and Avazu readers the package used before its numpy readers: a
reference that the tests compare the new readers with (same rows, values, bad-row reports) and
that benchmarks/read.py times them against.

Kept as they were (Python's text layer, ``str.split`` per line, one dict lookup per value),
except that their names end in ``_reference``. They do not handle invalid UTF-8 (the whole file
fails) and report a too-large integer as "not an integer".
"""
import gzip
import io
from typing import Dict, Iterator, List, Optional, TextIO, Tuple

import numpy as np
from iopath.common.file_io import g_pathmgr
from tqdm import tqdm

from torchrec_mec.data.avazu import AVAZU_COLUMNS, _weekday
from torchrec_mec.data.criteo import CRITEO_NUM_DENSE, CRITEO_NUM_SPARSE, CRITEO_SCHEMA
from torchrec_mec.data.criteo import criteo_dense_transform
from torchrec_mec.data.schema import (
    BadRowReport,
    DataFormatError,
    RawChunk,
    note_issue,
    report_issues,
)

_NUM_COLUMNS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE
_CATEGORICAL = AVAZU_COLUMNS[3:]


def open_text(path: str) -> TextIO:
    """Opens a local or iopath-addressed text file; ``.gz`` files are decompressed on the fly."""
    if not g_pathmgr.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=g_pathmgr.open(path, "rb")),
                                encoding="utf-8", newline="")
    return g_pathmgr.open(path, "r", encoding="utf-8", newline="")


def line_chunks(
    path: str, chunk_rows: int, *, header: bool, max_rows: Optional[int], progress: bool
) -> Iterator[Tuple[Optional[str], List[Tuple[int, str]]]]:
    """Yields ``(header_line, [(line_number, text), ...])`` chunks of at most ``chunk_rows``.

    Line numbers are 1-based and count the header. ``max_rows`` caps the data lines read.
    Raises ``DataFormatError`` for a file with no data lines.
    """
    with open_text(path) as f, tqdm(desc=f"reading {path}", unit=" rows", disable=not progress,
                                    mininterval=2.0) as bar:
        head = None
        first = 1
        if header:
            head = f.readline()
            if not head:
                raise DataFormatError(path, None, None, "file is empty (no header line)")
            head = head.rstrip("\r\n")
            first = 2
        chunk: List[Tuple[int, str]] = []
        n = 0
        for n, text in enumerate(f, start=first):
            if max_rows is not None and n - first >= max_rows:
                n -= 1
                break
            chunk.append((n, text))
            if len(chunk) == chunk_rows:
                bar.update(len(chunk))
                yield head, chunk
                chunk = []
        if n < first:
            raise DataFormatError(path, None, None, "file has no data rows")
        if chunk:
            bar.update(len(chunk))
            yield head, chunk


def read_criteo_tsv_reference(
    path: str,
    report: BadRowReport,
    *,
    chunk_rows: int = 65536,
    max_rows: Optional[int] = None,
    progress: bool = False,
) -> Iterator[RawChunk]:
    """The old ``read_criteo_tsv``."""
    for _, lines in line_chunks(path, chunk_rows, header=False, max_rows=max_rows,
                                progress=progress):
        chunk = _parse_criteo(path, lines, report)
        if chunk is not None:
            yield chunk


def _parse_criteo(path: str, lines, report: BadRowReport) -> Optional[RawChunk]:
    issues: Dict[int, Tuple[int, str, str]] = {}
    rows, numbers = [], []
    for number, text in lines:
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) != _NUM_COLUMNS:
            note_issue(issues, number, -1, None,
                       f"expected {_NUM_COLUMNS} tab-separated columns, found {len(fields)}")
        else:
            rows.append(fields)
            numbers.append(number)
    if not rows:
        report_issues(report, path, issues)
        return None
    cols = list(zip(*rows))
    good = np.ones(len(rows), dtype=bool)

    labels = np.asarray(cols[0])
    for i in np.flatnonzero((labels != "0") & (labels != "1")):
        note_issue(issues, numbers[i], 0, "label (column 0)", f"label is not 0 or 1: {labels[i]!r}")
        good[i] = False

    dense = np.empty((len(rows), CRITEO_NUM_DENSE), dtype=np.float32)
    for j in range(CRITEO_NUM_DENSE):
        col = np.asarray(cols[1 + j])
        col = np.where(col == "", "0", col)
        try:
            values = col.astype(np.int64)
        except (ValueError, OverflowError):
            values = np.zeros(len(col), dtype=np.int64)
            for i, s in enumerate(col.tolist()):
                try:
                    values[i] = int(s)
                except (ValueError, OverflowError):
                    note_issue(issues, numbers[i], 1 + j,
                               f"{CRITEO_SCHEMA.dense_names[j]} (column {1 + j})",
                               f"not an integer: {s!r}")
                    good[i] = False
        dense[:, j] = criteo_dense_transform(values)

    report_issues(report, path, issues)
    if not good.any():
        return None
    if good.all():
        sparse = [list(cols[1 + CRITEO_NUM_DENSE + k]) for k in range(CRITEO_NUM_SPARSE)]
    else:
        keep = good.tolist()
        sparse = [[v for v, ok in zip(cols[1 + CRITEO_NUM_DENSE + k], keep) if ok]
                  for k in range(CRITEO_NUM_SPARSE)]
    return RawChunk(
        lines=np.asarray(numbers, dtype=np.int64)[good],
        labels=labels[good].astype(np.float32),
        dense=dense[good],
        sparse=sparse,
    )


def read_avazu_csv_reference(
    path: str,
    report: BadRowReport,
    *,
    chunk_rows: int = 65536,
    max_rows: Optional[int] = None,
    progress: bool = False,
) -> Iterator[RawChunk]:
    """The old ``read_avazu_csv``."""
    weekdays: Dict[str, str] = {}
    for header, lines in line_chunks(path, chunk_rows, header=True, max_rows=max_rows,
                                     progress=progress):
        if tuple(header.split(",")) != AVAZU_COLUMNS:
            raise DataFormatError(path, 1, None, f"header is not the Avazu header "
                                  f"{','.join(AVAZU_COLUMNS)!r}: {header[:200]!r}")
        chunk = _parse_avazu(path, lines, report, weekdays)
        if chunk is not None:
            yield chunk


def _parse_avazu(path: str, lines, report: BadRowReport,
           weekdays: Dict[str, str]) -> Optional[RawChunk]:
    issues: Dict[int, Tuple[int, str, str]] = {}
    rows, numbers, hours, days = [], [], [], []
    for number, text in lines:
        fields = text.rstrip("\r\n").split(",")
        if len(fields) != len(AVAZU_COLUMNS):
            note_issue(issues, number, -1, None, f"expected {len(AVAZU_COLUMNS)} comma-separated "
                       f"columns, found {len(fields)}")
            continue
        if fields[1] not in ("0", "1"):
            note_issue(issues, number, 1, "click (column 1)",
                       f"click is not 0 or 1: {fields[1]!r}")
            continue
        hour = fields[2]
        day = _weekday(hour[:6], weekdays) if len(hour) == 8 and hour.isdigit() else None
        if day is None or not "00" <= hour[6:] <= "23":
            note_issue(issues, number, 2, "hour (column 2)", f"hour is not YYMMDDHH: {hour!r}")
            continue
        rows.append(fields)
        numbers.append(number)
        hours.append(hour[6:])
        days.append(day)
    report_issues(report, path, issues)
    if not rows:
        return None
    cols = list(zip(*rows))
    return RawChunk(
        lines=np.asarray(numbers, dtype=np.int64),
        labels=np.asarray(cols[1]).astype(np.float32),
        dense=np.zeros((len(rows), 0), dtype=np.float32),
        sparse=[hours, days, *(list(cols[3 + k]) for k in range(len(_CATEGORICAL)))],
    )
