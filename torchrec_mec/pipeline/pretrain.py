"""Stage 1: train the CTR model with full tables and count the popularity of every id.

The tables start from :func:`initial_rows`, a function of the seed, the table and the row block,
so each rank draws only the rows it holds and every world size starts from the same state: no
rank allocates a whole table it does not hold.
"""
import os
import zlib
from dataclasses import asdict
from typing import Dict, NamedTuple, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mec.artifacts import save_artifact
from torchrec_mec.pipeline.prepare import open_dataset
from torchrec_mec.models import build_model, table_name
from torchrec_mec.pipeline.outputs import (
    CHECKPOINT_DIR,
    COUNTS_FILE,
    COUNTS_KIND,
    EMBEDDING_PREFIX,
    META,
    MODEL_FILE,
    TABLES_DIR,
    architecture,
    fingerprint,
    save_model,
)
from torchrec_mec.pipeline.parallel import DistContext, barrier, init_distributed
from torchrec_mec.pipeline.sensitivity import table_sensitivity
from torchrec_mec.pipeline.settings import Settings
from torchrec_mec.pipeline.training import drop_checkpoint, remove_checkpoint, train_model

INIT_BLOCK_ROWS = 1 << 16
"""Rows drawn from one generator by :func:`initial_rows`."""


class PretrainOutput(NamedTuple):
    """Stage 1's files.

    Args:
        model_uri (str): ``model.mec``: dense arch state, architecture, training history.
        tables_uri (str): ``tables/``: the trained tables (``embedding_bags.<t>.weight``), a
            state directory.
        counts_uri (str): ``counts.mec``: per table, int64 [rows] occurrences of each id in the
            training split; its metadata ``sensitivity`` holds the trained model's
            sensitivity to each table (``torchrec_mec.pipeline.sensitivity``).

    Example::

        >>> PretrainOutput("r/pretrain/model.mec", "r/pretrain/tables/",
        ...                "r/pretrain/counts.mec").counts_uri
        'r/pretrain/counts.mec'
    """

    model_uri: str
    tables_uri: str
    counts_uri: str


def pretrain(
    data_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> PretrainOutput:
    """Stage 1: trains ``settings.model`` on the prepared data set with full embedding tables.

    Runs in one process, or data-parallel over a torchrun job (``DistributedModelParallel``,
    each rank reading its slice of every global batch, each rank initialising and saving only
    the shards it holds). Resumes from ``out_dir/checkpoint/`` if a run with the same inputs and
    settings was interrupted, under any number of processes. Whether the stage needs to run
    at all is the runner's decision (``pipeline.runner``): called directly, it always trains.

    Args:
        data_dir (str): a folder written by ``torchrec_mec.data.prepare_dataset``.
        out_dir (str): where the outputs go (``DIR/pretrain`` in a run).
        settings (Settings): uses ``model``, ``pretrain`` and ``evaluate.batch_size``.
        force (bool): start from scratch, dropping a checkpoint.
        progress (bool): show progress bars.

    Returns:
        PretrainOutput: the three files' URIs.

    Raises:
        FileNotFoundError: ``data_dir`` holds no prepared data set (names its manifest).
        ArtifactError: a corrupted checkpoint or output (names the file).
    """
    ctx = init_distributed()
    out = PretrainOutput(*(os.path.join(out_dir, f)
                           for f in (MODEL_FILE, TABLES_DIR, COUNTS_FILE)))
    checkpoint = os.path.join(out_dir, CHECKPOINT_DIR)
    dataset = open_dataset(data_dir)
    scope = {"model": settings.model, "pretrain": settings.pretrain,
             "eval_batch_size": settings.evaluate.batch_size}
    want = fingerprint(scope, os.path.join(data_dir, "manifest.json"))
    if force:
        drop_checkpoint(checkpoint, ctx)
    schema = dataset.schema
    torch.manual_seed(settings.pretrain.seed)
    model = build_model(settings.model, schema.num_dense, schema.sparse_names,
                        dataset.num_embeddings, tables_device=META)
    arch = architecture(model)  # before DMP shards the model in place
    bounds = {cfg.name: (cfg.get_weight_init_min(), cfg.get_weight_init_max())
              for cfg in model.embedding_bag_collection.embedding_bag_configs()}

    def restore(runner: nn.Module, _: DistContext) -> None:
        init_tables(runner, bounds, settings.pretrain.seed)

    result = train_model(model, dataset, settings.pretrain, ctx=ctx, checkpoint_uri=checkpoint,
                         fingerprint=want, eval_batch_size=settings.evaluate.batch_size,
                         restore=restore, desc="pretrain", progress=progress,
                         start_competes=False)
    sensitivity = table_sensitivity(result.model, dataset, ctx, seed=settings.pretrain.seed)
    if ctx.is_main:
        counts = {table_name(f): c for f, c in dataset.id_counts("train").items()}
        save_artifact(out.counts_uri, counts, {"split": "train", "sensitivity": sensitivity},
                      COUNTS_KIND)
    save_model(out_dir, result.model.state_dict(), arch,
               {"stage": "pretrain", "world_size": ctx.world_size,
                "history": result.history.to_dict(),
                "settings": {"model": asdict(settings.model),
                             "pretrain": asdict(settings.pretrain)}}, ctx)
    if ctx.is_main:
        remove_checkpoint(checkpoint)
    barrier(ctx)
    return out


def initial_rows(table: str, num_rows: int, dim: int, bounds: Tuple[float, float], seed: int,
                 rows: slice) -> torch.Tensor:
    """Rows ``rows`` of table ``table``'s initial weights: uniform in ``bounds``, drawn in blocks
    of :data:`INIT_BLOCK_ROWS` rows, each from a generator seeded by (seed, table, block), so
    any range of rows is the same whoever draws it.

    Example::

        >>> whole = initial_rows("t", 100_000, 4, (-0.1, 0.1), 0, slice(0, 100_000))
        >>> torch.equal(initial_rows("t", 100_000, 4, (-0.1, 0.1), 0, slice(70_000, 70_010)),
        ...             whole[70_000:70_010])
        True
    """
    start, stop, _ = rows.indices(num_rows)
    out = torch.empty(max(stop - start, 0), dim)
    _fill_rows(out, table, num_rows, dim, bounds, seed, start, 0)
    return out


def _fill_rows(out: torch.Tensor, table: str, num_rows: int, dim: int,
               bounds: Tuple[float, float], seed: int, row: int, col: int) -> None:
    """Writes :func:`initial_rows` of rows ``row:row + len(out)``, columns
    ``col:col + out.shape[1]`` into ``out``, one block of rows at a time."""
    stop = row + out.shape[0]
    for block in range(row // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        first = block * INIT_BLOCK_ROWS
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{table}:{block}".encode()))
        values = torch.empty(min(INIT_BLOCK_ROWS, num_rows - first), dim).uniform_(
            *bounds, generator=g)
        lo, hi = max(row, first), min(stop, first + values.shape[0])
        out[lo - row:hi - row] = values[lo - first:hi - first, col:col + out.shape[1]]


def init_tables(model: nn.Module, bounds: Dict[str, Tuple[float, float]], seed: int) -> None:
    """Gives every table of ``model`` (plain, or sharded by ``DistributedModelParallel``: each
    rank fills the rows and columns it holds) its :func:`initial_rows`."""
    state = model.state_dict()
    with torch.no_grad():
        for table, b in bounds.items():
            value = state[f"{EMBEDDING_PREFIX}embedding_bags.{table}.weight"]
            if isinstance(value, ShardedTensor):
                num_rows, dim = value.size()
                for shard in value.local_shards():
                    row, col = shard.metadata.shard_offsets
                    _fill_rows(shard.tensor, table, num_rows, dim, b, seed, row, col)
            else:
                _fill_rows(value, table, value.shape[0], value.shape[1], b, seed, 0, 0)
    model.load_state_dict(state)  # parts of a state dict may be copies, not views
