"""Streaming line reading shared by the text readers."""
import gzip
import io
from typing import Iterator, List, Optional, TextIO, Tuple

from iopath.common.file_io import g_pathmgr
from tqdm import tqdm

from torchrec_mec.data.schema import DataFormatError


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
