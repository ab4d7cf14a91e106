"""Model and optimizer state on disk as ``torch.distributed.checkpoint`` (DCP) directories.

A state directory is what ``dcp.save`` writes (``.metadata`` and one ``__<rank>_<i>.distcp``
file per writing rank) plus ``manifest.json``::

    {"format": "torchrec_mec-state", "version": 1, "kind": "<kind>", "meta": {...},
     "files": {"<file>": "<sha256>", ...}, "sha256": "<sha256 of the fields above>"}

Each rank writes only the shards it holds (``ShardedTensor`` values of a
``DistributedModelParallel`` state dict; a replicated plain tensor once), so nothing is gathered
whole on any rank, and ``dcp.load`` reads into any other sharding plan or world size, or into
plain tensors in one process. The whole directory is written under ``<dir>.tmp`` and renamed when
every rank's shards and the manifest are on disk, so a reader never sees a half-written state
under the final name, and a kill mid-write leaves the previous one intact. Before a state is
trusted, every file is checked against the manifest (:func:`verify_state`).

Neither saving nor loading holds a second copy of the state (:class:`_StatePlanner`):

- FBGEMM keeps all of a rank's tables (and their optimizer state) in one flat buffer, and a
  state dict's tensors are views of it. DCP's file writer clones a tensor whose storage is larger
  than the tensor and keeps every clone until the rank's file is written, so a rank held its
  state twice while saving; such a view is handed to it as an alias that owns exactly its bytes
  instead (nothing copied).
- DCP's reader loads a saved item whole before copying the part it needs into its destination;
  every tensor is saved in items of at most :data:`SAVE_CHUNK_BYTES` (row ranges), so reading
  a table needs that much beside it, not a copy of the table.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from torchrec_mec.artifacts import ArtifactError
from torchrec_mec.data._files import sha256_file
from torchrec_mec.pipeline.parallel import DistContext, barrier, run_on_main

STATE_FORMAT = "torchrec_mec-state"
STATE_VERSION = 1
MANIFEST = "manifest.json"
SAVE_CHUNK_BYTES = 64 << 20
"""The largest item a state directory holds: what reading one costs beside its destination."""
ONE_PROCESS = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
"""The context of a state read or written by one rank alone (no collective)."""


def save_state(uri: str, state: Mapping[str, Any], ctx: DistContext, kind: str,
               meta: Mapping[str, Any]) -> None:
    """Writes ``state`` (flat: key -> tensor or ``ShardedTensor``) as the state directory ``uri``.

    A collective when ``ctx.distributed``: every rank passes its state dict (same keys); with
    :data:`ONE_PROCESS` the calling rank writes alone.

    Example::

        >>> import tempfile
        >>> d = os.path.join(tempfile.mkdtemp(), "state")
        >>> save_state(d, {"w": torch.arange(4.0)}, ONE_PROCESS, "demo", {"step": 3})
        >>> w = {"w": torch.zeros(4)}
        >>> load_state(d, w, ONE_PROCESS, "demo")["step"], w["w"].tolist()
        (3, [0.0, 1.0, 2.0, 3.0])
    """
    tmp = f"{uri.rstrip('/')}.tmp"
    if ctx.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier(ctx)
    with _quiet():
        dcp.save(dict(state), checkpoint_id=tmp, no_dist=not ctx.distributed,
                 planner=_StatePlanner())

    def publish() -> None:
        _drop_save_identity(os.path.join(tmp, ".metadata"))
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        body = {"format": STATE_FORMAT, "version": STATE_VERSION, "kind": kind,
                "meta": dict(meta), "files": files}
        manifest = {**body, "sha256": _digest(body)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        old = f"{uri.rstrip('/')}.old"
        if os.path.exists(uri):
            os.replace(uri, old)
        os.replace(tmp, uri)
        if os.path.exists(old):
            shutil.rmtree(old)

    barrier(ctx)
    run_on_main(publish, ctx)


def read_manifest(uri: str, kind: str) -> Dict[str, Any]:
    """The manifest of the state directory ``uri`` (cheap: the file sums are not checked).

    Raises:
        ArtifactError: missing, not a state directory of ``kind``, another version, or a
            manifest that does not match its own checksum (names the directory).
    """
    path = os.path.join(uri, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"state {uri}: not found (no {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
        body = {k: v for k, v in manifest.items() if k != "sha256"}
        ok = manifest["format"] == STATE_FORMAT and manifest["sha256"] == _digest(body)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(f"state {uri}: {MANIFEST} is corrupted or not a {STATE_FORMAT} "
                            "manifest")
    if manifest["version"] != STATE_VERSION:
        raise ArtifactError(f"state {uri}: format version {manifest['version']} is not "
                            f"supported (this is {STATE_VERSION})")
    if manifest["kind"] != kind:
        raise ArtifactError(f"state {uri}: holds {manifest['kind']!r}, expected {kind!r}")
    return manifest


def verify_state(uri: str, kind: str) -> Dict[str, Any]:
    """Checks every file of the state directory ``uri`` against its manifest; returns the
    manifest's ``meta``.

    Raises:
        ArtifactError: as :func:`read_manifest`, or a file missing, extra or corrupted (named).
    """
    manifest = read_manifest(uri, kind)
    present = set(os.listdir(uri)) - {MANIFEST}
    extra = sorted(present - set(manifest["files"]))
    if extra:
        raise ArtifactError(f"state {uri}: files not in its manifest: {extra}")
    for name, want in manifest["files"].items():
        path = os.path.join(uri, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"state {uri}: {name} is missing")
        if sha256_file(path) != want:
            raise ArtifactError(f"state {uri}: {name} is corrupted (checksum mismatch)")
    return manifest["meta"]


def load_state(uri: str, state: Dict[str, Any], ctx: DistContext, kind: str,
               verify: bool = True) -> Dict[str, Any]:
    """Reads the entries ``state`` names from the state directory ``uri`` into ``state``'s
    tensors in place (any subset of the saved keys; ``ShardedTensor`` values receive the part
    their rank holds, whatever plan and world size wrote them); returns the manifest's ``meta``.

    A collective when ``ctx.distributed`` (rank 0 verifies the files first, with ``verify``);
    with :data:`ONE_PROCESS` the calling rank reads alone. Parts of a module's state dict may be
    copies: pass the filled ``state`` to ``load_state_dict`` afterwards.

    Raises:
        ArtifactError: the directory fails :func:`verify_state`, or lacks a requested entry,
            or an entry's shape differs (names directory and entry).
    """
    meta = run_on_main(lambda: verify_state(uri, kind) if verify else read_manifest(uri, kind)
                       ["meta"], ctx)
    saved = state_shapes(uri)
    for key, value in state.items():
        if key not in saved:
            raise ArtifactError(f"state {uri}: has no entry {key!r}")
        size = tuple(value.size())
        if saved[key][0] != size:
            raise ArtifactError(f"state {uri}: entry {key!r} has shape {saved[key][0]}, "
                                f"expected {size}")
    with _quiet():
        dcp.load(state, checkpoint_id=uri, no_dist=not ctx.distributed)
    return meta


def state_shapes(uri: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor entry of the state directory ``uri``, from its DCP
    metadata (no tensor is read)."""
    metadata = FileSystemReader(uri).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype)
            for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def remove_state(uri: str) -> None:
    """Removes the state directory ``uri`` and a half-written ``<uri>.tmp``, if present."""
    for path in (uri, f"{uri.rstrip('/')}.tmp"):
        if os.path.isdir(path):
            shutil.rmtree(path)


class _StatePlanner(DefaultSavePlanner):
    """DCP's default save planner, except that every tensor item larger than
    :data:`SAVE_CHUNK_BYTES` is split into row ranges (items of their own, read back one by
    one), and an item viewing a larger storage is resolved to :func:`own_bytes` of it, so
    that the file writer, which clones such views and keeps the clones until the rank's file is
    complete, writes it without a copy."""

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._parts: Dict[Tuple[str, Tuple[int, ...]], Tuple[MetadataIndex, int, int]] = {}
        items = [part for item in plan.items for part in self._split(item)]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def _split(self, item: WriteItem) -> List[WriteItem]:
        data = item.tensor_data
        if data is None or len(data.chunk.sizes) == 0 or data.chunk.sizes[0] == 0:
            return [item]
        rows = data.chunk.sizes[0]
        row_bytes = (math.prod(data.chunk.sizes[1:])
                     * torch._utils._element_size(data.properties.dtype))
        step = max(1, SAVE_CHUNK_BYTES // max(row_bytes, 1))
        if rows <= step:
            return [item]
        parts = []
        for start in range(0, rows, step):
            n = min(step, rows - start)
            offsets = torch.Size([data.chunk.offsets[0] + start, *data.chunk.offsets[1:]])
            chunk = ChunkStorageMetadata(offsets=offsets,
                                         sizes=torch.Size([n, *data.chunk.sizes[1:]]))
            self._parts[(item.index.fqn, tuple(offsets))] = (item.index, start, n)
            parts.append(WriteItem(index=MetadataIndex(item.index.fqn, offsets),
                                   type=WriteItemType.SHARD,
                                   tensor_data=dataclasses.replace(data, chunk=chunk)))
        return parts

    def resolve_data(self, write_item: WriteItem) -> Any:
        index = write_item.index
        part = self._parts.get((index.fqn, tuple(index.offset or ())))
        if part is None:
            return own_bytes(super().resolve_data(write_item))
        whole, start, rows = part
        return own_bytes(self.lookup_object(whole).detach().narrow(0, start, rows))


def own_bytes(value: Any) -> Any:
    """``value`` as a tensor whose storage is exactly its own bytes, sharing its memory, when it
    is a contiguous CPU view of a larger storage; anything else as it is (a dtype NumPy lacks,
    such as bfloat16, too: DCP then copies it).

    Example::

        >>> flat = torch.zeros(6, 2)
        >>> rows = own_bytes(flat[2:4])
        >>> rows.untyped_storage().nbytes(), rows.data_ptr() == flat[2:4].data_ptr()
        (16, True)
    """
    if (not isinstance(value, torch.Tensor) or value.device.type != "cpu"
            or not value.is_contiguous() or value.untyped_storage().nbytes() == value.nbytes):
        return value
    try:
        return torch.from_numpy(value.detach().numpy())  # keeps ``value`` alive
    except TypeError:
        return value


def _drop_save_identity(path: str) -> None:
    """Clears what makes two saves of the same state differ (DCP's ``storage_meta``: a random
    save id and the temporary path), so the same state gives the same bytes, and a stage that
    reproduces its output leaves what read it up to date."""
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # DCP's own format for .metadata
    metadata.storage_meta = None
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hides DCP's notice that one process reads or writes alone (what ``no_dist`` asks for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
