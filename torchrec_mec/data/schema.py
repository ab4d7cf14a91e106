"""Shared vocabulary of the data layer: schemas, raw chunks, bad-row reports and errors."""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SPLITS: Tuple[str, ...] = ("train", "val", "test")
"""Split names, in this order everywhere (TorchRec's stage names)."""


@dataclass(frozen=True)
class DataSchema:
    """Names of the features of a CTR data set, in column order.

    The sparse names are the ``KeyedJaggedTensor`` keys of every batch, in this order.

    Args:
        dense_names (Tuple[str, ...]): dense (float) feature names, the columns of ``dense``.
        sparse_names (Tuple[str, ...]): categorical feature names, the columns of ``sparse``.
        label_name (str): name of the 0/1 label.

    Example::

        >>> s = DataSchema(dense_names=("I1",), sparse_names=("C1", "C2"))
        >>> s.num_dense, s.num_sparse
        (1, 2)
    """

    dense_names: Tuple[str, ...]
    sparse_names: Tuple[str, ...]
    label_name: str = "label"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_names", tuple(self.dense_names))
        object.__setattr__(self, "sparse_names", tuple(self.sparse_names))
        names = (*self.dense_names, *self.sparse_names, self.label_name)
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_names)

    def to_dict(self) -> Dict[str, Any]:
        return {"dense": list(self.dense_names), "sparse": list(self.sparse_names),
                "label": self.label_name}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataSchema":
        return cls(tuple(d["dense"]), tuple(d["sparse"]), d["label"])


class DataFormatError(ValueError):
    """A raw input file that cannot be read as the declared format.

    Args:
        path (str): the file.
        line (Optional[int]): 1-based line number, ``None`` for whole-file problems.
        column (Optional[str]): the column at fault, e.g. ``"I3 (column 3)"``, if one is.
        reason (str): what is wrong.

    Example::

        >>> str(DataFormatError("day_0.tsv", 7, "I3 (column 3)", "not an integer: 'x'"))
        "day_0.tsv, line 7, column I3 (column 3): not an integer: 'x'"
    """

    def __init__(self, path: str, line: Optional[int], column: Optional[str], reason: str):
        where = path if line is None else f"{path}, line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.column, self.reason = path, line, column, reason


class CorruptDatasetError(RuntimeError):
    """A prepared (encoded) data set whose files do not match its manifest.

    Args:
        path (str): the file that is missing, truncated or changed.
        reason (str): what does not match.

    Example::

        >>> str(CorruptDatasetError("data/train/sparse.npy", "size 10 != 4096 in manifest"))
        'data/train/sparse.npy: size 10 != 4096 in manifest'
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class BadRow:
    """One skipped input row: where it is and why it was skipped."""

    path: str
    line: int
    column: Optional[str]
    reason: str


@dataclass
class BadRowReport:
    """Counts bad rows, keeps the first ``max_examples``, or raises on the first one.

    Args:
        policy (str): ``"report"`` (skip, count and list) or ``"fail"`` (raise
            ``DataFormatError`` naming file, line and column).
        max_examples (int): how many bad rows to keep with their line numbers.

    Example::

        >>> r = BadRowReport("report")
        >>> r.add("a.tsv", 3, None, "expected 40 columns, found 39")
        >>> r.count, r.examples[0].line
        (1, 3)
    """

    policy: str = "report"
    max_examples: int = 100
    count: int = 0
    examples: List[BadRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("report", "fail"):
            raise ValueError(f"bad_rows must be 'report' or 'fail', got {self.policy!r}")

    def add(self, path: str, line: int, column: Optional[str], reason: str) -> None:
        if self.policy == "fail":
            raise DataFormatError(path, line, column, reason)
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(BadRow(path, line, column, reason))

    def to_dict(self) -> Dict[str, Any]:
        return {"policy": self.policy, "count": self.count, "max_examples": self.max_examples,
                "examples": [asdict(b) for b in self.examples]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BadRowReport":
        return cls(d["policy"], d["max_examples"], d["count"],
                   [BadRow(**b) for b in d["examples"]])

    def __str__(self) -> str:
        lines = [f"{self.count} bad rows skipped"]
        lines += [f"  {b.path}:{b.line}: {b.column or 'row'}: {b.reason}" for b in self.examples]
        if self.count > len(self.examples):
            lines.append(f"  ... {self.count - len(self.examples)} more")
        return "\n".join(lines)


@dataclass
class RawChunk:
    """Consecutive valid rows of a raw file, as a reader yields them.

    Args:
        lines (np.ndarray): int64 [n], 1-based line numbers in the file.
        labels (np.ndarray): float32 [n], 0 or 1.
        dense (np.ndarray): float32 [n, num_dense], already transformed (log1p for Criteo).
        sparse (List[np.ndarray]): ``num_sparse`` columns of n raw categorical values: numpy
            bytes arrays when every value is ASCII (``.astype(str)`` gives the strings), else
            object arrays of ``str``.
    """

    lines: np.ndarray
    labels: np.ndarray
    dense: np.ndarray
    sparse: List[np.ndarray]

    def __len__(self) -> int:
        return len(self.lines)


def concat_chunks(chunks: Sequence[RawChunk]) -> Optional[RawChunk]:
    """The rows of ``chunks`` as one chunk in line order; ``None`` if there are none.

    Example::

        >>> a = RawChunk(np.array([1, 4]), np.ones(2, np.float32), np.zeros((2, 0), np.float32),
        ...              [np.array([b"x", b"y"])])
        >>> b = RawChunk(np.array([2]), np.zeros(1, np.float32), np.zeros((1, 0), np.float32),
        ...              [np.array(["caf\u00e9"], dtype=object)])
        >>> c = concat_chunks([a, b])
        >>> c.lines.tolist(), c.labels.tolist(), c.sparse[0].tolist()
        ([1, 2, 4], [1.0, 0.0, 1.0], ['x', 'café', 'y'])
    """
    chunks = [c for c in chunks if len(c)]
    if len(chunks) <= 1:
        return chunks[0] if chunks else None
    lines = np.concatenate([c.lines for c in chunks])
    order = np.argsort(lines, kind="stable")
    sparse = []
    for k in range(len(chunks[0].sparse)):
        parts = [c.sparse[k].astype(str) if c.sparse[k].dtype.kind == "S" else c.sparse[k]
                 for c in chunks]
        sparse.append(np.concatenate([p.astype(object) for p in parts])[order])
    return RawChunk(
        lines=lines[order],
        labels=np.concatenate([c.labels for c in chunks])[order],
        dense=np.concatenate([c.dense for c in chunks])[order],
        sparse=sparse,
    )


def report_issues(report: BadRowReport, path: str,
                  issues: Dict[int, Tuple[int, Optional[str], str]]) -> None:
    """Feeds ``{line: (column_index, column_label, reason)}`` to ``report`` in line order."""
    for line in sorted(issues):
        _, column, reason = issues[line]
        report.add(path, line, column, reason)


def note_issue(issues: Dict[int, Tuple[int, Optional[str], str]], line: int, column_index: int,
               column: Optional[str], reason: str) -> None:
    """Records a row's problem, keeping only its leftmost bad column."""
    if line not in issues or column_index < issues[line][0]:
        issues[line] = (column_index, column, reason)


def check_fractions(split: Sequence[float]) -> Tuple[float, float, float]:
    """Validates (train, val, test) fractions: three non-negative numbers summing to 1."""
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6 or split[0] <= 0:
        raise ValueError(f"split must be 3 fractions (train > 0, val, test) summing to 1, "
                         f"got {tuple(split)}")
    return (float(split[0]), float(split[1]), float(split[2]))
