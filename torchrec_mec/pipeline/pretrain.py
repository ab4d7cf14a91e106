"""Stage 1: train the CTR model with full tables and count the popularity of every id."""
import os
from dataclasses import asdict
from typing import NamedTuple

import torch

from torchrec_mec.artifacts import save_artifact
from torchrec_mec.data import EncodedDataset
from torchrec_mec.models import build_model, table_name
from torchrec_mec.pipeline.outputs import (
    CHECKPOINT_FILE,
    COUNTS_FILE,
    COUNTS_KIND,
    MODEL_FILE,
    TABLES_FILE,
    architecture,
    fingerprint,
    save_model,
)
from torchrec_mec.pipeline.parallel import barrier, init_distributed
from torchrec_mec.pipeline.settings import Settings
from torchrec_mec.pipeline.training import drop_checkpoint, remove_checkpoint, train_model


class PretrainOutput(NamedTuple):
    """Stage 1's files.

    Args:
        model_uri (str): ``model.mec``: dense arch state, architecture, training history.
        tables_uri (str): ``tables.mec``: the trained tables (``embedding_bags.<t>.weight``).
        counts_uri (str): ``counts.mec``: per table, int64 [rows] occurrences of each id in the
            training split.

    Example::

        >>> PretrainOutput("r/pretrain/model.mec", "r/pretrain/tables.mec",
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
    each rank reading its slice of every global batch). Resumes from ``out_dir/checkpoint.mec``
    if a run with the same inputs and settings was interrupted. Whether the stage needs to run
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
                           for f in (MODEL_FILE, TABLES_FILE, COUNTS_FILE)))
    checkpoint = os.path.join(out_dir, CHECKPOINT_FILE)
    dataset = EncodedDataset(data_dir)
    scope = {"model": settings.model, "pretrain": settings.pretrain,
             "eval_batch_size": settings.evaluate.batch_size}
    want = fingerprint(scope, os.path.join(data_dir, "manifest.json"))
    if force:
        drop_checkpoint(checkpoint, ctx)
    schema = dataset.schema
    torch.manual_seed(settings.pretrain.seed)
    model = build_model(settings.model, schema.num_dense, schema.sparse_names,
                        dataset.num_embeddings)
    arch = architecture(model)  # before DMP shards the model in place
    result = train_model(model, dataset, settings.pretrain, ctx=ctx, checkpoint_uri=checkpoint,
                         fingerprint=want, eval_batch_size=settings.evaluate.batch_size,
                         desc="pretrain", progress=progress, start_competes=False)
    if ctx.is_main:
        assert result.state is not None
        counts = {table_name(f): c for f, c in dataset.id_counts("train").items()}
        save_artifact(out.counts_uri, counts, {"split": "train"}, COUNTS_KIND)
        save_model(out_dir, result.state, arch,
                   {"stage": "pretrain", "world_size": ctx.world_size,
                    "history": result.history.to_dict(),
                    "settings": {"model": asdict(settings.model),
                                 "pretrain": asdict(settings.pretrain)}})
        remove_checkpoint(checkpoint)
    barrier(ctx)
    return out
