"""Stage 4: AUC and log loss of the baseline and the MEC model on the test split, and the
embedding memory of both.

Metrics are torchmetrics' (``BinaryAUROC``, exact; ``MeanMetric`` of PyTorch's per-sample
binary cross-entropy), which synchronise over the process group, so each rank scores its slice
of the test split and every rank gets the metric of the whole split.
"""
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from tqdm import tqdm

from torchrec_mec.artifacts import load_artifact, save_artifact
from torchrec_mec.data import CTRDataset
from torchrec_mec.pipeline.prepare import open_dataset
from torchrec_mec.models import CTRModel
from torchrec_mec.pipeline.outputs import (
    METRICS_FILE,
    METRICS_KIND,
    load_for_inference,
    model_skeleton,
)
from torchrec_mec.pipeline.parallel import (
    DistContext,
    barrier,
    init_distributed,
)
from torchrec_mec.pipeline.settings import Settings


@dataclass(frozen=True)
class Metrics:
    """Binary classification metrics of a model on one split.

    Args:
        auc (Optional[float]): area under the ROC curve; ``None`` where it is undefined (the
            split holds one class only).
        logloss (float): mean binary cross-entropy (natural log).
        num_samples (int): rows scored (all ranks together).
        num_positives (int): rows labelled 1 among them.

    Example::

        >>> Metrics(auc=0.75, logloss=0.45, num_samples=1000, num_positives=250).auc
        0.75
    """

    auc: Optional[float]
    logloss: float
    num_samples: int
    num_positives: int


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: CTRDataset,
    split: str,
    batch_size: int,
    ctx: DistContext,
    *,
    progress: bool = True,
    desc: str = "evaluate",
) -> Metrics:
    """Scores ``model`` (plain or ``DistributedModelParallel``) on ``split``.

    Every rank must call this (the metrics synchronise); each reads its slice of every global
    batch of ``batch_size`` rows. The AUC is ``None`` when the split holds a single class (no
    ranking to measure); torchmetrics would say 0.0.

    Raises:
        ValueError: the split is empty (names it).

    Example::

        >>> import tempfile
        >>> from torchrec_mec.data import SyntheticConfig, prepare_dataset
        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> ds = prepare_dataset(None, "synthetic", tempfile.mkdtemp(), progress=False,
        ...     synthetic=SyntheticConfig(num_rows=500, table_sizes=(50, 5), num_dense=2))
        >>> model = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), 2, ds.schema.sparse_names, ds.num_embeddings)
        >>> m = evaluate_model(model, ds, "test", 64, DistContext(0, 1, torch.device("cpu")),
        ...                    progress=False)
        >>> m.num_samples, 0.0 <= m.auc <= 1.0
        (50, True)
    """
    num_samples = dataset.num_rows(split)
    if num_samples == 0:
        raise ValueError(f"the {split} split of {getattr(dataset, 'path', 'the data set')} is "
                         "empty: nothing to score")
    was_training = model.training
    model.eval()
    auc = BinaryAUROC().to(ctx.device)
    logloss = MeanMetric().to(ctx.device)
    positives = SumMetric().to(ctx.device)
    local = max(1, batch_size // ctx.world_size)
    batches = dataset.batches(split, local, rank=ctx.rank, world_size=ctx.world_size)
    total = dataset.num_batches(split, local, world_size=ctx.world_size)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                      disable=not (progress and ctx.is_main)):
        batch = batch.to(ctx.device)
        logits = model(batch.dense_features, batch.sparse_features)
        auc.update(torch.sigmoid(logits), batch.labels.long())
        logloss.update(nn.functional.binary_cross_entropy_with_logits(
            logits, batch.labels, reduction="none"))
        positives.update(batch.labels.sum())
    model.train(was_training)
    num_positives = int(round(float(positives.compute())))
    one_class = num_positives in (0, num_samples)
    with warnings.catch_warnings():  # torchmetrics warns, then returns 0.0, for one class
        warnings.simplefilter("ignore", UserWarning)
        area = float(auc.compute())
    return Metrics(auc=None if one_class else area, logloss=float(logloss.compute()),
                   num_samples=num_samples, num_positives=num_positives)


def embedding_memory(model: CTRModel) -> Dict[str, Any]:
    """Bytes of the model's embedding collection, per table and in all, and what the same
    tables cost as float32 full tables.

    Example::

        >>> from torchrec_mec.models import ModelConfig, build_model
        >>> m = build_model(ModelConfig(embedding_dim=8, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), 1, ["C1"], {"C1": 100})
        >>> embedding_memory(m)["bytes"], embedding_memory(m)["tables"]["t_C1"]["compressed"]
        (3200, False)
    """
    ebc = model.embedding_bag_collection
    tables: Dict[str, Dict[str, Any]] = {}
    if hasattr(ebc, "memory_report"):
        for name, t in ebc.memory_report().tables.items():
            tables[name] = {**asdict(t), "total_bytes": t.total_bytes}
    else:
        for cfg in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[cfg.name].weight
            size = weight.numel() * weight.element_size()
            tables[cfg.name] = {"rows": cfg.num_embeddings, "dim": cfg.embedding_dim,
                                "compressed": False, "codes_bytes": 0, "codebooks_bytes": 0,
                                "weight_bytes": size, "baseline_bytes": cfg.num_embeddings
                                * cfg.embedding_dim * 4, "total_bytes": size}
    total = sum(t["total_bytes"] for t in tables.values())
    baseline = sum(t["baseline_bytes"] for t in tables.values())
    return {"bytes": total, "baseline_bytes": baseline, "tables": tables}


def evaluate(
    data_dir: str,
    baseline_dir: str,
    mec_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    progress: bool = True,
) -> str:
    """Stage 4: scores the pre-trained and the fine-tuned MEC model on the test split.

    Under torchrun each model is sharded (``DistributedModelParallel``) and each rank loads only
    its shards of the saved tables, whatever number of processes wrote them.

    Args:
        data_dir (str): the prepared data set.
        baseline_dir (str): stage 1's folder (``model.mec``, ``tables/``).
        mec_dir (str): stage 3's folder.
        out_dir (str): where ``metrics.mec`` goes.
        settings (Settings): uses ``settings.evaluate``.
        progress (bool): show progress bars.

    Returns:
        str: the URI of ``metrics.mec``, whose metadata holds ``baseline`` and ``mec`` (each
        ``auc``, ``None`` if undefined; ``logloss``, ``num_samples``, ``num_positives``) and
        ``memory`` (``baseline_bytes``, ``mec_bytes``, ``ratio``, ``tables``).

    Raises:
        ArtifactError: an input artifact is missing or corrupted (names the file).
    """
    ctx = init_distributed()
    out_uri = os.path.join(out_dir, METRICS_FILE)
    dataset = open_dataset(data_dir)
    results: Dict[str, Any] = {}
    memory: Dict[str, Any] = {}
    for name, folder in (("baseline", baseline_dir), ("mec", mec_dir)):
        model, _ = model_skeleton(folder)  # tables on meta: each rank loads its shards
        memory[name] = embedding_memory(model)
        runner = load_for_inference(model, folder, ctx)
        metrics = evaluate_model(runner, dataset, "test", settings.evaluate.batch_size, ctx,
                                 progress=progress, desc=f"evaluate {name}")
        results[name] = asdict(metrics)
        del model, runner
    meta = {
        "settings": asdict(settings.evaluate),
        **results,
        "memory": {
            "baseline_bytes": memory["baseline"]["bytes"],
            "mec_bytes": memory["mec"]["bytes"],
            "ratio": memory["baseline"]["bytes"] / max(memory["mec"]["bytes"], 1),
            "tables": memory["mec"]["tables"],
        },
    }
    if ctx.is_main:
        save_artifact(out_uri, {}, meta, METRICS_KIND)
    barrier(ctx)
    return out_uri


def read_metrics(uri: str) -> Dict[str, Any]:
    """The metadata of an evaluation artifact (see :func:`evaluate`)."""
    return load_artifact(uri, expect_kind=METRICS_KIND)[1]

