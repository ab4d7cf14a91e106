"""Stage 3: the same model with a QuantizedEmbeddingBagCollection, trained on frozen codes."""
import math
import os
from dataclasses import asdict
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from torchrec_mec.pipeline.prepare import open_dataset
from torchrec_mec.models import CTRModel, build_model
from torchrec_mec.pipeline.compress import (
    CODES_DIR,
    CODES_KIND,
    COMPRESSED_FILE,
    COMPRESSED_KIND,
    load_compressed,
)
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.pipeline.outputs import (
    CHECKPOINT_DIR,
    COUNTS_FILE,
    COUNTS_KIND,
    EMBEDDING_PREFIX,
    META,
    MODEL_FILE,
    MODEL_KIND,
    TABLES_DIR,
    TABLES_KIND,
    TABLES_MANIFEST,
    fingerprint,
    load_for_inference,
    load_model,
    model_skeleton,
    architecture,
    build_from_architecture,
    save_model,
)
from torchrec_mec.pipeline.parallel import DistContext, barrier, init_distributed
from torchrec_mec.pipeline.settings import NewIdSettings, Settings
from torchrec_mec.pipeline.state_dirs import MANIFEST, load_state, state_shapes
from torchrec_mec.pipeline.training import Restore, drop_checkpoint, remove_checkpoint, train_model


class FinetuneOutput(NamedTuple):
    """Stage 3's files: ``model.mec`` (dense arch, architecture, history) and ``tables/``
    (the QEBC state: codes, codebooks, full small tables; a state directory).

    Example::

        >>> FinetuneOutput("r/finetune/model.mec", "r/finetune/tables/").tables_uri
        'r/finetune/tables/'
    """

    model_uri: str
    tables_uri: str


def new_id_tables(counts: Mapping[str, torch.Tensor], compressed: Mapping[str, Any],
                  settings: NewIdSettings) -> Dict[str, Dict[str, int]]:
    """Per compressed table with new ids, its new-id settings for ``build_model``: the coded
    ids are those up to the last id of the training split (``counts``: its occurrences per
    id); the ids after them are new (ids are numbered in order of appearance).

    Example::

        >>> new_id_tables({"t_C1": torch.tensor([0, 5, 0, 2, 0, 0, 0, 0])}, {"t_C1": None},
        ...               NewIdSettings(fallback_fraction=0.5, promotion_fraction=0.25))
        {'t_C1': {'coded_rows': 4, 'fallback_rows': 2, 'promotion_slots': 1}}
    """
    if not settings.fallback_fraction:
        return {}
    tables = {}
    for t in compressed:
        seen = counts[t].nonzero()
        coded = max(int(seen[-1]) + 1 if seen.numel() else 1, 1)
        new = counts[t].numel() - coded
        if new:
            tables[t] = {"coded_rows": coded,
                         "fallback_rows": math.ceil(settings.fallback_fraction * coded),
                         "promotion_slots": min(new, math.ceil(settings.promotion_fraction * coded))}
    return tables


def compressed_model(pretrain_dir: str, compress_dir: str,
                     new_ids: NewIdSettings = NewIdSettings()) -> CTRModel:
    """The pre-trained model with its embedding collection swapped for a QEBC: codes and
    codebooks from stage 2 for the compressed tables, the trained weights for the others, and
    the trained dense, interaction and over arch. With ``new_ids.fallback_fraction``, each
    compressed table with ids after those of the training split (:func:`new_id_tables`) gets
    a fallback table for them (initial values from its config's ``init_fn``).

    Raises:
        ArtifactError: an input file missing or corrupted (names it).
    """
    baseline, _ = load_model(pretrain_dir)
    compressed = load_compressed(compress_dir)
    counts, _ = load_artifact(os.path.join(pretrain_dir, COUNTS_FILE), expect_kind=COUNTS_KIND)
    fallbacks = new_id_tables(counts, compressed, new_ids)
    ebc = baseline.embedding_bag_collection
    model = build_model(baseline.config, baseline.num_dense,
                        [f for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names],
                        {f: cfg.num_embeddings for cfg in ebc.embedding_bag_configs()
                         for f in cfg.feature_names},
                        compressed={t: (c.codebooks.shape[0], c.codebooks.shape[1])
                                    for t, c in compressed.items()},
                        new_ids=fallbacks)
    replaced = {f"{EMBEDDING_PREFIX}embedding_bags.{t}.weight" for t in compressed}
    state = {k: v for k, v in baseline.state_dict().items() if k not in replaced}
    qebc = model.embedding_bag_collection
    for t, c in compressed.items():
        codes = c.codes
        if t in fallbacks:  # stage 2's codes of the coded ids, then the promotion slots' rows
            codes = torch.cat([codes[: fallbacks[t]["coded_rows"]],
                               qebc.embedding_bags[t].codes[fallbacks[t]["coded_rows"]:]])
        state[f"{EMBEDDING_PREFIX}embedding_bags.{t}.codes"] = codes
        state[f"{EMBEDDING_PREFIX}embedding_bags.{t}.codebooks"] = c.codebooks
    state.update({k: v for k, v in model.state_dict().items()
                  if k.endswith((".fallback", ".promoted_ids"))})
    model.load_state_dict(state, strict=True)
    return model


def sharded_start(pretrain_dir: str, compress_dir: str) -> Tuple[CTRModel, Restore]:
    """The compressed model with its embedding collection on ``meta``, and the ``restore`` that
    fills it once sharded (or materialised in one process), each rank reading only its shards:
    codes and codebooks from stage 2's ``codes/``, the full tables from stage 1's ``tables/``,
    and the dense, interaction and over arch from stage 1's ``model.mec``.

    Raises:
        ArtifactError: an input missing or corrupted (names it).
    """
    dense, meta = load_artifact(os.path.join(pretrain_dir, MODEL_FILE), expect_kind=MODEL_KIND)
    _, stage2 = load_artifact(os.path.join(compress_dir, COMPRESSED_FILE),
                              expect_kind=COMPRESSED_KIND)
    saved = state_shapes(os.path.join(compress_dir, CODES_DIR)) if stage2["tables"] else {}
    shapes = {t: list(saved[f"embedding_bags.{t}.codebooks"][0][:2]) for t in stage2["tables"]}
    model = build_from_architecture({**meta["architecture"], "compressed": shapes}, META)

    def restore(runner: nn.Module, ctx: DistContext) -> None:
        state = runner.state_dict()
        with torch.no_grad():
            for key, value in dense.items():
                state[key].copy_(value)
        prefix = EMBEDDING_PREFIX
        tables = {k: v for k, v in state.items() if k.startswith(prefix)}
        full = {k[len(prefix):]: v for k, v in tables.items() if k.endswith(".weight")}
        codes = {k[len(prefix):]: v for k, v in tables.items() if not k.endswith(".weight")}
        load_state(os.path.join(pretrain_dir, TABLES_DIR), full, ctx, TABLES_KIND)
        if codes:
            load_state(os.path.join(compress_dir, CODES_DIR), codes, ctx, CODES_KIND)
        runner.load_state_dict(state)  # parts of a state dict may be copies, not views

    return model, restore


def finetune(
    data_dir: str,
    pretrain_dir: str,
    compress_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> FinetuneOutput:
    """Stage 3: trains the compressed model (codes frozen; codebooks, full tables and the dense
    parts trained), starting from the pre-trained model and stage 2's codebooks. With
    ``finetune.distill_weight``, the pre-trained model is the teacher: the targets mix its
    predicted probabilities with the labels (``training.distillation_targets``).

    Runs in one process or data-parallel under torchrun (``DistributedModelParallel`` with the
    QEBC sharder), each rank loading and saving only its shards (:func:`sharded_start`; a model
    with fallback tables for new ids is built whole first, :func:`compressed_model`); resumes
    from ``out_dir/checkpoint/`` under any number of processes.

    Args:
        data_dir (str): the prepared data set.
        pretrain_dir (str): stage 1's folder.
        compress_dir (str): stage 2's folder.
        out_dir (str): where the outputs go (``DIR/finetune`` in a run).
        settings (Settings): uses ``finetune`` and ``evaluate.batch_size``.
        force (bool): start from scratch, dropping a checkpoint.
        progress (bool): show progress bars.

    Returns:
        FinetuneOutput: the files' URIs.

    Raises:
        ArtifactError: an input missing or corrupted, or a corrupted checkpoint (names the file).
    """
    ctx = init_distributed()
    out = FinetuneOutput(os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, TABLES_DIR))
    checkpoint = os.path.join(out_dir, CHECKPOINT_DIR)
    scope = {"finetune": settings.finetune, "eval_batch_size": settings.evaluate.batch_size,
             "new_ids": settings.new_ids}
    want = fingerprint(scope, os.path.join(data_dir, "manifest.json"),
                       os.path.join(pretrain_dir, MODEL_FILE),
                       os.path.join(pretrain_dir, TABLES_MANIFEST),
                       os.path.join(pretrain_dir, COUNTS_FILE),
                       os.path.join(compress_dir, COMPRESSED_FILE),
                       os.path.join(compress_dir, CODES_DIR, MANIFEST))
    if force:
        drop_checkpoint(checkpoint, ctx)
    dataset = open_dataset(data_dir)
    restore: Optional[Restore] = None
    if settings.new_ids.fallback_fraction:
        model = compressed_model(pretrain_dir, compress_dir, settings.new_ids)
    else:
        model, restore = sharded_start(pretrain_dir, compress_dir)
    torch.manual_seed(settings.finetune.seed)
    arch = architecture(model)  # before DMP shards the model in place
    # The teacher loads as evaluate loads a model: under torchrun each rank holds its shards.
    teacher = (load_for_inference(model_skeleton(pretrain_dir)[0], pretrain_dir, ctx)
               if settings.finetune.distill_weight else None)
    result = train_model(model, dataset, settings.finetune, ctx=ctx, checkpoint_uri=checkpoint,
                         fingerprint=want, eval_batch_size=settings.evaluate.batch_size,
                         restore=restore, desc="finetune", progress=progress, teacher=teacher,
                         distill_weight=settings.finetune.distill_weight)
    save_model(out_dir, result.model.state_dict(), arch,
               {"stage": "finetune", "world_size": ctx.world_size,
                "history": result.history.to_dict(),
                "settings": {"finetune": asdict(settings.finetune)}}, ctx)
    if ctx.is_main:
        remove_checkpoint(checkpoint)
    barrier(ctx)
    return out
