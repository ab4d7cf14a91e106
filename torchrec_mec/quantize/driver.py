"""quantize_tables: every large table of a model, spread over ranks, with resumable artifacts."""
import dataclasses
import hashlib
import logging
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from iopath.common.file_io import g_pathmgr

from torchrec_mec.artifacts import ArtifactError, load_artifact, save_artifact
from torchrec_mec.quantize.config import MECConfig
from torchrec_mec.quantize.quantize_table import (
    QuantizeResult,
    QuantizeStats,
    quantize_table,
    table_fingerprint,
)
from torchrec_mec.quantize.threads import one_thread

logger = logging.getLogger(__name__)

ARTIFACT_KIND = "mec_quantized_table"
ARTIFACT_SUFFIX = ".mec"
CHECKPOINT_SUFFIX = ".mec.ckpt"
DEFAULT_MIN_ROWS = 100_000
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def table_seed(seed: int, name: str) -> int:
    """The seed of table ``name``: a function of (seed, name) only, so a table's result does not
    depend on which rank quantizes it or on the other tables."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def assign_tables(rows: Mapping[str, int], world_size: int) -> Dict[str, int]:
    """Greedy balance by rows: largest table first, each to the least-loaded rank.

    Ties go to the lower rank and tables of equal size are taken in name order, so every rank
    computes the same assignment.

    Example::

        >>> assign_tables({"a": 100, "b": 60, "c": 50, "d": 10}, world_size=2)
        {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    load = [0] * world_size
    owner: Dict[str, int] = {}
    for name in sorted(rows, key=lambda t: (-rows[t], t)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += rows[name]
    return owner


def artifact_uri(out_dir: str, name: str) -> str:
    return f"{out_dir.rstrip('/')}/{name}{ARTIFACT_SUFFIX}"


def load_quantized_table(uri: str, fingerprint: Optional[str] = None) -> QuantizeResult:
    """Reads one table's codes, codebooks and stats written by :func:`quantize_tables`.

    Args:
        uri (str): the artifact (``<out_dir>/<table>.mec``).
        fingerprint (Optional[str]): if given, the artifact must have been made from the data
            and config with this fingerprint (``table_fingerprint``).

    Raises:
        ArtifactError: missing, corrupted, truncated, of another kind, or stale.
    """
    tensors, meta = load_artifact(uri, expect_kind=ARTIFACT_KIND)
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise ArtifactError(f"artifact {uri}: made from other data or another config (stale)")
    return QuantizeResult(
        codes=tensors["codes"], codebooks=tensors["codebooks"], stats=QuantizeStats(**meta["stats"])
    )


def quantize_tables(
    tables: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    config: MECConfig,
    out_dir: str,
    min_rows: int = DEFAULT_MIN_ROWS,
    overwrite: bool = False,
    progress: bool = True,
    shapes: Optional[Mapping[str, Optional[Tuple[int, int]]]] = None,
    num_rows: Optional[Mapping[str, int]] = None,
) -> Dict[str, Optional[QuantizeResult]]:
    """Quantizes every table with at least ``min_rows`` rows, with ``config``'s M and K, or
    the tables ``shapes`` names, each with its own (M, K); the others are kept full.

    Each table gets the seed ``table_seed(config.seed, name)`` and its result is written to
    ``<out_dir>/<name>.mec`` (codes, codebooks, stats; checksummed, atomic). A table whose
    artifact already matches its data and config is skipped; a table interrupted mid-training
    resumes from ``<out_dir>/<name>.mec.ckpt``, its last epoch checkpoint.

    With ``torch.distributed`` initialised, rank r quantizes its share of the tables (largest
    first, balanced by rows, see :func:`assign_tables`), reading ``tables[name]`` only for those
    (a mapping that loads on access keeps one table in memory at a time), then all ranks meet
    at a barrier and each loads every artifact (codes and codebooks). Each table is quantized
    on one torch thread (:func:`~torchrec_mec.quantize.threads.one_thread`) and no collective
    touches the numerics, so the results equal a single-process run with the same seeds,
    whatever the thread count.

    Args:
        tables (Mapping[str, Tuple[Tensor, Tensor]]): table name -> (weight [N, D], counts [N]).
            Names may hold letters, digits, ``_``, ``.`` and ``-``. Every rank passes all tables.
        config (MECConfig): shared by all tables (seed is re-derived per table).
        out_dir (str): iopath URI of the folder for artifacts and checkpoints.
        min_rows (int): smaller tables are not compressed (unless ``shapes`` is given).
        overwrite (bool): quantize again even tables whose artifact is up to date (their
            epoch checkpoints are discarded too).
        progress (bool): show tqdm progress bars.
        shapes (Optional[Mapping[str, Optional[Tuple[int, int]]]]): per table, (M, K) or None
            (kept full), e.g. from ``torchrec_mec.quantize.budget.plan_tables``; replaces
            ``min_rows`` and ``config``'s M and K. Tables it does not name are kept full.
        num_rows (Optional[Mapping[str, int]]): every table's rows, when ``tables`` loads
            tables on access (else read from the weights).

    Returns:
        Dict[str, Optional[QuantizeResult]]: per table in ``tables``; None means kept full.

    Raises:
        ValueError: bad table name or bad table (the message names the table).
        ArtifactError: an existing artifact or checkpoint is corrupted or truncated (named).

    Example::

        >>> import tempfile
        >>> g = torch.Generator().manual_seed(0)
        >>> tables = {"big": (torch.randn(3000, 8, generator=g), torch.randint(0, 50, (3000,))),
        ...           "small": (torch.randn(100, 8, generator=g), torch.randint(0, 50, (100,)))}
        >>> cfg = MECConfig(num_subspaces=2, codebook_size=16, epochs=1, samples_per_epoch=512,
        ...                 batch_size=256)
        >>> res = quantize_tables(tables, cfg, tempfile.mkdtemp(), min_rows=1000, progress=False)
        >>> res["small"] is None, res["big"].codes.shape
        (True, torch.Size([3000, 2]))
    """
    for name in tables:
        if not _TABLE_NAME.fullmatch(name):
            raise ValueError(f"table {name!r}: names may hold only letters, digits, '_', '.', '-'")
    rows = dict(num_rows) if num_rows is not None else {
        name: int(weight.shape[0]) for name, (weight, _) in tables.items()}
    if shapes is None:
        compressed = {name: n for name, n in rows.items() if n >= min_rows}
        for name in rows.keys() - compressed.keys():
            logger.info("table %r: %d rows < min_rows %d, kept full", name, rows[name], min_rows)
        shape = {name: (config.num_subspaces, config.codebook_size) for name in compressed}
    else:
        unknown = sorted(shapes.keys() - rows.keys())
        if unknown:
            raise ValueError(f"shapes name tables that are not given: {unknown}")
        shape = {name: mk for name, mk in shapes.items() if mk is not None}
        compressed = {name: rows[name] for name in shape}

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    owner = assign_tables(compressed, world_size)
    configs = {name: dataclasses.replace(config, seed=table_seed(config.seed, name),
                                         num_subspaces=shape[name][0],
                                         codebook_size=shape[name][1])
               for name in compressed}
    fingerprints: Dict[str, str] = {}

    mine: List[str] = [name for name in owner if owner[name] == rank]  # largest first
    for name in mine:
        weight, counts = tables[name]
        fingerprints[name] = table_fingerprint(weight, counts, configs[name])
        uri = artifact_uri(out_dir, name)
        checkpoint = f"{out_dir.rstrip('/')}/{name}{CHECKPOINT_SUFFIX}"
        if overwrite and g_pathmgr.exists(checkpoint):
            g_pathmgr.rm(checkpoint)
        if g_pathmgr.exists(uri) and not overwrite:
            _, meta = load_artifact(uri, expect_kind=ARTIFACT_KIND)  # raises if corrupted
            if meta["fingerprint"] == fingerprints[name]:
                logger.info("table %r: %s is up to date, skipped", name, uri)
                continue
            logger.info("table %r: %s is stale (other data or config), redoing it", name, uri)
        with one_thread():
            result = quantize_table(weight, counts, configs[name], name=name,
                                    checkpoint_uri=checkpoint, progress=progress)
        meta = {
            "table": name,
            "fingerprint": fingerprints[name],
            "config": configs[name].to_dict(),
            "stats": result.stats.to_dict(),
            "rank": rank,
        }
        save_artifact(uri, {"codes": result.codes, "codebooks": result.codebooks}, meta,
                      ARTIFACT_KIND)
        if g_pathmgr.exists(checkpoint):
            g_pathmgr.rm(checkpoint)
        del weight, counts

    if distributed:
        dist.barrier()
    return {
        name: (load_quantized_table(artifact_uri(out_dir, name), fingerprints.get(name))
               if name in compressed else None)
        for name in tables
    }
