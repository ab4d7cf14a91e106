"""``mec compare``: MEC against the alternatives at the same embedding memory.

For every memory ratio ``R`` of ``compare.ratios`` (budget: the float32 tables' bytes / ``R``,
whole model, as ``QuantizedEmbeddingBagCollection.memory_report()`` counts), each method of
``compare.methods`` is trained and scored on the run's prepared split:

- ``mec``: stage 2 with ``compress.target_ratio = R``, then stage 3 (the run's settings);
- ``kmeans_pq``: the same with ``compress.method = kmeans_pq``;
- ``small_dim``: a full model with the largest dimension D' that fits, trained like stage 1;
- ``hashing``: ids hashed into fewer rows per table at the original D, trained like stage 1;
- ``int8`` / ``int4``: TorchRec's row-wise quantization of the pre-trained tables (no
  training), at the one ratio each reaches.

The pre-trained model is the baseline (ratio 1). Each (method, ratio) is one artifact under
``compare/cells/`` keyed by a fingerprint of its settings and inputs: a killed ``mec compare``
redoes only the unfinished cells (and a cell's training resumes from its checkpoint under
``compare/work/``). A ratio a method cannot reach is a row that says so. The budget
allocator's error estimates are made once per table, shape, weighting and seed in one
``mec compare`` and shared by its ``mec`` and ``kmeans_pq`` cells (their ratios ask for
largely the same ones; the two methods' weightings differ).
"""
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from matplotlib.figure import Figure
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_mec.artifacts import ArtifactError, load_artifact, save_artifact
from torchrec_mec.data import CTRDataset, EncodedDataset
from torchrec_mec.data.schema import DataSchema
from torchrec_mec.models import CTRModel, build_model
from torchrec_mec.pipeline.alternatives import (
    ROW_ALIGNMENT,
    UnreachableError,
    hash_ids,
    hashed_rows,
    rowwise_bytes,
    rowwise_dequantize,
    rowwise_quantize,
    small_dim,
)
from torchrec_mec.pipeline.compress import compress
from torchrec_mec.pipeline.evaluate import embedding_memory, evaluate_model
from torchrec_mec.pipeline.finetune import finetune
from torchrec_mec.pipeline.outputs import (
    CHECKPOINT_DIR,
    COUNTS_FILE,
    MODEL_FILE,
    TABLES_MANIFEST,
    fingerprint,
    load_model,
)
from torchrec_mec.pipeline.parallel import DistContext, init_distributed
from torchrec_mec.pipeline.settings import Settings, SettingsError
from torchrec_mec.pipeline.training import train_model
from torchrec_mec.quantize.budget import BudgetError, EstimateMemo, check_ratio

logger = logging.getLogger(__name__)

COMPARISONS_FILE = "comparisons.mec"
COMPARISONS_KIND = "mec_comparisons"
CELL_KIND = "mec_comparison_cell"
PLOT_FILE = "auc_vs_memory.png"
CELLS_DIR, WORK_DIR = "cells", "work"
ROWWISE = {"int8": 8, "int4": 4}
"""The row-wise quantized methods and their bits: one ratio each, whatever ``compare.ratios``."""


@dataclass(frozen=True)
class Cell:
    """One row of the comparison: a method at a target ratio.

    Args:
        method (str): ``baseline`` or one of ``settings.COMPARE_METHODS``.
        target_ratio (Optional[float]): the budget's ratio; None for the baseline and the
            row-wise quantized methods, which have a ratio of their own.

    Example::

        >>> Cell("hashing", 30.0).name, Cell("int8", None).name
        ('hashing-30x', 'int8')
    """

    method: str
    target_ratio: Optional[float]

    @property
    def name(self) -> str:
        return self.method if self.target_ratio is None else f"{self.method}-{self.target_ratio:g}x"


def cells(settings: Settings) -> List[Cell]:
    """The comparison's cells in order: the baseline, then per method its ratios.

    Example::

        >>> from torchrec_mec.pipeline import load_settings
        >>> s = load_settings(overrides={"compare.ratios": [10], "compare.methods": ["mec", "int4"]})
        >>> [c.name for c in cells(s)]
        ['baseline', 'mec-10x', 'int4']
    """
    out = [Cell("baseline", None)]
    for method in settings.compare.methods:
        ratios: Sequence[Optional[float]] = ((None,) if method in ROWWISE
                                             else settings.compare.ratios)
        out += [Cell(method, r) for r in ratios]
    return out


class HashedDataset(CTRDataset):
    """A data set whose ids are hashed into ``num_rows[feature]`` rows (``hash_ids``), for the
    hashing trick's model: same rows, labels and dense features, fewer embedding rows.

    Args:
        dataset (CTRDataset): the data set.
        num_rows (Mapping[str, int]): rows per sparse feature after hashing.

    Example::

        >>> import tempfile
        >>> from torchrec_mec.data import SyntheticConfig, prepare_dataset
        >>> ds = prepare_dataset(None, "synthetic", tempfile.mkdtemp(), progress=False,
        ...     synthetic=SyntheticConfig(num_rows=200, table_sizes=(50, 5), num_dense=1))
        >>> hashed = HashedDataset(ds, {"C1": 7, "C2": 6})
        >>> batch = next(hashed.batches("train", 64))
        >>> int(batch.sparse_features["C1"].values().max()) < 7
        True
    """

    def __init__(self, dataset: CTRDataset, num_rows: Mapping[str, int]) -> None:
        self.dataset = dataset
        self.rows = dict(num_rows)

    @property
    def schema(self) -> DataSchema:
        return self.dataset.schema

    @property
    def num_embeddings(self) -> Dict[str, int]:
        return dict(self.rows)

    def num_rows(self, split: str) -> int:
        return self.dataset.num_rows(split)

    def id_counts(self, split: str = "train") -> Dict[str, torch.Tensor]:
        return {f: torch.zeros(self.rows[f], dtype=torch.int64).index_add_(
                    0, hash_ids(torch.arange(c.numel()), self.rows[f]), c)
                for f, c in self.dataset.id_counts(split).items()}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[Batch]:
        for b in self.dataset.batches(split, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                      world_size=world_size, drop_last=drop_last):
            kjt = b.sparse_features
            rows = torch.repeat_interleave(torch.tensor([self.rows[k] for k in kjt.keys()]),
                                           torch.tensor(kjt.length_per_key()))
            hashed = KeyedJaggedTensor(keys=kjt.keys(), values=hash_ids(kjt.values(), rows),
                                       lengths=kjt.lengths(), stride=kjt.stride())
            yield Batch(dense_features=b.dense_features, sparse_features=hashed,
                        labels=b.labels)


@dataclass
class _Job:
    """What every cell's runner needs."""

    data_dir: str
    pretrain_dir: str
    out_dir: str
    settings: Settings
    dataset: EncodedDataset
    baseline: CTRModel
    ctx: DistContext
    estimates: Dict[str, EstimateMemo] = field(default_factory=dict)
    """The budget allocator's error estimates, shared by the cells (``compress``)."""

    @property
    def baseline_bytes(self) -> int:
        return int(embedding_memory(self.baseline)["baseline_bytes"])

    @property
    def dim(self) -> int:
        return self.baseline.config.embedding_dim

    def work(self, cell: Cell) -> str:
        return os.path.join(self.out_dir, WORK_DIR, cell.name)

    def row(self, cell: Cell, model: torch.nn.Module, dataset: CTRDataset, num_bytes: int,
            **detail: Any) -> Dict[str, Any]:
        """The cell's row: test metrics of ``model`` on ``dataset``, its bytes and ratio."""
        m = evaluate_model(model, dataset, "test", self.settings.evaluate.batch_size, self.ctx,
                           progress=False, desc=f"compare {cell.name}")
        return {"method": cell.method, "target_ratio": cell.target_ratio,
                "ratio": self.baseline_bytes / num_bytes, "bytes": num_bytes,
                "baseline_bytes": self.baseline_bytes, "auc": m.auc, "logloss": m.logloss,
                "num_samples": m.num_samples, "unreachable": None, **detail}

    def train(self, cell: Cell, model: CTRModel, dataset: CTRDataset) -> Optional[float]:
        """Trains ``model`` like stage 1 (``settings.pretrain``) on ``dataset``; returns the
        epoch kept (None: the last). Resumes from the cell's checkpoint."""
        key = fingerprint({"cell": asdict(cell), **_scope(cell, self.settings)},
                          *_inputs(cell, self.data_dir, self.pretrain_dir))
        result = train_model(model, dataset, self.settings.pretrain, ctx=self.ctx,
                             checkpoint_uri=os.path.join(self.work(cell), CHECKPOINT_DIR),
                             fingerprint=key, eval_batch_size=self.settings.evaluate.batch_size,
                             desc=f"compare {cell.name}", progress=False, start_competes=False)
        assert result.model is model  # one process trains the model in place (checked up front)
        return result.history.best_epoch


def _baseline(job: _Job, cell: Cell) -> Dict[str, Any]:
    return job.row(cell, job.baseline, job.dataset, job.baseline_bytes)


def _pq(job: _Job, cell: Cell) -> Dict[str, Any]:
    """Stage 2 at the cell's ratio (MEC or plain k-means PQ), then stage 3."""
    assert cell.target_ratio is not None
    s = job.settings
    s = replace(s, compress=replace(s.compress, target_ratio=cell.target_ratio,
                                    method=cell.method))
    shapes = {n: tuple(b.weight.shape)
              for n, b in job.baseline.embedding_bag_collection.embedding_bags.items()}
    check_ratio(shapes, cell.target_ratio, s.compress.codebook_sizes)
    work = job.work(cell)
    compress(job.pretrain_dir, os.path.join(work, "compress"), s, progress=False,
             estimates=job.estimates)
    finetune(job.data_dir, job.pretrain_dir, os.path.join(work, "compress"),
             os.path.join(work, "finetune"), s, progress=False)
    model, meta = load_model(os.path.join(work, "finetune"))
    memory = embedding_memory(model)
    return job.row(cell, model, job.dataset, memory["bytes"],
                   compressed_tables=sum(t["compressed"] for t in memory["tables"].values()),
                   finetune_kept_epoch=meta["history"]["best_epoch"])


def _small_dim(job: _Job, cell: Cell) -> Dict[str, Any]:
    """A full model with the largest D' that fits, trained from scratch like stage 1."""
    assert cell.target_ratio is not None
    dim = small_dim(job.dataset.num_embeddings, job.baseline_bytes / cell.target_ratio)
    ds, s = job.dataset, job.settings
    torch.manual_seed(s.pretrain.seed)
    model = build_model(replace(s.model, embedding_dim=dim), ds.schema.num_dense,
                        ds.schema.sparse_names, ds.num_embeddings)
    kept = job.train(cell, model, ds)
    return job.row(cell, model, ds, embedding_memory(model)["bytes"], embedding_dim=dim,
                   kept_epoch=kept)


def _hashing(job: _Job, cell: Cell) -> Dict[str, Any]:
    """Ids hashed into fewer rows per table (``hashed_rows``), trained like stage 1."""
    assert cell.target_ratio is not None
    s = job.settings
    rows = hashed_rows(job.dataset.num_embeddings, job.dim, job.baseline_bytes / cell.target_ratio,
                       s.compare.hashing_keep_rows)
    hashed = HashedDataset(job.dataset, rows)
    torch.manual_seed(s.pretrain.seed)
    model = build_model(s.model, hashed.schema.num_dense, hashed.schema.sparse_names, rows)
    kept = job.train(cell, model, hashed)
    return job.row(cell, model, hashed, embedding_memory(model)["bytes"], hashed_rows=rows,
                   kept_epoch=kept)


def _rowwise(job: _Job, cell: Cell) -> Dict[str, Any]:
    """The pre-trained tables quantized row-wise (no training), scored dequantized."""
    bits = ROWWISE[cell.method]
    model, _ = load_model(job.pretrain_dir)
    num_bytes = aligned = 0
    with torch.no_grad():
        for bag in model.embedding_bag_collection.embedding_bags.values():
            bag.weight.copy_(rowwise_dequantize(rowwise_quantize(bag.weight, bits), bits))
            rows, dim = bag.weight.shape
            num_bytes += rowwise_bytes(rows, dim, bits)
            aligned += rowwise_bytes(rows, dim, bits, alignment=ROW_ALIGNMENT)
    return job.row(cell, model, job.dataset, num_bytes, bits=bits, aligned_bytes=aligned)


RUNNERS: Dict[str, Callable[[_Job, Cell], Dict[str, Any]]] = {
    "baseline": _baseline, "mec": _pq, "kmeans_pq": _pq, "small_dim": _small_dim,
    "hashing": _hashing, "int8": _rowwise, "int4": _rowwise}
"""The function that scores each method's cell."""


def _scope(cell: Cell, s: Settings) -> Dict[str, Any]:
    """The settings a cell's result depends on (its fingerprint)."""
    scope: Dict[str, Any] = {"eval_batch_size": s.evaluate.batch_size}
    if cell.method in ("mec", "kmeans_pq"):
        scope.update(compress=s.compress, finetune=s.finetune, new_ids=s.new_ids)
    elif cell.method in ("small_dim", "hashing"):
        scope.update(model=s.model, pretrain=s.pretrain)
        if cell.method == "hashing":
            scope["hashing_keep_rows"] = s.compare.hashing_keep_rows
    return scope


def _inputs(cell: Cell, data_dir: str, pretrain_dir: str) -> List[str]:
    """The files a cell's result depends on: the data set, and the pre-trained model unless
    the cell trains from scratch."""
    files = [os.path.join(data_dir, "manifest.json")]
    if cell.method not in ("small_dim", "hashing"):
        files += [os.path.join(pretrain_dir, f) for f in (MODEL_FILE, TABLES_MANIFEST, COUNTS_FILE)]
    return files


def compare(
    data_dir: str,
    pretrain_dir: str,
    out_dir: str,
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Scores every cell (:func:`cells`) on the test split, reusing finished cells.

    Runs in one process. A cell whose artifact under ``out_dir/cells/`` matches its settings
    and inputs is not redone; the others run, the trained ones resuming from their checkpoint.

    Args:
        data_dir (str): the prepared data set.
        pretrain_dir (str): stage 1's folder (the baseline and the tables ``mec``,
            ``kmeans_pq``, ``int8`` and ``int4`` start from).
        out_dir (str): where the outputs go (``DIR/compare`` in a run).
        settings (Settings): uses ``compare``, and per method ``compress``, ``finetune``,
            ``new_ids``, ``model``, ``pretrain``, ``evaluate``.
        force (bool): redo every cell.
        progress (bool): show a progress bar over the cells.

    Returns:
        str: the URI of ``comparisons.mec``, whose metadata ``comparisons`` holds one row per
        cell (``method``, ``target_ratio``, ``ratio`` reached, ``bytes``, ``baseline_bytes``,
        ``auc``, ``logloss``, ``num_samples``, ``unreachable``: why a ratio cannot be reached,
        else None; ``seconds``; and per method ``embedding_dim``, ``hashed_rows``, ``bits``,
        ``aligned_bytes``, ``compressed_tables``...) and ``plot`` the AUC-memory plot's file.

    Raises:
        ArtifactError: stage 1's files missing or corrupted (names the file).
    """
    ctx = init_distributed()
    if ctx.world_size > 1:
        raise SettingsError("mec compare runs in one process (not under torchrun)")
    if force:
        shutil.rmtree(out_dir, ignore_errors=True)
    dataset = EncodedDataset(data_dir)
    baseline, _ = load_model(pretrain_dir)
    job = _Job(data_dir, pretrain_dir, out_dir, settings, dataset, baseline, ctx)
    todo = cells(settings)
    rows: List[Dict[str, Any]] = []
    bar = tqdm(todo, desc="compare", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        uri = os.path.join(out_dir, CELLS_DIR, f"{cell.name}.mec")
        key = fingerprint({"cell": asdict(cell), **_scope(cell, settings)},
                          *_inputs(cell, data_dir, pretrain_dir))
        row = _finished(uri, key)
        if row is None:
            started = time.perf_counter()
            try:
                row = RUNNERS[cell.method](job, cell)
            except (UnreachableError, BudgetError) as e:
                row = {"method": cell.method, "target_ratio": cell.target_ratio, "ratio": None,
                       "bytes": None, "baseline_bytes": job.baseline_bytes, "auc": None,
                       "logloss": None, "num_samples": None, "unreachable": str(e)}
            row["seconds"] = time.perf_counter() - started
            save_artifact(uri, {}, {"fingerprint": key, "row": row}, CELL_KIND)
            shutil.rmtree(job.work(cell), ignore_errors=True)
        logger.info("compare: %s", describe(row))
        rows.append(row)
    bar.close()
    _remove_others(out_dir, todo)
    plot_comparisons(rows, os.path.join(out_dir, PLOT_FILE))
    out_uri = os.path.join(out_dir, COMPARISONS_FILE)
    save_artifact(out_uri, {}, {"comparisons": rows, "plot": PLOT_FILE,
                                "settings": asdict(settings.compare)}, COMPARISONS_KIND)
    return out_uri


def _finished(uri: str, key: str) -> Optional[Dict[str, Any]]:
    """The row of a finished cell for the same settings and inputs, or None."""
    if not os.path.exists(uri):
        return None
    try:
        _, meta = load_artifact(uri, expect_kind=CELL_KIND)
    except ArtifactError as e:
        logger.warning("compare: redoing a cell: %s", e)
        return None
    return meta["row"] if meta["fingerprint"] == key else None


def _remove_others(out_dir: str, todo: Sequence[Cell]) -> None:
    """Removes cells of other settings (``compare.ratios`` changed) and leftover work."""
    shutil.rmtree(os.path.join(out_dir, WORK_DIR), ignore_errors=True)
    keep = {f"{c.name}.mec" for c in todo}
    folder = os.path.join(out_dir, CELLS_DIR)
    for name in os.listdir(folder):
        if name not in keep:
            os.remove(os.path.join(folder, name))


def read_comparisons(compare_dir: str) -> Dict[str, Any]:
    """The metadata of ``comparisons.mec`` (see :func:`compare`).

    Raises:
        ArtifactError: missing or corrupted (names the file).
    """
    return load_artifact(os.path.join(compare_dir, COMPARISONS_FILE),
                         expect_kind=COMPARISONS_KIND)[1]


def describe(row: Mapping[str, Any]) -> str:
    """One line per row, for logs and the terminal.

    Example::

        >>> describe({"method": "hashing", "target_ratio": 10.0, "ratio": 10.02, "bytes": 998,
        ...           "auc": 0.71234, "logloss": 0.45, "unreachable": None})
        'hashing    at 10x: ratio 10.0x, 998 B, test AUC 0.7123, log loss 0.4500'
        >>> describe({"method": "mec", "target_ratio": 300.0, "unreachable": "too small"})
        'mec        at 300x: unreachable (too small)'
    """
    at = "" if row["target_ratio"] is None else f" at {row['target_ratio']:g}x"
    head = f"{row['method']:10s}{at}"
    if row["unreachable"] is not None:
        return f"{head}: unreachable ({row['unreachable']})"
    auc = "undefined" if row["auc"] is None else f"{row['auc']:.4f}"
    return (f"{head}: ratio {row['ratio']:.1f}x, {row['bytes']} B, test AUC {auc}, "
            f"log loss {row['logloss']:.4f}")


def plot_comparisons(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Test AUC against the memory ratio reached (log x), one curve per method, the baseline
    as a horizontal line; unreachable cells and undefined AUCs are left out."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline"))
    for method in methods:
        points = sorted((r["ratio"], r["auc"]) for r in rows if r["method"] == method
                        and r["unreachable"] is None and r["auc"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    for r in rows:
        if r["method"] == "baseline" and r["auc"] is not None:
            ax.axhline(r["auc"], color="black", linestyle="--", linewidth=0.8,
                       label=f"baseline (float32) {r['auc']:.4f}")
    ax.set_xscale("log")
    ax.set(xlabel="embedding memory ratio (float32 tables / bytes)", ylabel="test AUC",
           title="test AUC at equal embedding memory")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
