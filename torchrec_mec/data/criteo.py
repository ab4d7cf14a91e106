"""Reader for the Criteo display-ads TSV layout (Kaggle challenge / 1TB click logs text files).

One line per impression, tab separated, no header: ``label, I1..I13, C1..C26``. Integer fields
may be empty (missing) or negative; categorical fields are 8-hex-digit hashes or empty.
"""
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from torchrec_mec.data._io import line_chunks
from torchrec_mec.data.schema import (
    BadRowReport,
    DataSchema,
    RawChunk,
    note_issue,
    report_issues,
)

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26
CRITEO_SCHEMA = DataSchema(
    dense_names=tuple(f"I{i}" for i in range(1, CRITEO_NUM_DENSE + 1)),
    sparse_names=tuple(f"C{i}" for i in range(1, CRITEO_NUM_SPARSE + 1)),
)
_NUM_COLUMNS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE


def criteo_dense_transform(values: np.ndarray) -> np.ndarray:
    """The usual Criteo integer transform, ``log(1 + max(x, 0))``, as float32.

    Missing values are read as 0 before the transform, so they also map to 0.

    Example::

        >>> [round(float(v), 4) for v in criteo_dense_transform(np.array([-2, 0, 1, 9]))]
        [0.0, 0.0, 0.6931, 2.3026]
    """
    return np.log1p(np.maximum(values, 0).astype(np.float64)).astype(np.float32)


def read_criteo_tsv(
    path: str,
    report: BadRowReport,
    *,
    chunk_rows: int = 65536,
    max_rows: Optional[int] = None,
    progress: bool = False,
) -> Iterator[RawChunk]:
    """Streams a Criteo TSV file as chunks of valid, transformed rows.

    A row with a column count other than 40, a label other than 0/1, or a non-integer I-field
    is handed to ``report`` (skipped and listed, or raised as ``DataFormatError`` with file,
    line and column); columns are never shifted to make a row fit.

    Args:
        path (str): local or iopath path; ``.gz`` is decompressed on the fly.
        report (BadRowReport): collects (or raises on) bad rows.
        chunk_rows (int): lines per yielded chunk (memory is O(chunk_rows)).
        max_rows (Optional[int]): read at most this many lines.
        progress (bool): show a tqdm bar.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "day.tsv")
        >>> _ = open(p, "w").write("1\\t" + "\\t".join(["3"] * 13 + ["a1b2c3d4"] * 26) + "\\n")
        >>> chunk = next(read_criteo_tsv(p, BadRowReport()))
        >>> chunk.labels.tolist(), round(float(chunk.dense[0, 0]), 4), chunk.sparse[0]
        ([1.0], 1.3863, ['a1b2c3d4'])
    """
    for _, lines in line_chunks(path, chunk_rows, header=False, max_rows=max_rows,
                                progress=progress):
        chunk = _parse(path, lines, report)
        if chunk is not None:
            yield chunk


def _parse(path: str, lines, report: BadRowReport) -> Optional[RawChunk]:
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
