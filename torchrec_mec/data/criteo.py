"""Reader for the Criteo display-ads TSV layout (Kaggle challenge / 1TB click logs text files).

One line per impression, tab separated, no header: ``label, I1..I13, C1..C26``. Integer fields
may be empty (missing) or negative; categorical fields are 8-hex-digit hashes or empty.
"""
from typing import Dict, Generator, Iterator, List, Optional, Tuple

import numpy as np

from torchrec_mec.data._fields import (
    FieldSplit,
    odd_row,
    parse_int,
    parse_int_columns,
    split_fields,
    text_columns,
)
from torchrec_mec.data._io import LineBlock, line_blocks, prefetched
from torchrec_mec.data.schema import (
    BadRowReport,
    DataSchema,
    RawChunk,
    concat_chunks,
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
_COLUMN_NAMES = ("label", *CRITEO_SCHEMA.dense_names, *CRITEO_SCHEMA.sparse_names)


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

    A row with a column count other than 40, a label other than 0/1, an I-field that is not an
    integer (or does not fit in 64 bits), or a field that is not valid UTF-8 is handed to
    ``report`` (skipped and listed, or raised as ``DataFormatError`` with file, line and
    column); columns are never shifted to make a row fit. A row's reason is its leftmost bad
    column. Lines are split and parsed with numpy a block at a time, in a background thread
    that keeps up to two chunks ready (docs/data.md has the speed).

    Args:
        path (str): local or iopath path; ``.gz`` is decompressed on the fly.
        report (BadRowReport): collects (or raises on) bad rows.
        chunk_rows (int): most lines per yielded chunk (memory is O(chunk_rows)).
        max_rows (Optional[int]): read at most this many lines.
        progress (bool): show a tqdm bar.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "day.tsv")
        >>> _ = open(p, "w").write("1\\t" + "\\t".join(["3"] * 13 + ["a1b2c3d4"] * 26) + "\\n")
        >>> chunk = next(read_criteo_tsv(p, BadRowReport()))
        >>> chunk.labels.tolist(), round(float(chunk.dense[0, 0]), 4), chunk.sparse[0].tolist()
        ([1.0], 1.3863, [b'a1b2c3d4'])
    """
    return prefetched(_chunks(path, report, chunk_rows, max_rows, progress))


def _chunks(path: str, report: BadRowReport, chunk_rows: int, max_rows: Optional[int],
            progress: bool) -> Generator[RawChunk, None, None]:
    for _, block in line_blocks(path, chunk_rows, header=False, max_rows=max_rows,
                                progress=progress):
        chunk = _parse(block, report)
        if chunk is not None:
            yield chunk


def _column(j: int) -> str:
    return f"{_COLUMN_NAMES[j]} (column {j})"


def _parse(block: LineBlock, report: BadRowReport) -> Optional[RawChunk]:
    issues: Dict[int, Tuple[int, Optional[str], str]] = {}
    split = split_fields(block, b"\t", _NUM_COLUMNS)
    for i in np.flatnonzero(split.counts != _NUM_COLUMNS):
        note_issue(issues, int(block.numbers[i]), -1, None, f"expected {_NUM_COLUMNS} "
                   f"tab-separated columns, found {split.counts[i]}")
    chunks = [_parse_plain(block, split, issues)]
    odd = np.flatnonzero(~split.plain & (split.counts == _NUM_COLUMNS))
    if len(odd):
        chunks.append(_parse_odd(block, odd, issues))
    report_issues(report, block.path, issues)
    return concat_chunks(chunks)


def _parse_plain(block: LineBlock, split: FieldSplit,
                 issues: Dict[int, Tuple[int, Optional[str], str]]) -> RawChunk:
    """The plain (ASCII, 40-field) lines, in bulk."""
    data, starts, ends = block.data, split.starts, split.ends
    numbers = block.numbers[split.rows]
    good = np.ones(len(numbers), dtype=bool)

    first = data[starts[:, 0]] if len(numbers) else np.zeros(0, np.uint8)
    label_ok = (ends[:, 0] - starts[:, 0] == 1) & ((first == ord("0")) | (first == ord("1")))
    for i in np.flatnonzero(~label_ok).tolist():
        text = data[starts[i, 0] : ends[i, 0]].tobytes().decode("ascii")
        note_issue(issues, int(numbers[i]), 0, _column(0), f"label is not 0 or 1: {text!r}")
    good &= label_ok

    values, bad_ints = parse_int_columns(data, starts[:, 1 : 1 + CRITEO_NUM_DENSE],
                                         ends[:, 1 : 1 + CRITEO_NUM_DENSE])
    for i, j, reason in bad_ints:
        note_issue(issues, int(numbers[i]), 1 + j, _column(1 + j), reason)
        good[i] = False

    keep = np.flatnonzero(good)
    first_sparse = 1 + CRITEO_NUM_DENSE
    return RawChunk(
        lines=numbers[keep],
        labels=(first[keep] - ord("0")).astype(np.float32),
        dense=criteo_dense_transform(values[keep]),
        sparse=text_columns(data, starts[keep, first_sparse:], ends[keep, first_sparse:]),
    )


def _parse_odd(block: LineBlock, lines: np.ndarray,
               issues: Dict[int, Tuple[int, Optional[str], str]]) -> RawChunk:
    """Lines with the right field count but NUL or non-ASCII bytes, one field at a time by the
    same rules as the bulk path, plus a UTF-8 check of every field."""
    def check(j: int, text: str) -> Optional[str]:
        if j == 0:
            return None if text in ("0", "1") else f"label is not 0 or 1: {text!r}"
        return parse_int(text)[1] if j <= CRITEO_NUM_DENSE else None

    numbers: List[int] = []
    rows: List[List[str]] = []
    for i in lines.tolist():
        row = odd_row(block, i, b"\t", issues, _column, check)
        if row is not None:
            numbers.append(int(block.numbers[i]))
            rows.append(row)
    ints = [parse_int(text)[0] for row in rows for text in row[1 : 1 + CRITEO_NUM_DENSE]]
    return RawChunk(
        lines=np.asarray(numbers, dtype=np.int64),
        labels=np.asarray([float(row[0]) for row in rows], dtype=np.float32),
        dense=criteo_dense_transform(np.asarray(ints, dtype=np.int64)
                                     .reshape(-1, CRITEO_NUM_DENSE)),
        sparse=[np.asarray([row[k] for row in rows], dtype=object)
                for k in range(1 + CRITEO_NUM_DENSE, _NUM_COLUMNS)],
    )
