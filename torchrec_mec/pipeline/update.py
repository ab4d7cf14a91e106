"""``mec update``: new ids after compression get codes of their own, without rerunning stage 2.

The fine-tuned model's compressed tables serve ids first seen after compression from hashed
fallback tables (``new_ids`` settings, docs/new_ids.md). This stage trains that model on the
traffic since compression (``update.split``), during which the fallback rows learn, then
promotes every new id seen at least ``update.min_count`` times there (most frequent first,
while promotion slots last): its fallback row is encoded with the table's frozen codebooks
(``torchrec_mec.quantize.promote_frequent``), and it reads those codes from then on.
"""
import os
from dataclasses import asdict
from typing import Any, Dict, NamedTuple

import torch

from torchrec_mec.artifacts import save_artifact
from torchrec_mec.pipeline.prepare import open_dataset
from torchrec_mec.models import table_name
from torchrec_mec.modules import ProductQuantizedTable
from torchrec_mec.pipeline.outputs import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    TABLES_DIR,
    TABLES_MANIFEST,
    architecture,
    fingerprint,
    load_model,
    save_model,
)
from torchrec_mec.pipeline.parallel import barrier, init_distributed
from torchrec_mec.pipeline.settings import Settings
from torchrec_mec.pipeline.training import drop_checkpoint, remove_checkpoint, train_model
from torchrec_mec.quantize import promote_frequent

PROMOTED_FILE, PROMOTED_KIND = "promoted.mec", "mec_promoted_ids"


class UpdateOutput(NamedTuple):
    """``mec update``'s files: the updated model (``model.mec``, ``tables/``, as stage 3
    writes them) and ``promoted.mec`` (per table, the ids promoted now; its metadata the
    traffic figures).

    Example::

        >>> UpdateOutput("r/update/model.mec", "r/update/tables/", "r/update/promoted.mec").promoted_uri
        'r/update/promoted.mec'
    """

    model_uri: str
    tables_uri: str
    promoted_uri: str


def update(
    data_dir: str,
    finetune_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> UpdateOutput:
    """Trains the fine-tuned model on ``settings.update.split`` (``update.epochs`` passes; the
    fallback tables learn the new ids), then promotes the new ids seen at least
    ``update.min_count`` times in that split.

    Runs in one process or under torchrun (training data-parallel through
    ``DistributedModelParallel``, tables with a fallback table-wise or data-parallel; the
    promotion on rank 0, on the unsharded model); resumes training from
    ``out_dir/checkpoint/``.

    Args:
        data_dir (str): the prepared data set.
        finetune_dir (str): stage 3's folder (a model with fallback tables).
        out_dir (str): where the outputs go (``DIR/update`` in a run).
        settings (Settings): uses ``update`` and ``evaluate.batch_size``.
        force (bool): start from scratch, dropping a checkpoint.
        progress (bool): show progress bars.

    Returns:
        UpdateOutput: the files' URIs.

    Raises:
        ArtifactError: an input missing or corrupted (names the file).
        ValueError: the fine-tuned model has no fallback tables.
    """
    ctx = init_distributed()
    u = settings.update
    out = UpdateOutput(*(os.path.join(out_dir, f) for f in (MODEL_FILE, TABLES_DIR, PROMOTED_FILE)))
    checkpoint = os.path.join(out_dir, CHECKPOINT_DIR)
    want = fingerprint({"update": u, "eval_batch_size": settings.evaluate.batch_size},
                       os.path.join(data_dir, "manifest.json"),
                       os.path.join(finetune_dir, MODEL_FILE),
                       os.path.join(finetune_dir, TABLES_MANIFEST))
    if force:
        drop_checkpoint(checkpoint, ctx)
    dataset = open_dataset(data_dir)
    model, _ = load_model(finetune_dir)
    arch = architecture(model)  # before DMP shards the model in place
    if "new_ids" not in arch:
        raise ValueError(f"update: the fine-tuned model in {finetune_dir} has no fallback tables "
                         "for new ids; set new_ids.fallback_fraction and run finetune again")
    trained: Any = model
    history = None
    if u.epochs:
        torch.manual_seed(u.seed)
        result = train_model(model, dataset, u.train_settings(), ctx=ctx,
                             checkpoint_uri=checkpoint, fingerprint=want,
                             eval_batch_size=settings.evaluate.batch_size, desc="update",
                             progress=progress, split=u.split, validate=False)
        history = result.history.to_dict()
        if ctx.distributed:  # the trained shards, brought together through the stage's folder
            save_model(out_dir, result.model.state_dict(), arch, {"stage": "update"}, ctx)
    if ctx.is_main:
        if u.epochs and ctx.distributed:
            trained, _ = load_model(out_dir)  # unsharded: promotion runs in one process
        qebc = trained.embedding_bag_collection
        counts = {table_name(f): c for f, c in dataset.id_counts(u.split).items()}
        promoted = promote_frequent(qebc, counts, u.min_count)
        figures = {t: _traffic(qebc.embedding_bags[t], counts[t], ids)
                   for t, ids in promoted.items()}
        save_artifact(out.promoted_uri, promoted, {"split": u.split, "min_count": u.min_count,
                                                   "tables": figures}, PROMOTED_KIND)
        save_model(out_dir, trained.state_dict(), arch,
                   {"stage": "update", "world_size": ctx.world_size, "history": history,
                    "promotion": figures, "settings": {"update": asdict(u)}})
        remove_checkpoint(checkpoint)
    barrier(ctx)
    return out


def _traffic(table: ProductQuantizedTable, counts: torch.Tensor, promoted: torch.Tensor
             ) -> Dict[str, Any]:
    """What the split's traffic held of a table's new ids, and what the promotion covered."""
    new = counts[table.coded_rows:]
    total = int(counts.sum())
    return {"new_ids_seen": int((new > 0).sum()),
            "new_id_lookups": int(new.sum()),
            "lookups": total,
            "promoted_now": int(promoted.numel()),
            "promoted_lookups": int(counts[promoted].sum()) if promoted.numel() else 0,
            "promoted_total": table.num_promoted,
            "promotion_slots": table.config.promotion_slots}
