"""Stage 2: the MEC quantizer on every table with at least ``min_rows`` rows."""
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, Iterator, Mapping, MutableMapping, NamedTuple, Optional, Set, Tuple

import torch
from iopath.common.file_io import g_pathmgr

from torchrec_mec.artifacts import load_artifact, save_artifact
from torchrec_mec.pipeline.outputs import (
    COUNTS_FILE,
    COUNTS_KIND,
    TABLES_DIR,
    TABLES_KIND,
    TABLES_MANIFEST,
    fingerprint,
)
from torchrec_mec.pipeline.parallel import DistContext, barrier, init_distributed, run_on_main
from torchrec_mec.pipeline.state_dirs import (
    ONE_PROCESS,
    load_state,
    save_state,
    state_shapes,
    verify_state,
)
from torchrec_mec.pipeline.settings import Settings
from torchrec_mec.quantize import quantize_tables
from torchrec_mec.quantize.budget import EstimateMemo, TableOption, check_ratio, plan_tables

logger = logging.getLogger(__name__)

COMPRESSED_FILE = "compressed.mec"
COMPRESSED_KIND = "mec_compressed_tables"
CODES_DIR = "codes/"
CODES_KIND = "mec_codes"
PLAN_FILE = "plan.mec"
PLAN_KIND = "mec_compress_plan"


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
    estimates: Optional[MutableMapping[str, EstimateMemo]] = None,
) -> str:
    """Stage 2: product-quantizes the pre-trained tables with MEC (row weights from stage 1's
    id counts), or with plain k-means PQ (``compress.method="kmeans_pq"``); the others stay
    full. Which tables, and their M and K: with ``compress.target_ratio``, the budget
    allocator decides (``torchrec_mec.quantize.budget.plan_tables``, on rank 0, its plan saved
    as ``plan.mec`` and reused on rerun for the same tables, ratio, codebook sizes, weighting and
    seed, whatever the quantizer's training settings); otherwise every table of at least
    ``compress.min_rows`` rows, with the quantizer's M and K.

    Runs ``torchrec_mec.quantize.quantize_tables``: tables are spread over the ranks of a
    torchrun job, and a rank reads a table from stage 1's state directory only when it
    quantizes it (one at a time); each table's quantizer checkpoints every epoch and a finished
    table (its artifact under ``out_dir/tables/``) is not redone, so a killed run resumes.

    Args:
        pretrain_dir (str): stage 1's folder (``tables/``, ``counts.mec``).
        out_dir (str): where the outputs go (``DIR/compress`` in a run).
        settings (Settings): uses ``compress``.
        force (bool): quantize every table again, dropping finished tables and checkpoints.
        progress (bool): show progress bars.
        estimates (Optional[MutableMapping[str, EstimateMemo]]): the allocator's error
            estimates kept across calls (``mec compare``'s cells), per digest of stage 1's
            tables and counts: a plan of the same tables, weighting and seed reuses them.

    Returns:
        str: the URI of ``compressed.mec`` (metadata: ``tables`` with each compressed table's
        quantizer statistics, ``plan`` with the allocator's choice per table, or None without
        a target ratio, ``table_weights`` the allocator's weight per table, or None for
        uniform ones); the codes and codebooks are the state directory ``codes/``
        (``embedding_bags.<table>.codes``, ``embedding_bags.<table>.codebooks``), which stage 3
        loads into its shards.

    Raises:
        ArtifactError: stage 1's files missing or corrupted (names the file).
        BudgetError: ``compress.target_ratio`` cannot be reached (names the smallest ratio
            that can), raised on every rank before any work.
    """
    ctx = init_distributed()
    out_uri = os.path.join(out_dir, COMPRESSED_FILE)
    tables_uri = os.path.join(pretrain_dir, TABLES_DIR)
    counts_uri = os.path.join(pretrain_dir, COUNTS_FILE)
    run_on_main(lambda: verify_state(tables_uri, TABLES_KIND), ctx)  # every shard file, once
    counts, counts_meta = load_artifact(counts_uri, expect_kind=COUNTS_KIND)
    all_tables = TablesOnDisk(tables_uri, counts)
    weights = all_tables.shapes
    plan, table_weights = None, None
    if settings.compress.target_ratio is not None:
        # The plan's key: what it depends on (plan_tables reads the quantizer's weighting and
        # seed, not its training settings), so a stale plan is never reused.
        c = settings.compress
        key = fingerprint({"target_ratio": c.target_ratio, "codebook_sizes": c.codebook_sizes,
                           "weighting": c.config.weighting, "seed": c.config.seed,
                           "table_weights": c.table_weights},
                          os.path.join(pretrain_dir, TABLES_MANIFEST), counts_uri)
        memo = None if estimates is None else estimates.setdefault(
            fingerprint(None, os.path.join(pretrain_dir, TABLES_MANIFEST), counts_uri), {})
        table_weights = _table_weights(c.table_weights, counts_meta, counts_uri, set(weights))
        plan = _plan(all_tables, settings, os.path.join(out_dir, PLAN_FILE), key, ctx,
                     force=force, progress=progress, memo=memo, table_weights=table_weights)
    results = quantize_tables(all_tables, settings.compress.config,
                              os.path.join(out_dir, "tables"), min_rows=settings.compress.min_rows,
                              overwrite=force, progress=progress and ctx.is_main,
                              num_rows={t: shape[0] for t, shape in weights.items()},
                              shapes=None if plan is None else {
                                  t: (o.num_subspaces, o.codebook_size) if o.compressed else None
                                  for t, o in plan.items()})
    compressed = {t: r for t, r in results.items() if r is not None}
    if ctx.is_main:
        rule = (f"the plan for {settings.compress.target_ratio:g}x" if plan is not None
                else f">= {settings.compress.min_rows} rows")
        logger.info("compress: %d of %d tables compressed (%s): %s", len(compressed),
                    len(weights), rule, sorted(compressed))
        codes: Dict[str, torch.Tensor] = {}
        for t, r in compressed.items():
            codes[f"embedding_bags.{t}.codes"] = r.codes
            codes[f"embedding_bags.{t}.codebooks"] = r.codebooks
        save_state(os.path.join(out_dir, CODES_DIR), codes, ONE_PROCESS, CODES_KIND, {})
        meta = {"settings": asdict(settings.compress),
                "tables": {t: r.stats.to_dict() for t, r in compressed.items()},
                "plan": None if plan is None else {t: asdict(o) for t, o in plan.items()},
                "table_weights": table_weights,
                "full_tables": sorted(set(weights) - set(compressed))}
        save_artifact(out_uri, {}, meta, COMPRESSED_KIND)
    barrier(ctx)
    return out_uri


def _plan(
    tables: "TablesOnDisk",
    settings: Settings,
    uri: str,
    key: str,
    ctx: DistContext,
    *,
    force: bool,
    progress: bool,
    memo: Optional[EstimateMemo],
    table_weights: Optional[Dict[str, float]],
) -> Dict[str, TableOption]:
    """The budget plan: checked for reachability on every rank (so all fail alike), estimated
    and saved on rank 0 (with ``memo``'s estimates, see ``plan_tables``), read by all; a saved
    plan for the same inputs and settings is reused."""
    s = settings.compress
    assert s.target_ratio is not None  # a plan is made only for a target ratio
    sizes = {t: (shape[0], shape[1]) for t, shape in tables.shapes.items()}
    check_ratio(sizes, s.target_ratio, s.codebook_sizes)
    if ctx.is_main and (force or not g_pathmgr.exists(uri)
                        or load_artifact(uri, expect_kind=PLAN_KIND)[1]["fingerprint"] != key):
        known = 0 if memo is None else len(memo)
        plan = plan_tables(tables, s.config, s.target_ratio, codebook_sizes=s.codebook_sizes,
                           progress=progress, sizes=sizes, memo=memo, table_weights=table_weights)
        if memo is not None:
            logger.info("plan: %d error estimates made, %d known from earlier plans",
                        len(memo) - known, known)
        save_artifact(uri, {}, {"fingerprint": key, "table_weights": table_weights,
                                "plan": {t: asdict(o) for t, o in plan.items()}}, PLAN_KIND)
    barrier(ctx)
    _, meta = load_artifact(uri, expect_kind=PLAN_KIND)
    plan = {t: TableOption(**o) for t, o in meta["plan"].items()}
    if ctx.is_main:
        weights = meta.get("table_weights") or {}
        for t, o in sorted(plan.items(), key=lambda kv: -kv[1].bytes):
            shape = f"M={o.num_subspaces} K={o.codebook_size}" if o.compressed else "full"
            logger.info("plan: %s %s, %d B, estimated error %.4g, table weight %.4g", t, shape,
                        o.bytes, o.error, weights.get(t, 1.0))
    return plan


def _table_weights(rule: str, counts_meta: Mapping[str, Any], counts_uri: str,
                   tables: Set[str]) -> Optional[Dict[str, float]]:
    """The budget allocator's table weights for ``compress.table_weights``: None for
    ``"uniform"``; for ``"sensitivity"``, stage 1's measurement from the metadata of
    ``counts.mec`` (None, with a warning, for a pre-training made before it was measured)."""
    if rule == "uniform":
        return None
    sensitivity = counts_meta.get("sensitivity")
    if sensitivity is None:
        logger.warning("compress: %s holds no table sensitivity (a pre-training made before "
                       "it was measured): the budget weighs every table alike "
                       "(compress.table_weights=uniform); run pretrain again for %r",
                       counts_uri, rule)
        return None
    missing = sorted(tables - set(sensitivity))
    if missing:
        raise ValueError(f"{counts_uri}: no sensitivity for tables {missing}")
    return {t: float(sensitivity[t]) for t in sorted(tables)}


class TablesOnDisk(Mapping[str, Tuple[torch.Tensor, torch.Tensor]]):
    """Stage 1's tables as ``name -> (weight, counts)``, each weight read from the state
    directory when it is asked for (this rank alone; nothing is kept), so a rank holds only the
    table it works on.

    Args:
        uri (str): the state directory of the tables (``pretrain/tables/``), already verified.
        counts (Mapping[str, Tensor]): per table, its ids' occurrences (``counts.mec``).

    Example::

        >>> import tempfile
        >>> d = os.path.join(tempfile.mkdtemp(), "tables")
        >>> save_state(d, {"embedding_bags.t_C1.weight": torch.ones(3, 2)}, ONE_PROCESS,
        ...            TABLES_KIND, {})
        >>> tables = TablesOnDisk(d, {"t_C1": torch.tensor([1, 0, 2])})
        >>> tables.shapes, tables["t_C1"][0].sum().item()
        ({'t_C1': (3, 2)}, 6.0)
    """

    def __init__(self, uri: str, counts: Mapping[str, torch.Tensor]):
        self.uri = uri
        self.counts = counts
        saved = state_shapes(uri)
        self._entries = {k[len("embedding_bags."):-len(".weight")]: (k, dtype)
                         for k, (_, dtype) in saved.items()
                         if k.startswith("embedding_bags.") and k.endswith(".weight")}
        self.shapes: Dict[str, Tuple[int, ...]] = {t: saved[k][0]
                                                   for t, (k, _) in self._entries.items()}

    def __getitem__(self, table: str) -> Tuple[torch.Tensor, torch.Tensor]:
        key, dtype = self._entries[table]
        weight = torch.empty(self.shapes[table], dtype=dtype)
        load_state(self.uri, {key: weight}, ONE_PROCESS, TABLES_KIND, verify=False)
        return weight, self.counts[table]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load_compressed(compress_dir: str) -> Dict[str, CompressedTable]:
    """Stage 2's codes, codebooks and statistics per compressed table (all in memory: for
    inspection and small models; stage 3 reads ``codes/`` shard by shard).

    Raises:
        ArtifactError: ``compressed.mec`` or ``codes/`` missing or corrupted (names it).
    """
    _, meta = load_artifact(os.path.join(compress_dir, COMPRESSED_FILE),
                            expect_kind=COMPRESSED_KIND)
    uri = os.path.join(compress_dir, CODES_DIR)
    shapes = state_shapes(uri) if meta["tables"] else {}
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    if tensors:
        load_state(uri, tensors, ONE_PROCESS, CODES_KIND)
    return {t: CompressedTable(tensors[f"embedding_bags.{t}.codes"],
                               tensors[f"embedding_bags.{t}.codebooks"], stats)
            for t, stats in meta["tables"].items()}
