"""Files of an encoded data set: arrays written through temp names, the manifest, checksums."""
import hashlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np
from iopath.common.file_io import g_pathmgr

from torchrec_mec.data.schema import CorruptDatasetError

MANIFEST = "manifest.json"
FORMAT_KIND = "torchrec_mec.encoded_dataset"
FORMAT_VERSION = 1


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with g_pathmgr.open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_array(root: str, rel: str, dtype: Any, shape: tuple) -> np.ndarray:
    """A writable array for file ``root/rel``, memory-mapped to ``rel + '.tmp'`` until
    ``close_array`` renames it into place (so a crash never leaves a plausible-looking file)."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=dtype, shape=shape)


def close_array(root: str, rel: str, array: np.ndarray) -> Dict[str, Any]:
    """Finishes an ``open_array`` array (or saves any array) and returns its manifest entry."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(array, np.memmap):
        array.flush()
    else:
        with open(path + ".tmp", "wb") as f:
            np.save(f, array)
    os.replace(path + ".tmp", path)
    return {"size": os.path.getsize(path), "sha256": sha256_file(path),
            "shape": list(array.shape), "dtype": array.dtype.str}


def write_manifest(root: str, manifest: Dict[str, Any]) -> None:
    """Writes ``manifest.json`` atomically (temp name, then rename) through iopath."""
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with g_pathmgr.open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    g_pathmgr.mv(tmp, os.path.join(root, MANIFEST))


def read_manifest(root: str) -> Optional[Dict[str, Any]]:
    """The manifest of a prepared directory, or None if there is none (or not ours)."""
    path = os.path.join(root, MANIFEST)
    if not g_pathmgr.isfile(path):
        return None
    with g_pathmgr.open(path, "r") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise CorruptDatasetError(path, f"not valid JSON ({e})") from e
    if manifest.get("kind") != FORMAT_KIND:
        raise CorruptDatasetError(path, f"not an encoded data set manifest (kind "
                                  f"{manifest.get('kind')!r})")
    return manifest
