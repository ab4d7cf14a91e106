"""Reading and writing stage outputs through iopath: versioned, checksummed, atomic.

An artifact is one file holding named tensors and a JSON-serialisable ``meta`` dict::

    torchrec_mec-artifact v1 kind=<kind> header=<h> payload=<p> sha256=<hex>\\n   (first line)
    <h bytes: JSON header {"kind": ..., "meta": {...}}>
    <p bytes: torch.save of the tensor dict>

The sha256 covers header and payload, so any flipped byte after the first line is detected, and
the byte counts in the first line tell a truncated file from a corrupted one. Files are written
to ``<uri>.tmp-<pid>`` and renamed, so a reader never sees a half-written artifact under the
final name, and a process killed mid-write leaves the previous version intact (local paths are
replaced with ``os.replace``; iopath's ``mv`` refuses to overwrite, so other stores get
remove-then-move).
"""
import hashlib
import io
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from iopath.common.file_io import g_pathmgr

FORMAT_NAME = "torchrec_mec-artifact"
FORMAT_VERSION = 1
_MAX_FIRST_LINE = 512


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated, corrupted, of another kind or of an unknown version.

    The message always names the file and what is wrong with it.
    """


def save_artifact(
    uri: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], kind: str
) -> None:
    """Writes ``tensors`` and ``meta`` to ``uri`` atomically (temporary name, then rename).

    Args:
        uri (str): any iopath URI; a local path here. Parent folders are created.
        tensors (Mapping[str, Tensor]): the payload; stored on CPU.
        meta (Mapping[str, Any]): JSON-serialisable metadata (statistics, config, provenance).
        kind (str): what the artifact holds (for example ``"mec_quantized_table"``); checked on
            load so that one stage's output is never read as another's.

    Example::

        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/t.mec"
        >>> save_artifact(path, {"codes": torch.zeros(3, 2, dtype=torch.uint8)}, {"n": 3}, "demo")
        >>> tensors, meta = load_artifact(path, expect_kind="demo")
        >>> tensors["codes"].shape, meta["n"]
        (torch.Size([3, 2]), 3)
    """
    if not kind or any(c.isspace() for c in kind):
        raise ValueError(f"artifact kind must be a non-empty word, got {kind!r}")
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, buf)
    payload = buf.getvalue()
    header = json.dumps({"kind": kind, "meta": meta}, sort_keys=True).encode("utf-8")
    digest = hashlib.sha256(header + payload).hexdigest()
    first = (
        f"{FORMAT_NAME} v{FORMAT_VERSION} kind={kind} header={len(header)} "
        f"payload={len(payload)} sha256={digest}\n"
    ).encode("ascii")
    parent = os.path.dirname(uri)
    if parent:
        g_pathmgr.mkdirs(parent)
    tmp = f"{uri}.tmp-{os.getpid()}"
    try:
        with g_pathmgr.open(tmp, "wb") as f:
            f.write(first)
            f.write(header)
            f.write(payload)
        _replace(tmp, uri)
    finally:
        if g_pathmgr.exists(tmp):
            g_pathmgr.rm(tmp)


def read_artifact_header(uri: str) -> Dict[str, Any]:
    """The parsed first line of the artifact at ``uri`` (format, version, kind, sizes, sha256).

    Cheap: reads one line. Raises ``ArtifactError`` if the file is not an artifact.
    """
    with g_pathmgr.open(uri, "rb") as f:
        return _parse_first_line(uri, f.readline(_MAX_FIRST_LINE))


def load_artifact(
    uri: str, expect_kind: Optional[str] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Reads and verifies an artifact written by :func:`save_artifact`.

    Args:
        uri (str): any iopath URI.
        expect_kind (Optional[str]): if given, the artifact's kind must equal it.

    Returns:
        (tensors, meta): the tensor dict (on CPU) and the metadata dict.

    Raises:
        ArtifactError: missing, not an artifact, unknown version, other kind, truncated, or
            checksum mismatch; the message names ``uri``.

    Example::

        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/x.mec"
        >>> save_artifact(path, {"w": torch.ones(2)}, {}, "demo")
        >>> load_artifact(path)[0]["w"]
        tensor([1., 1.])
    """
    if not g_pathmgr.exists(uri):
        raise ArtifactError(f"artifact {uri}: file not found")
    with g_pathmgr.open(uri, "rb") as f:
        info = _parse_first_line(uri, f.readline(_MAX_FIRST_LINE))
        body = f.read()
    want = info["header"] + info["payload"]
    if len(body) < want:
        raise ArtifactError(
            f"artifact {uri}: truncated, {len(body)} of {want} bytes after the first line"
        )
    if len(body) > want:
        raise ArtifactError(f"artifact {uri}: {len(body) - want} unexpected trailing bytes")
    if hashlib.sha256(body).hexdigest() != info["sha256"]:
        raise ArtifactError(f"artifact {uri}: checksum mismatch (corrupted)")
    if expect_kind is not None and info["kind"] != expect_kind:
        raise ArtifactError(f"artifact {uri}: holds {info['kind']!r}, expected {expect_kind!r}")
    header = json.loads(body[: info["header"]].decode("utf-8"))
    tensors = torch.load(io.BytesIO(body[info["header"] :]), weights_only=True)
    return tensors, header["meta"]


def _replace(src: str, dst: str) -> None:
    if "://" not in dst:
        os.replace(src, dst)  # atomic, also over an existing file
        return
    # iopath's mv refuses to overwrite; other stores get remove-then-move.
    if g_pathmgr.exists(dst):
        g_pathmgr.rm(dst)
    if not g_pathmgr.mv(src, dst):
        raise OSError(f"could not rename {src} to {dst}")


def _parse_first_line(uri: str, line: bytes) -> Dict[str, Any]:
    if not line.endswith(b"\n"):
        raise ArtifactError(f"artifact {uri}: not a {FORMAT_NAME} file (no header line)")
    parts = line.decode("ascii", errors="replace").split()
    if len(parts) != 6 or parts[0] != FORMAT_NAME:
        raise ArtifactError(f"artifact {uri}: not a {FORMAT_NAME} file (bad header line)")
    if parts[1] != f"v{FORMAT_VERSION}":
        raise ArtifactError(
            f"artifact {uri}: format version {parts[1]} is not supported "
            f"(this is v{FORMAT_VERSION})"
        )
    fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    try:
        return {
            "format": parts[0],
            "version": FORMAT_VERSION,
            "kind": fields["kind"],
            "header": int(fields["header"]),
            "payload": int(fields["payload"]),
            "sha256": fields["sha256"],
        }
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"artifact {uri}: bad header line ({e})") from None
