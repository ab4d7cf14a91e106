"""Stage 2: the MEC quantizer on every table with at least ``min_rows`` rows."""
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, NamedTuple

import torch

from torchrec_mec.artifacts import load_artifact, save_artifact
from torchrec_mec.pipeline.outputs import COUNTS_FILE, COUNTS_KIND, TABLES_FILE, TABLES_KIND
from torchrec_mec.pipeline.parallel import barrier, init_distributed
from torchrec_mec.pipeline.settings import Settings
from torchrec_mec.quantize import quantize_tables

logger = logging.getLogger(__name__)

COMPRESSED_FILE = "compressed.mec"
COMPRESSED_KIND = "mec_compressed_tables"


class CompressedTable(NamedTuple):
    """One table as stage 2 left it.

    Args:
        codes (Tensor): [rows, M], uint8 or uint16.
        codebooks (Tensor): [M, K, D / M] float32.
        stats (Dict[str, Any]): the quantizer's statistics (``QuantizeStats.to_dict()``).

    Example::

        >>> t = CompressedTable(torch.zeros(10, 4, dtype=torch.uint8), torch.zeros(4, 16, 2), {})
        >>> t.codebooks.shape[:2]  # M, K
        torch.Size([4, 16])
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    stats: Dict[str, Any]


def compress(
    pretrain_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Stage 2: product-quantizes every pre-trained table of at least ``compress.min_rows`` rows
    with MEC (row weights from stage 1's id counts), or with plain k-means PQ
    (``compress.method="kmeans_pq"``); the others stay full.

    Runs ``torchrec_mec.quantize.quantize_tables``: tables are spread over the ranks of a
    torchrun job; each table's quantizer checkpoints every epoch and a finished table (its
    artifact under ``out_dir/tables/``) is not redone, so a killed run resumes.

    Args:
        pretrain_dir (str): stage 1's folder (``tables.mec``, ``counts.mec``).
        out_dir (str): where the outputs go (``DIR/compress`` in a run).
        settings (Settings): uses ``compress``.
        force (bool): quantize every table again, dropping finished tables and checkpoints.
        progress (bool): show progress bars.

    Returns:
        str: the URI of ``compressed.mec`` (``<table>.codes``, ``<table>.codebooks``; metadata
        ``tables`` with each compressed table's quantizer statistics).

    Raises:
        ArtifactError: stage 1's files missing or corrupted (names the file).
    """
    ctx = init_distributed()
    out_uri = os.path.join(out_dir, COMPRESSED_FILE)
    tables_uri = os.path.join(pretrain_dir, TABLES_FILE)
    counts_uri = os.path.join(pretrain_dir, COUNTS_FILE)
    tensors, _ = load_artifact(tables_uri, expect_kind=TABLES_KIND)
    counts, _ = load_artifact(counts_uri, expect_kind=COUNTS_KIND)
    weights = {k[len("embedding_bags."):-len(".weight")]: v for k, v in tensors.items()
               if k.startswith("embedding_bags.") and k.endswith(".weight")}
    all_tables = {t: (w, counts[t]) for t, w in weights.items()}
    results = quantize_tables(all_tables, settings.compress.config,
                              os.path.join(out_dir, "tables"), min_rows=settings.compress.min_rows,
                              overwrite=force, progress=progress and ctx.is_main)
    compressed = {t: r for t, r in results.items() if r is not None}
    if ctx.is_main:
        logger.info("compress: %d of %d tables have >= %d rows and are compressed: %s",
                    len(compressed), len(weights), settings.compress.min_rows, sorted(compressed))
        out_tensors: Dict[str, torch.Tensor] = {}
        for t, r in compressed.items():
            out_tensors[f"{t}.codes"] = r.codes
            out_tensors[f"{t}.codebooks"] = r.codebooks
        meta = {"settings": asdict(settings.compress),
                "tables": {t: r.stats.to_dict() for t, r in compressed.items()},
                "full_tables": sorted(set(weights) - set(compressed))}
        save_artifact(out_uri, out_tensors, meta, COMPRESSED_KIND)
    barrier(ctx)
    return out_uri


def load_compressed(compress_dir: str) -> Dict[str, CompressedTable]:
    """Stage 2's codes, codebooks and statistics per compressed table.

    Raises:
        ArtifactError: ``compressed.mec`` missing or corrupted (names the file).
    """
    tensors, meta = load_artifact(os.path.join(compress_dir, COMPRESSED_FILE),
                                  expect_kind=COMPRESSED_KIND)
    return {t: CompressedTable(tensors[f"{t}.codes"], tensors[f"{t}.codebooks"], stats)
            for t, stats in meta["tables"].items()}
