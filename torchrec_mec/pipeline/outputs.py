"""Where each stage's outputs live, how models are saved and read back, and checkpoint keys.

A run directory holds one folder per stage::

    DIR/data/            the prepared data set (manifest.json, arrays)
    DIR/pretrain/        model.mec (dense part + architecture), tables.mec (embedding
                         collection state), counts.mec (id popularity), checkpoint.mec (while
                         training)
    DIR/compress/        one artifact per compressed table, written by the quantizer driver
    DIR/finetune/        model.mec, tables.mec of the compressed model, checkpoint.mec
    DIR/evaluate/        metrics.mec
    DIR/compare/         comparisons.mec, auc_vs_memory.png, cells/ (``mec compare``: the
                         alternatives at equal memory, one artifact per method and ratio)
    DIR/update/          model.mec, tables.mec, promoted.mec (``mec update``: new ids promoted)
    DIR/report.json, DIR/plots/*.png

    DIR/lineage/<stage>.json   what each stage read and wrote (``lineage.py``)
    DIR/mec.lock               the run directory's lock (``lock.py``)

Every ``.mec`` file goes through ``torchrec_mec.artifacts`` (versioned, checksummed, atomic).
Whether a stage is up to date is the runner's business (``runner.py``, from the lineage
records); :func:`fingerprint` only tells a training checkpoint of the same work from another.
"""
import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Dict, Mapping, Tuple

import torch
from iopath.common.file_io import g_pathmgr

from torchrec_mec.artifacts import ArtifactError, load_artifact, read_artifact_header, save_artifact
from torchrec_mec.models import CTRModel, ModelConfig, build_model

STAGE_FOLDERS = ("data", "pretrain", "compress", "finetune", "evaluate", "compare", "update")
MODEL_FILE, TABLES_FILE, COUNTS_FILE, CHECKPOINT_FILE = (
    "model.mec", "tables.mec", "counts.mec", "checkpoint.mec")
METRICS_FILE = "metrics.mec"
MODEL_KIND, TABLES_KIND, COUNTS_KIND, METRICS_KIND = (
    "mec_ctr_model", "mec_embedding_tables", "mec_id_counts", "mec_evaluation")
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
    verifies the whole file when it loads it); any other file, e.g. a data set's
    ``manifest.json`` (which holds every array's sha256), its own sha256.

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


def save_model(out_dir: str, model_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any],
               meta: Mapping[str, Any]) -> Tuple[str, str]:
    """Writes a trained model as ``tables.mec`` (embedding collection) and ``model.mec`` (the
    rest, and the architecture to rebuild it) under ``out_dir``; ``model.mec`` last, since its
    presence marks the model complete.

    Args:
        out_dir (str): the stage's folder.
        model_state (Mapping[str, Tensor]): the full state dict (``TrainResult.state``).
        arch (Mapping[str, Any]): the model's :func:`architecture`.
        meta (Mapping[str, Any]): JSON-able extras (history, settings).

    Returns:
        (model_uri, tables_uri).
    """
    tables = {k[len(EMBEDDING_PREFIX):]: v for k, v in model_state.items()
              if k.startswith(EMBEDDING_PREFIX)}
    dense = {k: v for k, v in model_state.items() if not k.startswith(EMBEDDING_PREFIX)}
    model_uri, tables_uri = os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, TABLES_FILE)
    save_artifact(tables_uri, tables, {"architecture": arch}, TABLES_KIND)
    save_artifact(model_uri, dense, {**meta, "architecture": arch}, MODEL_KIND)
    return model_uri, tables_uri


def load_model(model_dir: str) -> Tuple[CTRModel, Dict[str, Any]]:
    """Rebuilds a model saved by :func:`save_model` from ``model_dir``; returns it and the
    ``model.mec`` metadata.

    Raises:
        ArtifactError: either file missing, corrupted or of another kind (names the file), or
            the two files do not belong together.

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
    model_uri = os.path.join(model_dir, MODEL_FILE)
    tables_uri = os.path.join(model_dir, TABLES_FILE)
    dense, meta = load_artifact(model_uri, expect_kind=MODEL_KIND)
    tables, tables_meta = load_artifact(tables_uri, expect_kind=TABLES_KIND)
    arch = meta["architecture"]
    if tables_meta["architecture"] != arch:
        raise ArtifactError(f"artifact {tables_uri}: does not belong to {model_uri} "
                            "(different architecture); rerun the stage that wrote them")
    compressed = arch["compressed"]
    model = build_model(ModelConfig(**arch["model"]), arch["num_dense"], arch["sparse_names"],
                        arch["num_embeddings"],
                        compressed={t: tuple(mk) for t, mk in compressed.items()}
                        if compressed is not None else None,
                        new_ids=arch.get("new_ids"))
    state = dict(dense)
    state.update({EMBEDDING_PREFIX + k: v for k, v in tables.items()})
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"artifact {model_uri}: does not load into its architecture ({e})") \
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
