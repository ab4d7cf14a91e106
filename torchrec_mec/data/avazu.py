"""Reader for the Avazu CTR CSV layout.

Comma separated with the header ``id,click,hour,C1,banner_pos,...,C21``. ``click`` is the
label, ``id`` is dropped, every other column is categorical. ``hour`` (YYMMDDHH) is replaced by
two features that generalise across days: ``hour_of_day`` (HH) and ``weekday`` (0 = Monday).
Avazu has no dense features.
"""
import datetime
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from torchrec_mec.data._io import line_chunks
from torchrec_mec.data.schema import (
    BadRowReport,
    DataFormatError,
    DataSchema,
    RawChunk,
    note_issue,
    report_issues,
)

AVAZU_COLUMNS: Tuple[str, ...] = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
_CATEGORICAL = AVAZU_COLUMNS[3:]
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
    with a column count other than 24, a click other than 0/1, or an ``hour`` that is not a
    YYMMDDHH date is handed to ``report``.

    Args:
        path (str): local or iopath path; ``.gz`` is decompressed on the fly.
        report (BadRowReport): collects (or raises on) bad rows.
        chunk_rows (int): lines per yielded chunk (memory is O(chunk_rows)).
        max_rows (Optional[int]): read at most this many data lines (after the header).
        progress (bool): show a tqdm bar.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "train.csv")
        >>> row = ["7", "1", "14102117"] + ["x"] * 21
        >>> _ = open(p, "w").write(",".join(AVAZU_COLUMNS) + "\\n" + ",".join(row) + "\\n")
        >>> chunk = next(read_avazu_csv(p, BadRowReport()))
        >>> chunk.labels.tolist(), chunk.sparse[0], chunk.sparse[1], chunk.dense.shape
        ([1.0], ['17'], ['1'], (1, 0))
    """
    weekdays: Dict[str, str] = {}
    for header, lines in line_chunks(path, chunk_rows, header=True, max_rows=max_rows,
                                     progress=progress):
        if tuple(header.split(",")) != AVAZU_COLUMNS:
            raise DataFormatError(path, 1, None, f"header is not the Avazu header "
                                  f"{','.join(AVAZU_COLUMNS)!r}: {header[:200]!r}")
        chunk = _parse(path, lines, report, weekdays)
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


def _parse(path: str, lines, report: BadRowReport,
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
