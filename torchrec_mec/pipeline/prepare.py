"""Stage 0, ``prepare``: the raw data set (or the synthetic one) encoded into ``DIR/data``."""
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torchrec_mec.data import prepare_dataset
from torchrec_mec.pipeline.parallel import init_distributed, run_on_main
from torchrec_mec.pipeline.settings import Settings

FORMATS = ("criteo", "avazu", "synthetic")


@dataclass(frozen=True)
class DataSource:
    """Where a run's data comes from: a raw file and its format, or the synthetic generator.

    Args:
        format (str): ``"criteo"``, ``"avazu"`` or ``"synthetic"``.
        path (Optional[str]): the raw file; ``None`` for ``"synthetic"`` (whose settings are
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
            raise ValueError(f"--format {self.format} needs --data (the raw file)")

    def stamp(self) -> Dict[str, Any]:
        """What identifies this source cheaply: format, and the file's path, size and mtime."""
        if self.path is None:
            return {"format": self.format}
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
        data (Optional[str]): the raw file (Criteo TSV, Avazu CSV); ``None`` for ``synthetic``.
        format (str): ``"criteo"``, ``"avazu"`` or ``"synthetic"``.
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
        prepare_dataset(source.path, source.format, out_dir, min_count=s.min_count,
                        split=s.split, seed=s.seed, bad_rows=s.bad_rows, max_rows=s.max_rows,
                        synthetic=s.synthetic if format == "synthetic" else None,
                        overwrite=force, progress=progress)

    run_on_main(on_main, init_distributed())
    return out_dir
