"""Where each stage's outputs live, how models are saved and read back, and checkpoint keys.

A run directory holds one folder per stage::

    DIR/data/            the prepared data set (manifest.json, arrays)
    DIR/pretrain/        model.mec (dense part + architecture), tables/ (embedding collection
                         state, a state directory), counts.mec (id popularity), checkpoint/
                         and checkpoint.best/ (while training)
    DIR/compress/        one artifact per compressed table, written by the quantizer driver
    DIR/finetune/        model.mec, tables/ of the compressed model, checkpoint/
    DIR/evaluate/        metrics.mec
    DIR/compare/         comparisons.mec, auc_vs_memory.png, cells/ (``mec compare``: the
                         alternatives at equal memory, one artifact per method and ratio)
    DIR/update/          model.mec, tables/, promoted.mec (``mec update``: new ids promoted)
    DIR/report.json, DIR/plots/*.png

    DIR/lineage/<stage>.json   what each stage read and wrote (``lineage.py``)
    DIR/mec.lock               the run directory's lock (``lock.py``)

Every ``.mec`` file goes through ``torchrec_mec.artifacts`` (versioned, checksummed, atomic);
``tables/`` and checkpoints are state directories (``state_dirs``: torch.distributed.checkpoint,
each rank writing its shards; checksummed manifest, renamed into place), so a model is never
gathered whole to be saved, and loads into any number of processes. :func:`export_model` writes
one file of a whole model for those who want one (small models, serving).
Whether a stage is up to date is the runner's business (``runner.py``, from the lineage
records); :func:`fingerprint` only tells a training checkpoint of the same work from another.
"""
import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from iopath.common.file_io import g_pathmgr
from torch import nn

from torchrec_mec.artifacts import ArtifactError, load_artifact, read_artifact_header, save_artifact
from torchrec_mec.models import CTRModel, ModelConfig, build_model
from torchrec_mec.pipeline.parallel import DistContext, barrier, materialize, shard_model
from torchrec_mec.pipeline.state_dirs import (
    MANIFEST,
    ONE_PROCESS,
    load_state,
    read_manifest,
    save_state,
)

STAGE_FOLDERS = ("data", "pretrain", "compress", "finetune", "evaluate", "compare", "update")
MODEL_FILE, TABLES_DIR, COUNTS_FILE, CHECKPOINT_DIR = (
    "model.mec", "tables/", "counts.mec", "checkpoint")
TABLES_MANIFEST = TABLES_DIR + MANIFEST
"""What a stage that reads a model's tables fingerprints (it holds every shard file's sha256)."""
METRICS_FILE = "metrics.mec"
MODEL_KIND, TABLES_KIND, COUNTS_KIND, METRICS_KIND, EXPORT_KIND = (
    "mec_ctr_model", "mec_embedding_tables", "mec_id_counts", "mec_evaluation", "mec_model_export")
META = torch.device("meta")
EMBEDDING_PREFIX = "arch.sparse_arch.embedding_bag_collection."


def stage_dir(run_dir: str, stage: str) -> str:
    """``run_dir/stage``.

    >>> stage_dir("runs/demo", "pretrain")
    'runs/demo/pretrain'
    """
    if stage not in STAGE_FOLDERS:
        raise ValueError(f"stage folder must be one of {STAGE_FOLDERS}, got {stage!r}")
    return os.path.join(run_dir, stage)


def fingerprint(settings: Any, *inputs: str) -> str:
    """A digest of ``settings`` (dataclasses or JSON-able) and of the input files' checksums, the
    key under which a training stage checkpoints: a checkpoint with another key is not resumed.

    An artifact contributes the sha256 its header records (cheap: one line is read; the stage
    verifies the whole file when it loads it); any other file, e.g. a data set's or a state
    directory's ``manifest.json`` (which holds every file's sha256), its own sha256.

    Raises:
        ArtifactError: an input is missing or is not a readable artifact (names the file).
    """
    h = hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode())
    for uri in inputs:
        if not g_pathmgr.exists(uri):
            raise ArtifactError(f"artifact {uri}: file not found")
        if uri.endswith(".mec"):
            h.update(read_artifact_header(uri)["sha256"].encode())
        else:
            with g_pathmgr.open(uri, "rb") as f:
                h.update(hashlib.sha256(f.read()).hexdigest().encode())
    return h.hexdigest()


def architecture(model: CTRModel) -> Dict[str, Any]:
    """What :func:`load_model` needs to rebuild ``model``: its ``ModelConfig``, data layout,
    which tables are compressed (M, K) and which have a fallback for new ids. Take it before
    training: ``DistributedModelParallel`` replaces the model's embedding collection with its sharded twin in place.

    Example::

        >>> m = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), 2, ["C1"], {"C1": 10}, compressed={"t_C1": (2, 4)})
        >>> architecture(m)["compressed"], architecture(m)["num_embeddings"]
        ({'t_C1': [2, 4]}, {'C1': 10})
    """
    from torchrec_mec.modules import QuantizedEmbeddingBagCollection

    ebc = model.embedding_bag_collection
    configs = ebc.embedding_bag_configs()
    compressed, new_ids = None, {}
    if isinstance(ebc, QuantizedEmbeddingBagCollection):
        compressed = {cfg.name: [cfg.num_subspaces, cfg.codebook_size]
                      for cfg in configs if cfg.compressed}
        new_ids = {cfg.name: {"coded_rows": cfg.coded_rows, "fallback_rows": cfg.fallback_rows,
                              "promotion_slots": cfg.promotion_slots}
                   for cfg in configs if cfg.has_fallback}
    arch = {
        "model": asdict(model.config),
        "num_dense": model.num_dense,
        "sparse_names": [f for cfg in configs for f in cfg.feature_names],
        "num_embeddings": {f: cfg.num_embeddings for cfg in configs for f in cfg.feature_names},
        "compressed": compressed,
    }
    if new_ids:  # tables with a fallback for new ids (docs/new_ids.md)
        arch["new_ids"] = new_ids
    return arch


def build_from_architecture(arch: Mapping[str, Any], tables_device: Optional[torch.device]
                            ) -> CTRModel:
    """A freshly initialised model of an :func:`architecture`, its embedding collection on
    ``tables_device`` (``None``: the CPU, as the rest).

    Example::

        >>> m = build_model(ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,),
        ...     over_hidden_sizes=(8,)), 2, ["C1"], {"C1": 10})
        >>> skeleton = build_from_architecture(architecture(m), META)
        >>> skeleton.embedding_bag_collection.embedding_bags["t_C1"].weight.is_meta
        True
    """
    compressed = arch["compressed"]
    return build_model(ModelConfig(**arch["model"]), arch["num_dense"], arch["sparse_names"],
                       arch["num_embeddings"],
                       compressed={t: tuple(mk) for t, mk in compressed.items()}
                       if compressed is not None else None,
                       new_ids=arch.get("new_ids"), tables_device=tables_device)


def save_model(out_dir: str, model_state: Mapping[str, Any], arch: Mapping[str, Any],
               meta: Mapping[str, Any], ctx: DistContext = ONE_PROCESS) -> Tuple[str, str]:
    """Writes a trained model as ``tables/`` (the embedding collection, a state directory each
    rank writes its shards of) and ``model.mec`` (the rest, replicated, and the architecture to
    rebuild it) under ``out_dir``; ``model.mec`` last, since its presence marks the model
    complete. A collective when ``ctx.distributed``.

    Args:
        out_dir (str): the stage's folder.
        model_state (Mapping[str, Any]): the (possibly sharded) state dict of the trained model
            (``TrainResult.model.state_dict()``).
        arch (Mapping[str, Any]): the model's :func:`architecture`.
        meta (Mapping[str, Any]): JSON-able extras (history, settings).
        ctx (DistContext): the ranks that hold ``model_state`` (one process by default).

    Returns:
        (model_uri, tables_uri).
    """
    tables = {k[len(EMBEDDING_PREFIX):]: v for k, v in model_state.items()
              if k.startswith(EMBEDDING_PREFIX)}
    dense = {k: v for k, v in model_state.items() if not k.startswith(EMBEDDING_PREFIX)}
    model_uri, tables_uri = os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, TABLES_DIR)
    save_state(tables_uri, tables, ctx, TABLES_KIND, {"architecture": arch})
    if ctx.is_main:
        save_artifact(model_uri, dense, {**meta, "architecture": arch}, MODEL_KIND)
    barrier(ctx)
    return model_uri, tables_uri


def model_skeleton(model_dir: str, tables_device: Optional[torch.device] = META
                   ) -> Tuple[CTRModel, Dict[str, Any]]:
    """The model saved in ``model_dir`` with its dense part loaded and its embedding collection
    on ``tables_device`` (``meta``: nothing allocated, for ``DistributedModelParallel`` to shard
    and :func:`load_tables` to fill); returns it and the ``model.mec`` metadata.

    Raises:
        ArtifactError: ``model.mec`` missing, corrupted or of another kind (names the file).
    """
    model_uri = os.path.join(model_dir, MODEL_FILE)
    dense, meta = load_artifact(model_uri, expect_kind=MODEL_KIND)
    model = build_from_architecture(meta["architecture"], tables_device)
    try:
        missing = model.load_state_dict(dense, strict=False).missing_keys
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"artifact {model_uri}: does not load into its architecture ({e})") \
            from None
    stray = [k for k in missing if not k.startswith(EMBEDDING_PREFIX)]
    if stray:
        raise ArtifactError(f"artifact {model_uri}: lacks {stray}; rerun the stage that wrote it")
    return model, meta


def load_tables(model_dir: str, model: nn.Module, ctx: DistContext = ONE_PROCESS,
                keys: Optional[Iterable[str]] = None) -> None:
    """Loads the embedding collection saved in ``model_dir/tables/`` into ``model`` (a plain
    model in one process, or a ``DistributedModelParallel`` one, each rank reading only its
    shards, whatever world size wrote them). ``keys`` (state dict keys of ``model``) limits what
    is read. A collective when ``ctx.distributed``.

    Raises:
        ArtifactError: the state directory fails its checks, or lacks an entry (names it).
    """
    uri = os.path.join(model_dir, TABLES_DIR)
    state = model.state_dict()
    wanted = [k for k in (state if keys is None else keys) if k.startswith(EMBEDDING_PREFIX)]
    load_state(uri, {k[len(EMBEDDING_PREFIX):]: state[k] for k in wanted}, ctx, TABLES_KIND)
    model.load_state_dict(state)  # parts of a state dict may be copies, not views


def load_for_inference(model: CTRModel, model_dir: str, ctx: DistContext = ONE_PROCESS
                       ) -> nn.Module:
    """``model`` (from :func:`model_skeleton` of ``model_dir``, tables on meta) ready to score:
    under torchrun sharded by ``DistributedModelParallel`` without optimizer state, each rank
    loading only its shards of ``model_dir/tables/``; in one process the model itself with its
    tables loaded. What ``evaluate`` scores and stage 3's distillation teacher. A collective
    when ``ctx.distributed``.

    Raises:
        ArtifactError: the state directory fails its checks, or lacks an entry (names it).
    """
    runner = shard_model(model, ctx, embedding_lr=None) if ctx.distributed else model
    materialize(runner, ctx.device)
    load_tables(model_dir, runner, ctx)
    return runner.to(ctx.device)


def load_model(model_dir: str) -> Tuple[CTRModel, Dict[str, Any]]:
    """Rebuilds a model saved by :func:`save_model` (by any number of processes), whole, in this
    process; returns it and the ``model.mec`` metadata.

    Raises:
        ArtifactError: either part missing, corrupted or of another kind (names the file), or
            the two do not belong together.

    Example::

        >>> import tempfile
        >>> cfg = ModelConfig(embedding_dim=4, dense_hidden_sizes=(8,), over_hidden_sizes=(8,))
        >>> m = build_model(cfg, 2, ["C1"], {"C1": 10})
        >>> out = tempfile.mkdtemp()
        >>> _ = save_model(out, m.state_dict(), architecture(m), {"stage": "pretrain"})
        >>> m2, meta = load_model(out)
        >>> torch.equal(m2.state_dict()["arch.over_arch.model.1.bias"],
        ...             m.state_dict()["arch.over_arch.model.1.bias"]), meta["stage"]
        (True, 'pretrain')
    """
    model, meta = model_skeleton(model_dir, tables_device=None)
    tables_uri = os.path.join(model_dir, TABLES_DIR)
    if read_manifest(tables_uri, TABLES_KIND)["meta"]["architecture"] != meta["architecture"]:
        raise ArtifactError(f"state {tables_uri}: does not belong to "
                            f"{os.path.join(model_dir, MODEL_FILE)} (different architecture); "
                            "rerun the stage that wrote them")
    load_tables(model_dir, model)
    return model, meta


def export_model(model_dir: str, uri: str) -> str:
    """Writes the model saved in ``model_dir`` as one file (an artifact of kind
    ``mec_model_export``: the whole state dict, and the architecture in its metadata), for small
    models and serving; :func:`load_exported_model` reads it back. Loads the model whole.

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> m = build_model(ModelConfig(embedding_dim=4), 2, ["C1"], {"C1": 10})
        >>> _ = save_model(out, m.state_dict(), architecture(m), {})
        >>> one, _ = load_exported_model(export_model(out, os.path.join(out, "one.mec")))
        >>> key = EMBEDDING_PREFIX + "embedding_bags.t_C1.weight"
        >>> torch.equal(one.state_dict()[key], m.state_dict()[key])
        True
    """
    model, meta = load_model(model_dir)
    save_artifact(uri, model.state_dict(), meta, EXPORT_KIND)
    return uri


def load_exported_model(uri: str) -> Tuple[CTRModel, Dict[str, Any]]:
    """The model in a file written by :func:`export_model`, and its metadata.

    Raises:
        ArtifactError: missing, corrupted, of another kind, or not loading into its
            architecture (names the file).
    """
    state, meta = load_artifact(uri, expect_kind=EXPORT_KIND)
    model = build_from_architecture(meta["architecture"], tables_device=None)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"artifact {uri}: does not load into its architecture ({e})") \
            from None
    return model, meta


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
