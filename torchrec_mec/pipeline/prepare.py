"""Stage 0, ``prepare``: the raw data set (or the synthetic one) encoded into ``DIR/data``.

``criteo_1tb`` is the exception: the Criteo 1TB click logs as TorchRec preprocesses them
(``day_<d>_{dense,sparse,labels}.npy``, ``torchrec.datasets.criteo``) are already arrays, read in
place by ``BinaryCriteoDataset``; ``DIR/data/manifest.json`` then only points at them (folder,
days, and each file's size and mtime, so that a changed file changes the data set's digest), and
:func:`open_dataset` opens whichever kind a run holds.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torchrec_mec.data import (
    SPLITS,
    BinaryCriteoDataset,
    CTRDataset,
    EncodedDataset,
    prepare_dataset,
)
from torchrec_mec.data.encoded import read_manifest
from torchrec_mec.pipeline.parallel import init_distributed, run_on_main
from torchrec_mec.pipeline.settings import Settings

FORMATS = ("criteo", "avazu", "synthetic", "criteo_1tb")
BINARY_CRITEO = "criteo_1tb"
BINARY_CRITEO_KIND = "torchrec_mec-binary-criteo-link"
_DAY_FILE = re.compile(r"day_(\d+)_(dense|sparse|labels)\.npy")


@dataclass(frozen=True)
class DataSource:
    """Where a run's data comes from: a raw file and its format, or the synthetic generator.

    Args:
        format (str): ``"criteo"``, ``"avazu"``, ``"synthetic"`` or ``"criteo_1tb"``.
        path (Optional[str]): the raw file; the folder of ``day_<d>_*.npy`` files for
            ``"criteo_1tb"``; ``None`` for ``"synthetic"`` (whose settings are
            ``data.synthetic.*``).

    Raises:
        ValueError: an unknown format, a file for ``synthetic``, or none for the others.

    Example::

        >>> DataSource("synthetic").stamp()
        {'format': 'synthetic'}
        >>> DataSource("criteo")
        Traceback (most recent call last):
        ...
        ValueError: --format criteo needs --data (the raw file)
    """

    format: str
    path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "synthetic" and self.path is not None:
            raise ValueError("--format synthetic generates its data: give no --data "
                             "(its settings are data.synthetic.*)")
        if self.format != "synthetic" and self.path is None:
            what = "the folder of day_<d>_*.npy files" if self.format == BINARY_CRITEO \
                else "the raw file"
            raise ValueError(f"--format {self.format} needs --data ({what})")

    def stamp(self) -> Dict[str, Any]:
        """What identifies this source cheaply: format, and the file's path, size and mtime (of
        every day file, for ``criteo_1tb``)."""
        if self.path is None:
            return {"format": self.format}
        if self.format == BINARY_CRITEO:
            return {"format": self.format, "path": os.path.abspath(self.path),
                    "files": _day_files(self.path)}
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"input file not found: {self.path}")
        st = os.stat(self.path)
        return {"format": self.format, "path": os.path.abspath(self.path),
                "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare(
    data: Optional[str],
    format: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Encodes the raw data set (or generates the synthetic one) into ``out_dir``.

    Under torchrun rank 0 prepares and the others wait. A finished set with the same source and
    settings is reused (``prepare_dataset`` checks its checksums); a new set is built beside the
    old one and replaces it only once complete, so a failed re-prepare loses nothing.

    Args:
        data (Optional[str]): the raw file (Criteo TSV, Avazu CSV), the folder of Criteo 1TB
            npy files (``criteo_1tb``: read in place, every day but the last for training, the
            last halved into val and test, as TorchRec does; ``data`` settings unused);
            ``None`` for ``synthetic``.
        format (str): ``"criteo"``, ``"avazu"``, ``"synthetic"`` or ``"criteo_1tb"``.
        out_dir (str): the data set folder (``DIR/data`` in a run).
        settings (Settings): uses ``data``.
        force (bool): prepare again even if a matching set exists.
        progress (bool): show progress bars.

    Returns:
        str: ``out_dir``.
    """
    source = DataSource(format, data)
    s = settings.data

    def on_main() -> None:
        if source.format == BINARY_CRITEO:
            _link_binary_criteo(source, out_dir)
            return
        prepare_dataset(source.path, source.format, out_dir, min_count=s.min_count,
                        split=s.split, seed=s.seed, bad_rows=s.bad_rows, max_rows=s.max_rows,
                        synthetic=s.synthetic if format == "synthetic" else None,
                        overwrite=force, progress=progress)

    run_on_main(on_main, init_distributed())
    return out_dir


def open_dataset(data_dir: str) -> CTRDataset:
    """The data set of a run's ``DIR/data``: an ``EncodedDataset``, or the
    ``BinaryCriteoDataset`` its manifest points at (``criteo_1tb``).

    Raises:
        FileNotFoundError: no prepared data set there, or a Criteo npy file is missing (named).
    """
    path = os.path.join(data_dir, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                manifest = json.load(f)
            except ValueError:
                manifest = {}
        if manifest.get("kind") == BINARY_CRITEO_KIND:
            return BinaryCriteoDataset(manifest["root"], train_days=manifest["train_days"],
                                       eval_day=manifest["eval_day"])
    return EncodedDataset(data_dir)


def data_summary(data_dir: str) -> Optional[Dict[str, Any]]:
    """What the report says of a run's data set (``fingerprint``, ``num_rows`` per split,
    ``num_embeddings``, ``bad_rows``), or None if none is prepared.

    Raises:
        CorruptDatasetError: the manifest of an encoded data set is damaged (names it).
    """
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        linked = json.loads(raw).get("kind") == BINARY_CRITEO_KIND
    except ValueError:
        linked = False
    if not linked:
        m = read_manifest(data_dir)
        assert m is not None
        return {"fingerprint": m["fingerprint"], "num_rows": m["num_rows"],
                "num_embeddings": m["num_embeddings"], "bad_rows": m["bad_rows"]["count"]}
    ds = open_dataset(data_dir)
    return {"fingerprint": hashlib.sha256(raw).hexdigest(),
            "num_rows": {split: ds.num_rows(split) for split in SPLITS},
            "num_embeddings": ds.num_embeddings, "bad_rows": 0}


def _day_files(root: str) -> Dict[str, List[int]]:
    """``{file: [size, mtime_ns]}`` of the day files in ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Criteo 1TB folder not found: {root}")
    return {name: [os.stat(os.path.join(root, name)).st_size,
                   os.stat(os.path.join(root, name)).st_mtime_ns]
            for name in sorted(os.listdir(root)) if _DAY_FILE.fullmatch(name)}


def _link_binary_criteo(source: DataSource, out_dir: str) -> None:
    """Writes ``out_dir/manifest.json`` pointing at the npy files (checked by opening them)."""
    assert source.path is not None
    files = _day_files(source.path)
    days = sorted({int(m.group(1)) for m in map(_DAY_FILE.fullmatch, files) if m})
    if len(days) < 2:
        raise ValueError(f"--format criteo_1tb: {source.path} holds {len(days)} day(s) of "
                         "day_<d>_{dense,sparse,labels}.npy files; at least 2 are needed (the "
                         "last is split into validation and test)")
    manifest = {"kind": BINARY_CRITEO_KIND, "root": os.path.abspath(source.path),
                "train_days": days[:-1], "eval_day": days[-1], "files": files}
    BinaryCriteoDataset(os.path.abspath(source.path), train_days=days[:-1], eval_day=days[-1])
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"manifest.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
