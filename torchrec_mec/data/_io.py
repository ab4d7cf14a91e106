"""Streaming line reading shared by the text readers: bytes in blocks, lines as offset arrays.

Lines end as in Python's text files opened with ``newline=""``: at ``\\n``, ``\\r\\n`` or a lone
``\\r``; a line's content excludes its ending. Lines are found with numpy on blocks of bytes, so
no Python object is made per line; decoding is left to the readers (per field, so that an
invalid byte makes one bad row, not a failed file).
"""
import gzip
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Generator, Iterator, Optional, Tuple, TypeVar, cast

import numpy as np
from iopath.common.file_io import g_pathmgr
from tqdm import tqdm

from torchrec_mec.data.schema import DataFormatError

_GZIP_MAGIC = b"\x1f\x8b"
BLOCK_BYTES = 32 << 20
"""Bytes read from the file at a time."""
PAD = 64
"""Zero bytes before the first and after the last line of a ``LineBlock``'s data, so that
fixed-width windows around any field stay inside the array."""
_PADDING = bytes(PAD)
MAX_LINE_BYTES = 16 << 20
"""A longer line is taken as a sign that the file is not text in the declared layout."""


def open_bytes(path: str) -> BinaryIO:
    """Opens a local or iopath-addressed file as bytes; ``.gz`` files are decompressed on the fly.

    The name must match the content: gzip data in a file not named ``.gz``, or a ``.gz`` file
    that is not gzip data, raises ``DataFormatError`` naming the file.
    """
    if not g_pathmgr.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    raw = g_pathmgr.open(path, "rb")
    try:
        magic = raw.read(2)
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    if path.endswith(".gz"):
        if magic != _GZIP_MAGIC:
            raw.close()
            raise DataFormatError(path, None, None, "named .gz but not gzip-compressed (it does "
                                  "not start with the gzip bytes 1f 8b); rename it without .gz "
                                  "if it is plain text")
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic == _GZIP_MAGIC:
        raw.close()
        raise DataFormatError(path, None, None, "gzip-compressed, but the name does not end in "
                              ".gz; rename it to end in .gz (or decompress it)")
    return raw


@dataclass
class LineBlock:
    """Consecutive lines of a file: their bytes and where each line's content lies.

    Args:
        path (str): the file (for messages).
        data (np.ndarray): uint8 bytes holding the lines, with ``PAD`` zero bytes on each side.
        starts (np.ndarray): int64 [n], offset in ``data`` of each line's first byte.
        ends (np.ndarray): int64 [n], offset just past each line's content (ending excluded).
        numbers (np.ndarray): int64 [n], 1-based line numbers in the file (header included).
    """

    path: str
    data: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int) -> bytes:
        """The content of the block's i-th line."""
        return self.data[self.starts[i] : self.ends[i]].tobytes()

    def slice(self, lo: int, hi: int) -> "LineBlock":
        return LineBlock(self.path, self.data, self.starts[lo:hi], self.ends[lo:hi],
                         self.numbers[lo:hi])


def _split_lines(text: np.ndarray, at_eof: bool) -> Tuple[np.ndarray, np.ndarray, int]:
    """(starts, ends, consumed): the complete lines of ``text`` and the bytes they take.

    Before end of file a block is cut after its last ``\\n``, so a ``\\r\\n`` is never split and
    a ``\\r`` at the cut is always followed by a byte of the block.
    """
    newlines = np.flatnonzero(text == 10)
    if at_eof:
        used = len(text)
    elif len(newlines) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    else:
        used = int(newlines[-1]) + 1
    returns = np.flatnonzero(text[:used] == 13)
    terminators = content_ends = newlines
    if len(returns):
        # A lone \r ends a line; one before a \n is part of that line's ending.
        lone = returns[text[np.minimum(returns + 1, len(text) - 1)] != 10]
        terminators = np.sort(np.concatenate([newlines, lone]))
        crlf = (text[terminators] == 10) & (text[np.maximum(terminators - 1, 0)] == 13)
        content_ends = terminators - crlf
    starts = np.concatenate([[0], terminators + 1])
    ends = np.concatenate([content_ends, [used]])
    if starts[-1] == used:  # nothing after the last terminator
        starts, ends = starts[:-1], ends[:-1]
    return starts.astype(np.int64), ends.astype(np.int64), used


def line_blocks(
    path: str, chunk_rows: int, *, header: bool, max_rows: Optional[int], progress: bool
) -> Iterator[Tuple[Optional[bytes], LineBlock]]:
    """Yields ``(header_line, block)`` with blocks of at most ``chunk_rows`` data lines.

    Line numbers are 1-based and count the header, whose content (bytes) comes with every
    block. ``max_rows`` caps the data lines read. Raises ``DataFormatError`` naming the file for
    a file with no data lines, a gzip stream that is truncated or corrupt, or a line longer
    than ``MAX_LINE_BYTES``.
    """
    with open_bytes(path) as f, tqdm(desc=f"reading {path}", unit=" rows", disable=not progress,
                                     mininterval=2.0) as bar:
        head: Optional[bytes] = None
        need_header = header
        number = 1  # of the next line
        left = max_rows
        pending = b""
        at_eof = False
        while not at_eof and (left is None or left > 0):
            more = _read(f, path, number)
            at_eof = not more
            data = np.frombuffer(_PADDING + pending + more + _PADDING, dtype=np.uint8)
            text = data[PAD : len(data) - PAD]
            starts, ends, used = _split_lines(text, at_eof)
            starts, ends = starts + PAD, ends + PAD
            pending = text[used:].tobytes()
            if need_header and len(starts):
                head = data[starts[0] : ends[0]].tobytes()
                starts, ends = starts[1:], ends[1:]
                number, need_header = number + 1, False
            if left is not None:
                starts, ends = starts[:left], ends[:left]
                left -= len(starts)
            numbers = np.arange(number, number + len(starts), dtype=np.int64)
            number += len(starts)
            if len(pending) > MAX_LINE_BYTES:
                raise DataFormatError(path, number, None, f"line longer than {MAX_LINE_BYTES} "
                                      "bytes: is this a text file in the declared format?")
            block = LineBlock(path, data, starts, ends, numbers)
            for lo in range(0, len(block), chunk_rows):
                part = block.slice(lo, lo + chunk_rows)
                bar.update(len(part))
                yield head, part
        if need_header:
            raise DataFormatError(path, None, None, "file is empty (no header line)")
        if number == (2 if header else 1):
            raise DataFormatError(path, None, None, "file has no data rows")


def _read(f: BinaryIO, path: str, number: int) -> bytes:
    """The next block of ``f``; a truncated or corrupt gzip stream raises ``DataFormatError``."""
    if not isinstance(f, gzip.GzipFile):
        return f.read(BLOCK_BYTES)
    try:
        return f.read(BLOCK_BYTES)
    except EOFError as e:
        problem = "the gzip stream is truncated (the file is incomplete: copy it again)"
        raise DataFormatError(path, None, None, f"{problem}; read up to line {number - 1}") from e
    except (OSError, zlib.error) as e:
        raise DataFormatError(path, None, None, f"the gzip stream is corrupt ({e}); read up to "
                              f"line {number - 1}") from e


T = TypeVar("T")


def prefetched(items: Generator[T, None, None], depth: int = 2) -> Iterator[T]:
    """Yields what ``items`` yields, produced by a background thread up to ``depth`` ahead.

    The readers' work is mostly numpy calls that release the GIL, so reading and parsing the
    next chunk runs on a second core while the caller (``prepare_dataset``'s counting) works on
    this one. An exception in ``items`` is raised here; closing this iterator stops the thread.
    """
    handoff: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((end, e))
        finally:
            items.close()

    worker = threading.Thread(target=produce, name="torchrec_mec-reader", daemon=True)
    worker.start()
    try:
        while True:
            item, error = handoff.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()
