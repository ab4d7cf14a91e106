"""Reader for the Avazu CTR CSV layout.

Comma separated with the header ``id,click,hour,C1,banner_pos,...,C21``. ``click`` is the
label, ``id`` is dropped, every other column is categorical. ``hour`` (YYMMDDHH) is replaced by
two features that generalise across days: ``hour_of_day`` (HH) and ``weekday`` (0 = Monday).
Avazu has no dense features.
"""
import datetime
from typing import Dict, Generator, Iterator, List, Optional, Tuple

import numpy as np

from torchrec_mec.data._fields import (
    FieldSplit,
    fixed_width,
    odd_row,
    split_fields,
    text_columns,
)
from torchrec_mec.data._io import LineBlock, line_blocks, prefetched
from torchrec_mec.data.schema import (
    BadRowReport,
    DataFormatError,
    DataSchema,
    RawChunk,
    concat_chunks,
    note_issue,
    report_issues,
)

AVAZU_COLUMNS: Tuple[str, ...] = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
_CATEGORICAL = AVAZU_COLUMNS[3:]
_HEADER = tuple(c.encode() for c in AVAZU_COLUMNS)
AVAZU_SCHEMA = DataSchema(dense_names=(), sparse_names=("hour_of_day", "weekday", *_CATEGORICAL))


def read_avazu_csv(
    path: str,
    report: BadRowReport,
    *,
    chunk_rows: int = 65536,
    max_rows: Optional[int] = None,
    progress: bool = False,
) -> Iterator[RawChunk]:
    """Streams an Avazu CSV file as chunks of valid rows (sparse columns in ``AVAZU_SCHEMA`` order).

    The header must be exactly ``AVAZU_COLUMNS`` (else ``DataFormatError`` for line 1). A row
    with a column count other than 24, a click other than 0/1, an ``hour`` that is not a
    YYMMDDHH date, or a field that is not valid UTF-8 is handed to ``report``; a row's reason
    is its leftmost bad column. Lines are split and parsed with numpy a block at a time, in a
    background thread that keeps up to two chunks ready.

    Args:
        path (str): local or iopath path; ``.gz`` is decompressed on the fly.
        report (BadRowReport): collects (or raises on) bad rows.
        chunk_rows (int): most lines per yielded chunk (memory is O(chunk_rows)).
        max_rows (Optional[int]): read at most this many data lines (after the header).
        progress (bool): show a tqdm bar.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "train.csv")
        >>> row = ["7", "1", "14102117"] + ["x"] * 21
        >>> _ = open(p, "w").write(",".join(AVAZU_COLUMNS) + "\\n" + ",".join(row) + "\\n")
        >>> chunk = next(read_avazu_csv(p, BadRowReport()))
        >>> chunk.labels.tolist(), chunk.sparse[0].tolist(), chunk.sparse[1].tolist()
        ([1.0], [b'17'], [b'1'])
        >>> chunk.dense.shape
        (1, 0)
    """
    return prefetched(_chunks(path, report, chunk_rows, max_rows, progress))


def _chunks(path: str, report: BadRowReport, chunk_rows: int, max_rows: Optional[int],
            progress: bool) -> Generator[RawChunk, None, None]:
    weekdays: Dict[str, str] = {}
    for header, block in line_blocks(path, chunk_rows, header=True, max_rows=max_rows,
                                     progress=progress):
        assert header is not None  # asked for with header=True
        if tuple(header.split(b",")) != _HEADER:
            shown = header[:200].decode("utf-8", "replace")
            raise DataFormatError(path, 1, None, f"header is not the Avazu header "
                                  f"{','.join(AVAZU_COLUMNS)!r}: {shown!r}")
        chunk = _parse(block, report, weekdays)
        if chunk is not None:
            yield chunk


def _weekday(yymmdd: str, cache: Dict[str, str]) -> Optional[str]:
    if yymmdd not in cache:
        try:
            day = datetime.date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:6]))
        except ValueError:
            return None
        cache[yymmdd] = str(day.weekday())
    return cache[yymmdd]


def _column(j: int) -> str:
    return f"{AVAZU_COLUMNS[j]} (column {j})"


def _hour_issue(hour: str) -> str:
    return f"hour is not YYMMDDHH: {hour!r}"


def _parse(block: LineBlock, report: BadRowReport,
           weekdays: Dict[str, str]) -> Optional[RawChunk]:
    issues: Dict[int, Tuple[int, Optional[str], str]] = {}
    split = split_fields(block, b",", len(AVAZU_COLUMNS))
    for i in np.flatnonzero(split.counts != len(AVAZU_COLUMNS)):
        note_issue(issues, int(block.numbers[i]), -1, None, f"expected {len(AVAZU_COLUMNS)} "
                   f"comma-separated columns, found {split.counts[i]}")
    chunks = [_parse_plain(block, split, issues, weekdays)]
    odd = np.flatnonzero(~split.plain & (split.counts == len(AVAZU_COLUMNS)))
    if len(odd):
        chunks.append(_parse_odd(block, odd, issues, weekdays))
    report_issues(report, block.path, issues)
    return concat_chunks(chunks)


def _parse_plain(block: LineBlock, split: FieldSplit, issues: Dict[int, Tuple[int, Optional[str], str]],
                 weekdays: Dict[str, str]) -> RawChunk:
    """The plain (ASCII, 24-field) lines, in bulk."""
    data, starts, ends = block.data, split.starts, split.ends
    numbers = block.numbers[split.rows]
    n = len(numbers)
    first = data[starts[:, 1]] if n else np.zeros(0, np.uint8)
    click_ok = (ends[:, 1] - starts[:, 1] == 1) & ((first == ord("0")) | (first == ord("1")))
    for i in np.flatnonzero(~click_ok):
        text = data[starts[i, 1] : ends[i, 1]].tobytes().decode("ascii")
        note_issue(issues, int(numbers[i]), 1, _column(1), f"click is not 0 or 1: {text!r}")

    # hour: 8 ASCII digits, a valid YYMMDD date (weekday from a per-date cache), HH in 00..23.
    eight = ends[:, 2] - starts[:, 2] == 8
    hours = fixed_width(data, starts[:, 2], np.minimum(ends[:, 2], starts[:, 2] + 8))
    digits = hours.view(np.uint8).reshape(n, 8) if hours.dtype.itemsize == 8 else None
    hour_ok = eight & ((digits >= ord("0")) & (digits <= ord("9"))).all(1) if digits is not None \
        else np.zeros(n, dtype=bool)
    days = np.zeros(n, dtype="S1")
    if hour_ok.any():
        assert digits is not None  # hour_ok is all False without digits
        hh = (digits[:, 6].astype(np.int64) - ord("0")) * 10 + digits[:, 7] - ord("0")
        hour_ok &= hh <= 23
        dates, inverse = np.unique(hours.astype("S6"), return_inverse=True)
        named = [_weekday(d, weekdays) for d in dates.astype(str).tolist()]
        valid = np.array([d is not None for d in named], dtype=bool)
        days = np.array([d or "" for d in named], dtype="S1")[inverse.reshape(-1)]
        hour_ok &= valid[inverse.reshape(-1)]
    for i in np.flatnonzero(click_ok & ~hour_ok):
        text = data[starts[i, 2] : ends[i, 2]].tobytes().decode("ascii")
        note_issue(issues, int(numbers[i]), 2, _column(2), _hour_issue(text))

    keep = np.flatnonzero(click_ok & hour_ok)
    return RawChunk(
        lines=numbers[keep],
        labels=(first[keep] - ord("0")).astype(np.float32),
        dense=np.zeros((len(keep), 0), dtype=np.float32),
        sparse=[hours[keep].astype("S8").view("S2").reshape(-1, 4)[:, 3], days[keep],
                *text_columns(data, starts[keep, 3:], ends[keep, 3:])],
    )


def _parse_odd(block: LineBlock, lines: np.ndarray, issues: Dict[int, Tuple[int, Optional[str], str]],
               weekdays: Dict[str, str]) -> RawChunk:
    """Lines with the right field count but NUL or non-ASCII bytes, one field at a time by the
    rules of the bulk path, plus a UTF-8 check of every field."""
    def check(j: int, text: str) -> Optional[str]:
        if j == 1 and text not in ("0", "1"):
            return f"click is not 0 or 1: {text!r}"
        if j == 2:
            day = _weekday(text[:6], weekdays) if len(text) == 8 and text.isdigit() else None
            if day is None or not "00" <= text[6:] <= "23":
                return _hour_issue(text)
        return None

    numbers: List[int] = []
    rows: List[List[str]] = []
    for i in lines.tolist():
        row = odd_row(block, i, b",", issues, _column, check)
        if row is not None:
            numbers.append(int(block.numbers[i]))
            day = _weekday(row[2][:6], weekdays)
            assert day is not None  # check() refused rows without one
            rows.append([row[1], row[2][6:], day, *row[3:]])
    return RawChunk(
        lines=np.asarray(numbers, dtype=np.int64),
        labels=np.asarray([float(row[0]) for row in rows], dtype=np.float32),
        dense=np.zeros((len(numbers), 0), dtype=np.float32),
        sparse=[np.asarray([row[k] for row in rows], dtype=object)
                for k in range(1, 1 + len(AVAZU_SCHEMA.sparse_names))],
    )
