"""Settings of the MEC pipeline: one frozen dataclass per stage, presets, config files, flags.

Precedence, lowest first: the preset (``published`` unless told), a YAML or JSON config file,
then ``key=value`` overrides with dotted keys (``compress.quantizer.codebook_size=64``). A config
file holds the same nesting as :class:`Settings`::

    model: {name: dlrm_dcn, embedding_dim: 16}
    pretrain: {epochs: 2, batch_size: 1024}
    compress: {min_rows: 1000, quantizer: {num_subspaces: 4, codebook_size: 64}}

Unknown keys are errors that name the key (and the file), never silently ignored.
"""
import dataclasses
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import yaml
from iopath.common.file_io import g_pathmgr

from torchrec_mec.data import DEFAULT_MIN_COUNT, BadRowReport, SyntheticConfig
from torchrec_mec.data.schema import check_fractions
from torchrec_mec.models import ModelConfig
from torchrec_mec.modules.quantized_embedding_configs import MAX_CODEBOOK_SIZE
from torchrec_mec.quantize.budget import DEFAULT_CODEBOOK_SIZES, check_ratio
from torchrec_mec.quantize.config import MECConfig
from torchrec_mec.pipeline.optimizers import EMBEDDING_OPTIMIZERS

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "published"
AUTO_BATCH_STEPS = 500
"""Steps per epoch ``batch_size: 0`` aims at (``TrainSettings.global_batch_size``)."""
AUTO_BATCH_RANGE = (128, 8192)
"""The smallest and largest batch ``batch_size: 0`` chooses."""


@dataclass(frozen=True)
class DataSettings:
    """How a raw data set is encoded (``torchrec_mec.data.prepare_dataset``).

    Args:
        min_count (int): categorical values seen fewer times in the training split map to the
            out-of-vocabulary id 0.
        split (Tuple[float, float, float]): train, validation and test fractions.
        seed (int): seed of the split (and of the synthetic generator).
        max_rows (Optional[int]): read at most this many rows of the raw file.
        bad_rows (str): ``"report"`` (skip and count malformed rows) or ``"fail"``.
        synthetic (SyntheticConfig): the generator's settings for ``--format synthetic``.

    Example::

        >>> DataSettings(min_count=1, split=(0.9, 0.05, 0.05)).split
        (0.9, 0.05, 0.05)
    """

    min_count: int = DEFAULT_MIN_COUNT
    split: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_rows: Optional[int] = None
    bad_rows: str = "report"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        check_fractions(self.split)
        BadRowReport(self.bad_rows)  # "report" or "fail"
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or none, got {self.max_rows}")


@dataclass(frozen=True)
class TrainSettings:
    """Training of the CTR model (stage 1) or of the compressed model (stage 3).

    Dense parameters train with Adam; embedding tables and codebooks with Adagrad (FBGEMM's
    ``EXACT_ADAGRAD`` when a table is sharded, ``torch.optim.Adagrad`` otherwise; the two
    are the same update). The loss is the mean binary cross-entropy over the global batch, so
    N processes with ``batch_size / N`` rows each take the same steps as one process.

    Args:
        epochs (int): passes over the training split.
        batch_size (int): global batch size (all ranks together); divisible by the world size.
            0: chosen from the training rows (``global_batch_size``): about
            ``AUTO_BATCH_STEPS`` steps an epoch, a power of two in [128, 8192].
        dense_lr (float): Adam learning rate of the dense arch, interaction and over arch.
        embedding_lr (float): Adagrad learning rate of embedding tables and codebooks.
        seed (int): model initialisation and shuffling (epoch ``e`` shuffles with ``seed + e``).
        checkpoint_every (int): also checkpoint every this many steps (0: at epoch ends only).
        keep_best (bool): validate the starting state and every epoch and keep the state with
            the lowest validation log loss (for fine-tuning, the starting state is the
            compressed model before any training); off keeps the last epoch.
        patience (int): with ``keep_best``, stop training once this many validations in a row
            have not lowered the validation log loss (0: run all ``epochs``; stage 1's default
            is 1, ``PRETRAIN_DEFAULTS``).
        validate_every (int): also validate every this many steps within an epoch (0: at
            epoch ends only), so that one pass over large data can stop at its best point.
        embedding_l2 (float): weight of an L2 penalty on the embedding rows each batch looks
            up (the squared norm of every sample's pooled embeddings, averaged over the batch
            and added to the loss; ``training.EmbeddingPenalty``). For fine-tuning, it acts on
            codebooks and full tables.
        embedding_optimizer (str): the tables' Adagrad: ``adagrad`` (one accumulator per
            element: as much state as the tables) or ``rowwise_adagrad`` (one per row, 1/D of
            that: FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` when sharded, ``optimizers.RowWiseAdagrad``
            in one process). Stage 1 only: fine-tuning trains codebooks with ``adagrad``.

    Example::

        >>> TrainSettings(epochs=2, batch_size=4096).batch_size // 2  # per rank, on 2 ranks
        2048
    """

    epochs: int = 1
    batch_size: int = 8192
    dense_lr: float = 1e-3
    embedding_lr: float = 0.05
    seed: int = 0
    checkpoint_every: int = 0
    keep_best: bool = True
    patience: int = 0
    validate_every: int = 0
    embedding_l2: float = 0.0
    embedding_optimizer: str = "adagrad"

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got "
                             f"{self.embedding_optimizer!r}")
        if self.epochs < 1 or min(self.batch_size, self.checkpoint_every, self.patience,
                                  self.validate_every) < 0:
            raise ValueError("need epochs >= 1, and batch_size, checkpoint_every, patience and "
                             f"validate_every >= 0: {self}")
        if not self.embedding_l2 >= 0:
            raise ValueError(f"embedding_l2 must be >= 0: {self}")
        if not (self.dense_lr > 0 and self.embedding_lr > 0):
            raise ValueError(f"learning rates must be > 0: {self}")

    def global_batch_size(self, train_rows: int, world_size: int = 1) -> int:
        """The global batch size: ``batch_size``, or with 0 the power of two nearest
        ``train_rows / AUTO_BATCH_STEPS`` within [128, 8192] (then rounded up to a multiple of
        ``world_size``). Small batches give small data enough steps; on large data 8192 keeps
        the steps cheap.

        Example::

            >>> auto = TrainSettings(batch_size=0)
            >>> [auto.global_batch_size(n) for n in (6_400, 480_000, 4_000_000, 40_000_000)]
            [128, 1024, 8192, 8192]
            >>> auto.global_batch_size(480_000, world_size=3)
            1026
        """
        if self.batch_size:
            return self.batch_size
        size = 2 ** round(math.log2(max(train_rows / AUTO_BATCH_STEPS, 1)))
        size = min(max(size, AUTO_BATCH_RANGE[0]), AUTO_BATCH_RANGE[1])
        return -(-size // world_size) * world_size

    def validation_interval(self, steps_per_epoch: int) -> int:
        """Steps between validations within an epoch (0: at epoch ends only):
        ``validate_every``.

        Example::

            >>> TrainSettings(validate_every=50).validation_interval(1000)
            50
        """
        return self.validate_every


PRETRAIN_DEFAULTS = TrainSettings(epochs=10, batch_size=0, patience=1, embedding_l2=1e-4)
"""Stage 1 by default: a batch size from the training rows (``global_batch_size``), up to 10
epochs, stopped after the first validation that does not improve the validation log loss, the
best state kept, an embedding L2 of 1e-4 (docs/pipeline.md, "Stage 1's defaults")."""


@dataclass(frozen=True)
class FinetuneSettings(TrainSettings):
    """Training of the compressed model (stage 3): :class:`TrainSettings` and distillation.

    Args:
        distill_weight (float): in [0, 1]; the target of each training row's cross-entropy is
            ``(1 - w) * label + w * sigmoid(teacher logit)``, the teacher being the
            pre-trained (uncompressed) model, which is equivalent to
            ``(1 - w) * BCE(label) + w * BCE(teacher probability)``. 0: labels only.
        validations_per_epoch (int): with ``validate_every`` 0, validate this many times an
            epoch, evenly (every ``steps_per_epoch // validations_per_epoch`` steps, at least
            1), so that ``keep_best`` keeps the best point of the pass: fine-tuning goes over
            the rows stage 1 fitted, and its best state comes early (docs/pipeline.md). 0: at
            epoch ends only.

    Example::

        >>> FinetuneSettings(epochs=2, distill_weight=0.5).distill_weight
        0.5
        >>> FinetuneSettings().validation_interval(195), FinetuneSettings(
        ...     validations_per_epoch=0).validation_interval(195)
        (19, 0)
    """

    distill_weight: float = 0.0
    validations_per_epoch: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding_optimizer != "adagrad":
            raise ValueError("finetune.embedding_optimizer: only adagrad (fine-tuning trains "
                             f"codebooks), got {self.embedding_optimizer!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.validations_per_epoch < 0:
            raise ValueError("finetune.validations_per_epoch must be >= 0, got "
                             f"{self.validations_per_epoch}")

    def validation_interval(self, steps_per_epoch: int) -> int:
        if self.validate_every or not self.validations_per_epoch:
            return self.validate_every
        return max(1, steps_per_epoch // self.validations_per_epoch)


TABLE_WEIGHTS = ("sensitivity", "uniform")
"""The values of ``CompressSettings.table_weights``."""


@dataclass(frozen=True)
class CompressSettings:
    """Stage 2: which tables are product-quantized, and how.

    Two ways to say which tables: a memory budget (``target_ratio``), or by hand
    (``min_rows`` and the quantizer's M and K).

    Args:
        target_ratio (Optional[float]): the whole model's embedding memory (codes, codebooks
            and full tables) must be at most its float32 size / ``target_ratio``; stage 2 then
            decides for every table whether to compress it and with which M (any divisor of
            the dimension) and K (in ``codebook_sizes``), where the bytes cut the
            traffic-weighted error most (``torchrec_mec.quantize.budget``). ``min_rows`` and
            the quantizer's M and K are then not used. None: decided by hand.
        codebook_sizes (Tuple[int, ...]): the K the budget allocator considers.
        table_weights (str): how the budget allocator weighs each table's error:
            ``"sensitivity"`` by the pre-trained model's sensitivity to the table (measured by
            stage 1, ``torchrec_mec.pipeline.sensitivity``), so bytes go where the error moves
            the prediction most; ``"uniform"``: every table alike (the former behaviour, and
            what a pre-training without the measurement gets).
        min_rows (int): tables with at least this many rows are compressed; smaller ones stay
            full (MEC's published code: 100,000). Must be >= the codebook size.
        method (str): ``"mec"`` (the quantizer as ``quantizer`` says) or ``"kmeans_pq"``
            (plain k-means product quantization with the same M, K and seed:
            ``MECConfig.kmeans_pq``), the baseline MEC is compared with.
        quantizer (MECConfig): M, K, losses and schedule of the quantizer.

    Example::

        >>> s = CompressSettings(min_rows=500, method="kmeans_pq",
        ...                      quantizer=MECConfig(codebook_size=32))
        >>> s.min_rows, s.config.codebook_size, s.config.contrastive_weight
        (500, 32, 0.0)
    """

    target_ratio: Optional[float] = None
    codebook_sizes: Tuple[int, ...] = DEFAULT_CODEBOOK_SIZES
    table_weights: str = "sensitivity"
    min_rows: int = 100_000
    method: str = "mec"
    quantizer: MECConfig = field(default_factory=MECConfig)

    @property
    def config(self) -> MECConfig:
        """The quantizer config stage 2 runs: ``quantizer`` for ``method``."""
        return self.quantizer.for_method(self.method)

    def __post_init__(self) -> None:
        self.quantizer.for_method(self.method)  # raises on an unknown method
        object.__setattr__(self, "codebook_sizes", tuple(self.codebook_sizes))
        if self.target_ratio is not None and not self.target_ratio >= 1:
            raise ValueError(f"compress.target_ratio must be >= 1, got {self.target_ratio}")
        if self.table_weights not in TABLE_WEIGHTS:
            raise ValueError(f"compress.table_weights must be one of {TABLE_WEIGHTS}, got "
                             f"{self.table_weights!r}")
        if not self.codebook_sizes or not all(2 <= k <= MAX_CODEBOOK_SIZE
                                              for k in self.codebook_sizes):
            raise ValueError(f"compress.codebook_sizes must be in [2, {MAX_CODEBOOK_SIZE}], "
                             f"got {self.codebook_sizes}")
        if self.min_rows < self.quantizer.codebook_size:
            raise ValueError(f"compress.min_rows ({self.min_rows}) must be >= the codebook size "
                             f"({self.quantizer.codebook_size}): a table needs at least K rows")


@dataclass(frozen=True)
class EvaluateSettings:
    """Stage 4 (and the per-epoch validation of stages 1 and 3).

    Args:
        batch_size (int): global batch size of evaluation.

    Example::

        >>> EvaluateSettings(batch_size=1024).batch_size
        1024
    """

    batch_size: int = 16384

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class NewIdSettings:
    """Fallback tables for ids first seen after compression (docs/new_ids.md), built into the
    compressed model by stage 3.

    A compressed table's coded ids are those up to the last id its training split holds (ids
    are numbered in order of appearance, so later ones are new). A table with ids beyond them
    gets a hashed fallback table of ``ceil(fallback_fraction * coded ids)`` rows and
    ``ceil(promotion_fraction * coded ids)`` promotion slots (at most its new ids).

    Args:
        fallback_fraction (float): fallback rows per coded id; 0: no fallback tables (new ids
            are then out of range for the compressed model).
        promotion_fraction (float): promotion slots per coded id (``mec update``); needs
            ``fallback_fraction > 0``.

    Example::

        >>> NewIdSettings(fallback_fraction=0.01, promotion_fraction=0.02).fallback_fraction
        0.01
    """

    fallback_fraction: float = 0.0
    promotion_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.fallback_fraction <= 1 and 0 <= self.promotion_fraction <= 1):
            raise ValueError("new_ids.fallback_fraction and new_ids.promotion_fraction must be in "
                             f"[0, 1]: {self}")
        if self.promotion_fraction and not self.fallback_fraction:
            raise ValueError("new_ids.promotion_fraction needs new_ids.fallback_fraction > 0 "
                             "(ids are promoted from their fallback rows)")


@dataclass(frozen=True)
class UpdateSettings:
    """``mec update``: trains the fine-tuned model on the traffic since compression, then gives
    the new ids seen at least ``min_count`` times there codes of their own (promotion).

    Args:
        split (str): the split that holds the traffic since compression (``val`` in a time
            split whose training rows came first).
        min_count (int): least occurrences in ``split`` for a new id to be promoted.
        epochs (int): passes over ``split`` before promoting (0: promote only).
        batch_size (int): global batch size.
        dense_lr (float): Adam learning rate of the dense parts.
        embedding_lr (float): Adagrad learning rate of tables, codebooks and fallback tables.
        seed (int): shuffling.

    Example::

        >>> UpdateSettings(min_count=5).train_settings().keep_best
        False
    """

    split: str = "val"
    min_count: int = 10
    epochs: int = 1
    batch_size: int = 8192
    dense_lr: float = 1e-3
    embedding_lr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"update.split must be train, val or test, got {self.split!r}")
        if self.min_count < 1 or self.epochs < 0:
            raise ValueError(f"need update.min_count >= 1 and update.epochs >= 0: {self}")

    def train_settings(self) -> TrainSettings:
        """The training loop's settings (no validation split to keep a best epoch by)."""
        return TrainSettings(epochs=max(self.epochs, 1), batch_size=self.batch_size,
                             dense_lr=self.dense_lr, embedding_lr=self.embedding_lr,
                             seed=self.seed, keep_best=False)


COMPARE_METHODS: Tuple[str, ...] = ("mec", "kmeans_pq", "small_dim", "hashing", "int8", "int4")
"""What ``mec compare`` can set against the full model (docs/pipeline.md)."""


@dataclass(frozen=True)
class CompareSettings:
    """``mec compare``: MEC and the alternatives at the same whole-model embedding memory.

    Args:
        ratios (Tuple[float, ...]): memory ratios (float32 baseline / budget) to compare at;
            ``int8`` and ``int4`` have one ratio of their own and ignore them.
        methods (Tuple[str, ...]): which of ``COMPARE_METHODS`` to run.
        hashing_keep_rows (int): the hashing trick keeps tables of at most this many rows
            whole and gives larger ones at least this many
            (``torchrec_mec.pipeline.alternatives.hashed_rows``).

    Example::

        >>> CompareSettings(ratios=(10, 100), methods=("mec", "hashing")).ratios
        (10.0, 100.0)
    """

    ratios: Tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)
    methods: Tuple[str, ...] = COMPARE_METHODS
    hashing_keep_rows: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = sorted(set(self.methods) - set(COMPARE_METHODS))
        if unknown or not self.methods:
            raise ValueError(f"compare.methods must be some of {list(COMPARE_METHODS)}, got "
                             f"{list(self.methods)}")
        if not all(r >= 1 for r in self.ratios):
            raise ValueError(f"compare.ratios must be >= 1, got {list(self.ratios)}")
        if self.hashing_keep_rows < 1:
            raise ValueError(f"compare.hashing_keep_rows must be >= 1, got "
                             f"{self.hashing_keep_rows}")


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline's stages read, one section per stage.

    Example::

        >>> s = load_settings("sample", overrides={"model.name": "deepfm", "pretrain.epochs": "1"})
        >>> s.model.name, s.pretrain.epochs, s.compress.quantizer.num_subspaces
        ('deepfm', 1, 4)
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSettings = field(default_factory=DataSettings)
    pretrain: TrainSettings = field(default_factory=lambda: PRETRAIN_DEFAULTS)
    compress: CompressSettings = field(default_factory=CompressSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    new_ids: NewIdSettings = field(default_factory=NewIdSettings)
    update: UpdateSettings = field(default_factory=UpdateSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)

    def __post_init__(self) -> None:
        m, d = self.compress.quantizer.num_subspaces, self.model.embedding_dim
        if d % m:
            raise ValueError(f"compress.quantizer.num_subspaces (M = {m}) must divide "
                             f"model.embedding_dim (D = {d}): each of the M codewords of a row "
                             f"holds D / M values")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Dict[str, Any]] = {
    # MEC's published settings (the defaults of the dataclasses above): D = 40, M = 4, K = 256,
    # tables of >= 100,000 rows compressed, the quantizer's published loss weights and batch.
    DEFAULT_PRESET: {},
    # The README demo: the 8k-row real samples (tables of 2 to ~600 rows after min_count 3) or
    # a small generated set, in a few minutes on 2 cores. Compresses every table of >= 200 rows
    # with M = 4, K = 32, which is what tables this small support.
    "sample": {
        "model": {"embedding_dim": 16, "dense_hidden_sizes": [64], "over_hidden_sizes": [64, 32],
                  "dcn_num_layers": 2, "dcn_low_rank_dim": 16, "deepfm_dimension": 32},
        "data": {"synthetic": {"num_rows": 40_000,
                               "table_sizes": [20_000, 5_000, 2_000, 1_000, 500, 200, 100, 50,
                                               20, 10, 5, 3]}},
        "pretrain": {"epochs": 3, "batch_size": 256, "dense_lr": 1e-3, "embedding_lr": 0.02},
        "compress": {"min_rows": 200,
                     "quantizer": {"num_subspaces": 4, "codebook_size": 32, "epochs": 10,
                                   "samples_per_epoch": 4096, "batch_size": 1024,
                                   "eval_rows": 1024, "kmeans_points_per_centroid": 32}},
        "finetune": {"epochs": 2, "batch_size": 256, "dense_lr": 1e-4, "embedding_lr": 0.01},
        "evaluate": {"batch_size": 4096},
    },
}


class SettingsError(ValueError):
    """A preset, config file or override that does not fit :class:`Settings`; names the key.

    Example::

        >>> try:
        ...     load_settings(overrides={"model.depth": 3})
        ... except SettingsError as e:
        ...     print(str(e).split(";")[0])
        override model.depth: unknown setting 'model.depth'
    """


def load_settings(
    preset: str = DEFAULT_PRESET,
    config_file: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Settings:
    """Settings from a preset, then a YAML/JSON config file, then dotted-key overrides.

    Args:
        preset (str): a name in ``PRESETS``.
        config_file (Optional[str]): iopath path of a YAML (``.yaml``/``.yml``) or JSON file.
        overrides (Optional[Mapping[str, Any]]): ``{"section.key": value}``; string values are
            parsed as YAML scalars or lists (``"64"`` is an int, ``"[64, 32]"`` a list).

    Raises:
        SettingsError: unknown preset or key, or a value of the wrong type; names it.
    """
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    origins: Dict[str, str] = {}
    tree = _merge(_defaults(Settings), PRESETS[preset], f"preset {preset!r}", origins)
    if config_file is not None:
        tree = _merge(tree, _read_config(config_file), f"config file {config_file}", origins)
    for key, value in (overrides or {}).items():
        if isinstance(value, str):
            value = yaml.safe_load(value)
        tree = _merge(tree, _nest(key, value), f"override {key}", origins)
    return _build(Settings, tree, "", origins)


def settings_from_dict(tree: Mapping[str, Any]) -> Settings:
    """Rebuilds :class:`Settings` from ``Settings.to_dict()`` (as recorded in artifacts)."""
    origins: Dict[str, str] = {}
    return _build(Settings, _merge(_defaults(Settings), tree, "settings", origins), "", origins)


class DataFacts(NamedTuple):
    """What the up-front checks need to know of a prepared data set.

    Args:
        num_rows (Mapping[str, int]): rows per split (``train``, ``val``, ``test``).
        num_embeddings (Mapping[str, int]): rows of each sparse feature's table.

    Example::

        >>> DataFacts({"train": 8, "val": 1, "test": 1}, {"C1": 500}).num_embeddings["C1"]
        500
    """

    num_rows: Mapping[str, int]
    num_embeddings: Mapping[str, int]

    def splits(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in self.num_rows.items())


def check_splits(data: DataFacts, needs: Mapping[str, Sequence[str]]) -> None:
    """Checks that every split a stage cannot do without has rows.

    Args:
        data (DataFacts): the data set.
        needs (Mapping[str, Sequence[str]]): stage -> the splits it needs.

    Example::

        >>> check_splits(DataFacts({"train": 1, "val": 0, "test": 0}, {}),
        ...              {"pretrain": ["train"], "evaluate": ["test"]})
        Traceback (most recent call last):
        ...
        torchrec_mec.pipeline.settings.SettingsError: the test split is empty (1 train, 0 val,
        0 test), and evaluate needs it: give more rows, or change data.split
    """
    for split in ("train", "val", "test"):
        stages = [s for s, splits in needs.items() if split in splits]
        if stages and data.num_rows[split] == 0:
            raise SettingsError(f"the {split} split is empty ({data.splits()}), and "
                                f"{', '.join(stages)} need{'s' * (len(stages) == 1)} it: give "
                                "more rows, or change data.split")


def check_training(section: str, train: TrainSettings, data: DataFacts, world_size: int) -> None:
    """Checks stage 1 or 3 (``section``) before it starts: a global batch that splits over the
    processes; warns when there is no validation split.

    Example::

        >>> check_training("pretrain", TrainSettings(batch_size=100), DataFacts(
        ...     {"train": 8, "val": 1, "test": 1}, {}), world_size=3)
        Traceback (most recent call last):
        ...
        torchrec_mec.pipeline.settings.SettingsError: pretrain.batch_size (100) is not divisible
        by the number of processes (3)
    """
    if train.batch_size and train.batch_size % world_size:
        raise SettingsError(f"{section}.batch_size ({train.batch_size}) is not divisible by the "
                            f"number of processes ({world_size})")
    if data.num_rows["val"] == 0:
        logger.warning("%s: the validation split is empty (%s): no per-epoch validation, and "
                       "%s.keep_best keeps the last epoch", section, data.splits(), section)


def check_update(settings: "Settings", data: DataFacts, world_size: int) -> None:
    """Checks ``mec update`` before any stage runs: fallback tables are asked for
    (``new_ids.fallback_fraction``), its split has rows and its batch splits over the processes.

    Example::

        >>> check_update(Settings(), DataFacts({"train": 8, "val": 1, "test": 1}, {}), 1)
        Traceback (most recent call last):
        ...
        torchrec_mec.pipeline.settings.SettingsError: update promotes new ids from their fallback
        tables, but new_ids.fallback_fraction is 0: set it (and new_ids.promotion_fraction) and
        run finetune again
    """
    if not settings.new_ids.fallback_fraction:
        raise SettingsError("update promotes new ids from their fallback tables, but "
                            "new_ids.fallback_fraction is 0: set it (and "
                            "new_ids.promotion_fraction) and run finetune again")
    u = settings.update
    if data.num_rows[u.split] == 0:
        raise SettingsError(f"update.split {u.split!r} is empty ({data.splits()})")
    if u.batch_size % world_size:
        raise SettingsError(f"update.batch_size ({u.batch_size}) is not divisible by the number "
                            f"of processes ({world_size})")


def check_compress(settings: "Settings", data: DataFacts) -> None:
    """Checks stage 2 against the table sizes before stage 1 starts: ``compress.target_ratio``
    can be reached (else ``BudgetError``, naming the smallest ratio that can), or, without
    one, at least one table has ``compress.min_rows`` rows (``min_rows >= K`` is checked with
    the settings).

    Example::

        >>> check_compress(Settings(), DataFacts({"train": 8, "val": 1, "test": 1}, {"C1": 600}))
        Traceback (most recent call last):
        ...
        torchrec_mec.pipeline.settings.SettingsError: compress.min_rows is 100000 but the largest
        table (C1) has 600 rows: no table would be compressed; lower compress.min_rows
        (--min-rows) to at most 600 (and at least the codebook size 256)
    """
    if settings.compress.target_ratio is not None:
        check_ratio({f: (n, settings.model.embedding_dim) for f, n in data.num_embeddings.items()},
                    settings.compress.target_ratio, settings.compress.codebook_sizes)
        return
    min_rows = settings.compress.min_rows
    if data.num_embeddings and max(data.num_embeddings.values()) < min_rows:
        feature, rows = max(data.num_embeddings.items(), key=lambda kv: kv[1])
        raise SettingsError(
            f"compress.min_rows is {min_rows} but the largest table ({feature}) has {rows} rows: "
            f"no table would be compressed; lower compress.min_rows (--min-rows) to at most "
            f"{rows} (and at least the codebook size {settings.compress.quantizer.codebook_size})")


def _defaults(cls: Any) -> Dict[str, Any]:
    """The class defaults as a tree (not ``asdict`` of an instance: values that
    ``__post_init__`` derives, such as ``SyntheticConfig.interaction_pairs``, must stay unset
    so they are derived again from the merged settings)."""
    hints = typing.get_type_hints(cls)
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults(hints[f.name])
            if f.default_factory not in (hints[f.name], dataclasses.MISSING):  # own defaults
                own = f.default_factory()
                out[f.name].update({k: getattr(own, k) for k, v in out[f.name].items()
                                    if not isinstance(v, dict)})
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()  # type: ignore[operator]  # not MISSING here
    return out


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a config file (YAML and JSON would keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        first: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first at line "
                                    f"{first[key]}); each setting may appear once")
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice in one object; each setting may "
                                "appear once")
        out[key] = value
    return out


def _read_config(path: str) -> Dict[str, Any]:
    if not g_pathmgr.isfile(path):
        raise SettingsError(f"config file {path}: not found")
    with g_pathmgr.open(path, "r") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            tree = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            tree = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a safe loader)
    except _DuplicateKey as e:
        raise SettingsError(f"config file {path}: {e}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SettingsError(f"config file {path}: cannot be parsed ({e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise SettingsError(f"config file {path}: must hold a mapping of sections")
    return tree


def _nest(key: str, value: Any) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _merge(base: Dict[str, Any], update: Mapping[str, Any], source: str, origins: Dict[str, str],
           path: str = "") -> Dict[str, Any]:
    """``base`` updated by ``update``; ``origins`` learns which source set each key."""
    out = dict(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise SettingsError(f"{source}: unknown setting {where!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise SettingsError(f"{source}: {where!r} is a section, got {value!r}")
            out[key] = _merge(base[key], value, source, origins, where + ".")
        else:
            out[key] = value
            origins[where] = source
    return out


def _build(cls: Any, tree: Mapping[str, Any], path: str, origins: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _coerce(hints[f.name], tree[f.name], f"{path}{f.name}", origins)
              for f in dataclasses.fields(cls)}
    try:
        return cls(**kwargs)
    except ValueError as e:
        section = path.rstrip(".")
        sources = sorted({o for k, o in origins.items() if k.startswith(path)})
        where = f"settings {section}" if section else "settings"
        raise SettingsError(f"{where}{' (from ' + ', '.join(sources) + ')' if sources else ''}: "
                            f"{e}") from None


def _coerce(hint: Any, value: Any, where: str, origins: Mapping[str, str]) -> Any:
    try:
        return _coerce_value(hint, value, where, origins)
    except SettingsError as e:
        if where in origins and not str(e).startswith(origins[where]):
            raise SettingsError(f"{origins[where]}: {e}") from None
        raise


def _coerce_value(hint: Any, value: Any, where: str, origins: Mapping[str, str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".", origins)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str)
                                                      and value.lower() in ("none", "null"))):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce_value(inner, value, where, origins)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"setting {where!r} must be a list, got {value!r}")
        inner = args if len(args) != 2 or args[1] is not Ellipsis else (args[0],) * len(value)
        if len(inner) != len(value):
            raise SettingsError(f"setting {where!r} must have {len(inner)} entries, got {value!r}")
        return tuple(_coerce_value(t, v, f"{where}[{i}]", origins)
                     for i, (t, v) in enumerate(zip(inner, value)))
    if hint is Any:
        return value
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML reads "1e-3" as a string
            value = hint(value)
        except ValueError:
            raise SettingsError(f"setting {where!r} must be a number, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise SettingsError(f"setting {where!r} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingsError(f"setting {where!r} must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise SettingsError(f"setting {where!r} must be {hint.__name__}, got {value!r}")
    return value
