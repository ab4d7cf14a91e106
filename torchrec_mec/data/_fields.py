"""Delimited fields of a ``LineBlock``, split and parsed with numpy, and the per-field rules.

The rules for one field (``parse_int``, ``decode_field``) are plain Python and define what is
valid. The vectorised paths handle the common cases (ASCII lines, integers written as plain
digits) in bulk and give the rest to these rules, so both always agree.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from torchrec_mec.data._io import PAD, LineBlock
from torchrec_mec.data.schema import note_issue

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_FAST_DIGITS = 18  # any 18-digit number fits in int64


@dataclass
class FieldSplit:
    """Where the fields of a block's lines are.

    Args:
        counts (np.ndarray): int64 [n], fields on each line.
        plain (np.ndarray): bool [n], the line has the expected field count and only ASCII bytes
            other than NUL (the lines the vectorised paths handle).
        rows (np.ndarray): int64 [p], indices of the plain lines.
        starts (np.ndarray): int64 [p, C], offset of each field of each plain line.
        ends (np.ndarray): int64 [p, C], offset just past each field.
    """

    counts: np.ndarray
    plain: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


def split_fields(block: LineBlock, sep: bytes, num_columns: int) -> FieldSplit:
    """Counts the fields of every line and locates the fields of the plain lines."""
    n = len(block)
    if n == 0:
        empty = np.zeros((0, num_columns), np.int64)
        return FieldSplit(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64),
                          empty, empty)
    lo, hi = int(block.starts[0]), int(block.ends[-1])
    span = block.data[lo:hi]
    # Separators lie inside lines only (line endings are \r and \n), in line order.
    seps = np.flatnonzero(span == ord(sep)) + lo
    counts = np.searchsorted(seps, block.ends) - np.searchsorted(seps, block.starts) + 1
    odd_bytes = np.flatnonzero(span.view(np.int8) <= 0) + lo  # NUL or >= 0x80
    plain = counts == num_columns
    plain[np.searchsorted(block.starts, odd_bytes, side="right") - 1] = False
    rows = np.flatnonzero(plain)
    if len(rows) < n or len(seps) != n * (num_columns - 1):
        first = np.searchsorted(seps, block.starts)
        seps = seps[(first[rows, None] + np.arange(num_columns - 1)).reshape(-1)]
    inner = seps.reshape(len(rows), num_columns - 1)
    starts = np.concatenate([block.starts[rows, None], inner + 1], axis=1)
    ends = np.concatenate([inner, block.ends[rows, None]], axis=1)
    return FieldSplit(counts.astype(np.int64), plain, rows, starts, ends)


def _windows(data: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """uint8 [len(offsets), width]: the ``width`` bytes from each offset (a copy)."""
    return sliding_window_view(data, width)[offsets]


# _LOW_BYTES[k]: a little-endian uint64 whose first k bytes are ff (k = 0..8).
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def fixed_width(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Fields ``data[starts:ends]`` (1-D offsets) as a numpy bytes array, 8 bytes per item (or
    a multiple of 8 if a field is longer).

    The fields must hold no NUL byte (numpy bytes arrays drop trailing NULs) and be at most
    ``PAD`` long (``LineBlock.data`` has ``PAD`` bytes past its last line).
    """
    widths = ends - starts
    words = max(-(-int(widths.max(initial=0)) // 8), 1)
    # Copy 8-byte words from each start, then clear the bytes past each field's end.
    out = _windows(data, starts, 8 * words).view(np.uint64)
    for j in range(words):
        out[:, j] &= _LOW_BYTES[np.clip(widths - 8 * j, 0, 8)]
    return out.view(f"S{8 * words}").reshape(len(starts))


def text_columns(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> List[np.ndarray]:
    """Columns of ASCII fields (offsets [p, c]): each a numpy bytes array (``fixed_width``),
    or (for a column with a field wider than ``PAD``) an object array of ``str``."""
    column_widths = (ends - starts).max(0, initial=0)
    columns: List[np.ndarray] = [np.zeros(0)] * starts.shape[1]
    narrow = column_widths <= PAD
    words = np.maximum(-(-column_widths // 8), 1)
    if narrow.all() and (words == words[0]).all():
        # One gather for the whole block when every column has the same item size.
        both = fixed_width(data, starts.reshape(-1), ends.reshape(-1))
        return list(both.reshape(starts.shape).T)
    for j in range(starts.shape[1]):
        if narrow[j]:
            columns[j] = fixed_width(data, starts[:, j], ends[:, j])
        else:
            columns[j] = np.array([data[s:e].tobytes().decode("ascii")
                                   for s, e in zip(starts[:, j], ends[:, j])], dtype=object)
    return columns


def parse_int(text: str) -> Tuple[int, Optional[str]]:
    """``(value, None)`` for a valid integer field, else ``(0, reason)``.

    Empty is 0 (a missing value); otherwise what Python's ``int`` reads, within int64.

    Example::

        >>> parse_int(""), parse_int("-12"), parse_int("x")[1]
        ((0, None), (-12, None), "not an integer: 'x'")
        >>> parse_int("99999999999999999999")[1]
        'integer out of range (must fit in 64 bits): 99999999999999999999'
    """
    if text == "":
        return 0, None
    try:
        value = int(text)
    except ValueError:
        return 0, f"not an integer: {text!r}"
    if not INT64_MIN <= value <= INT64_MAX:
        return 0, f"integer out of range (must fit in 64 bits): {text.strip()}"
    return value, None


def parse_int_columns(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> Tuple[np.ndarray, List[Tuple[int, int, str]]]:
    """Integer fields of plain (ASCII) lines: int64 values [p, c] and ``(row, column, reason)``
    for each invalid field (its value is 0).

    Fields written as ``-?[0-9]{1,18}`` or empty are parsed in bulk; the others by ``parse_int``.
    """
    widths = ends - starts
    if widths.size == 0:
        return np.zeros(starts.shape, dtype=np.int64), []
    width = min(int(widths.max()), _MAX_FAST_DIGITS + 1)
    lengths = widths.reshape(-1)
    # Right-aligned windows, transposed: row k holds each field's byte at width - 1 - k from its
    # end, so every step below works on long contiguous rows.
    digits = np.ascontiguousarray(_windows(data, (ends - width).reshape(-1), width).T)
    digits -= np.uint8(ord("0"))
    for k in range(width):  # clear bytes before each field; non-digits wrap to > 9
        digits[k] *= lengths > width - 1 - k
    negative = (data[starts.reshape(-1)] == ord("-")) & (lengths > 1)
    fits = lengths <= width
    signs = np.flatnonzero(negative & fits)
    digits[width - lengths[signs], signs] = 0
    fast = (digits <= 9).all(0) & (lengths <= _MAX_FAST_DIGITS + negative)
    values: np.ndarray = np.zeros(len(lengths), dtype=np.int64)
    for k in range(width):  # right-aligned, so leading zeros are harmless
        values = values * 10 + digits[k]
    values = np.where(negative, -values, values)
    values[~fast] = 0
    values = values.reshape(starts.shape)
    issues = []
    for r, c in zip(*np.nonzero(~fast.reshape(starts.shape))):
        text = data[starts[r, c] : ends[r, c]].tobytes().decode("ascii")
        values[r, c], reason = parse_int(text)
        if reason is not None:
            issues.append((int(r), int(c), reason))
    return values, issues


def decode_field(raw: bytes) -> Tuple[str, Optional[str]]:
    """``(text, None)`` for a UTF-8 field, else ``("", reason)`` naming the first bad byte.

    Example::

        >>> decode_field(b"caf\\xc3\\xa9"), decode_field(b"ab\\xff")[1]
        (('café', None), "invalid UTF-8 (byte 0xff at offset 2): b'ab\\\\xff'")
    """
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return "", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): {raw[:64]!r}"


def odd_row(block: LineBlock, i: int, sep: bytes, issues: Dict[int, Tuple[int, Optional[str], str]],
            column: Callable[[int], str],
            check: Callable[[int, str], Optional[str]]) -> Optional[List[str]]:
    """The decoded fields of the block's i-th line (one the vectorised paths do not take), or
    ``None`` after noting its leftmost bad field in ``issues``: a field that is not UTF-8, or
    for which ``check(column_index, text)`` gives a reason."""
    number = int(block.numbers[i])
    texts = []
    for j, raw in enumerate(block.text(i).split(sep)):
        text, reason = decode_field(raw)
        if reason is None:
            reason = check(j, text)
        if reason is not None:
            note_issue(issues, number, j, column(j), reason)
            return None
        texts.append(text)
    return texts
