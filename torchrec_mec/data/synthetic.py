"""A Criteo-shaped synthetic CTR generator with a planted, learnable click model.

Every number is a counter-based hash of (seed, stream, row or id) (``_random``), so a data set
is a pure function of its config and seed, generation runs in O(chunk) memory whatever the
table sizes, and per-id parameters of a 50M-id table cost no memory. The click model is
documented in docs/data.md ("The synthetic click model").
"""
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from torchrec_mec.data._random import normal, stream_key, uniform
from torchrec_mec.data._files import close_array, open_array
from torchrec_mec.data.schema import SPLITS, DataSchema, check_fractions

DEFAULT_TABLE_SIZES: Tuple[int, ...] = (
    2_000_000, 1_000_000, 500_000, 200_000, 100_000, 50_000, 20_000, 10_000, 5_000, 2_000,
    1_000, 500, 300, 200, 100, 60, 40, 30, 20, 12, 10, 8, 6, 4, 3, 2,
)
"""A Criteo-like mix of 26 tables, from 2 to 2M ids (3.9M ids in all)."""

_CALIBRATION_ROWS = 1 << 16
_CALIBRATION_START = 1 << 62  # counters no data row uses: the model does not depend on num_rows
_MAX_TABLE_SIZE = 2**31 - 2  # ids + 1 must fit the int32 sparse array


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic generator (see docs/data.md for the click model).

    Args:
        num_rows (int): rows in all splits together.
        table_sizes (Tuple[int, ...]): ids per sparse feature (one feature per entry); the
            encoded tables have one more row, id 0 (OOV, never drawn).
        num_dense (int): dense features.
        zipf_exponent (float): ``a`` in P(popularity rank r) ~ (r + 1)^-a, all features.
        latent_dim (int): dimension of the per-id latent vectors of interacting features.
        interaction_pairs (Optional[Tuple[Tuple[int, int], ...]]): feature index pairs whose
            latent vectors' dot product enters the logit. Default: ``(0, F//2)`` and
            ``(1, 1 + F//2)`` for F >= 4 features (large tables with small ones), ``(0, 1)``
            for 2 or 3, none for 1.
        feature_weights (Optional[Tuple[float, ...]]): relative importance of each feature's
            main effects (default: all equal).
        sparse_scale (float): standard deviation of the per-id main effects of all features
            together, shared out in proportion to ``feature_weights``.
        interaction_scale (float): standard deviation of all interaction terms together.
        dense_scale (float): standard deviation of the dense linear term.
        dense_missing_rate (float): probability that a dense value is missing (stored as 0).
        click_rate (float): the mean click probability the bias is calibrated to.
        new_ids (Tuple[int, ...]): time drift (docs/data.md): per feature, how many new ids
            appear from row ``new_id_start * num_rows`` on (0: none; empty: no drift). They
            are numbered after the feature's ``table_sizes`` ids, so the encoded table has
            ``table_size + new_ids + 1`` rows.
        new_id_share (float): from then on, the share of a drifting feature's draws that are
            new ids (Zipf-distributed over them with the same exponent).
        new_id_start (float): when the new ids appear, as a fraction of the rows (rows are in
            time order: the splits are contiguous, training first).

    Example::

        >>> cfg = SyntheticConfig(num_rows=10_000, table_sizes=(5_000_000, 100, 10))
        >>> cfg.num_sparse, cfg.schema.sparse_names, cfg.interaction_pairs
        (3, ('C1', 'C2', 'C3'), ((0, 1),))
    """

    num_rows: int = 1_000_000
    table_sizes: Tuple[int, ...] = DEFAULT_TABLE_SIZES
    num_dense: int = 13
    zipf_exponent: float = 1.2
    latent_dim: int = 4
    interaction_pairs: Optional[Tuple[Tuple[int, int], ...]] = None
    feature_weights: Optional[Tuple[float, ...]] = None
    sparse_scale: float = 1.6
    interaction_scale: float = 0.7
    dense_scale: float = 0.6
    dense_missing_rate: float = 0.1
    click_rate: float = 0.25
    new_ids: Tuple[int, ...] = ()
    new_id_share: float = 0.0
    new_id_start: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_sizes", tuple(int(v) for v in self.table_sizes))
        object.__setattr__(self, "new_ids", tuple(int(v) for v in self.new_ids))
        if self.new_ids and (len(self.new_ids) != len(self.table_sizes) or min(self.new_ids) < 0):
            raise ValueError("new_ids needs one count >= 0 per table (or none)")
        if not (0 <= self.new_id_share <= 1 and 0 <= self.new_id_start <= 1):
            raise ValueError("need 0 <= new_id_share <= 1 and 0 <= new_id_start <= 1")
        if any(self.new_ids) and self.new_id_share == 0:
            raise ValueError("new_ids given but new_id_share is 0: no new id would be drawn")
        if self.feature_weights is not None:
            object.__setattr__(self, "feature_weights",
                               tuple(float(w) for w in self.feature_weights))
            if len(self.feature_weights) != len(self.table_sizes) or min(
                    self.feature_weights) < 0 or max(self.feature_weights) <= 0:
                raise ValueError("feature_weights needs one weight >= 0 per table, not all 0")
        pairs = self.interaction_pairs
        if pairs is None:
            half = len(self.table_sizes) // 2
            pairs = (((0, half), (1, 1 + half)) if len(self.table_sizes) >= 4
                     else ((0, 1),) if len(self.table_sizes) >= 2 else ())
        object.__setattr__(self, "interaction_pairs", tuple((int(f), int(g)) for f, g in pairs))
        if self.num_rows < 1 or not self.table_sizes or self.num_dense < 0:
            raise ValueError("need num_rows >= 1, at least one table and num_dense >= 0")
        if not all(1 <= v + n <= _MAX_TABLE_SIZE for v, n in zip(self.table_sizes, self.ids_added)):
            raise ValueError(f"table sizes (new ids included) must be in [1, {_MAX_TABLE_SIZE}]")
        if self.zipf_exponent <= 0 or self.latent_dim < 1:
            raise ValueError("need zipf_exponent > 0 and latent_dim >= 1")
        for f, g in self.interaction_pairs or ():
            if not (0 <= f < self.num_sparse and 0 <= g < self.num_sparse and f != g):
                raise ValueError(f"interaction pair {(f, g)} must name two different features "
                                 f"in [0, {self.num_sparse})")
        if not 0 < self.click_rate < 1 or not 0 <= self.dense_missing_rate < 1:
            raise ValueError("need 0 < click_rate < 1 and 0 <= dense_missing_rate < 1")
        if min(self.sparse_scale, self.interaction_scale, self.dense_scale) < 0:
            raise ValueError("scales must be >= 0")

    @property
    def num_sparse(self) -> int:
        return len(self.table_sizes)

    @property
    def ids_added(self) -> Tuple[int, ...]:
        """New ids per feature (all 0 without drift)."""
        return self.new_ids or (0,) * len(self.table_sizes)

    @property
    def first_new_row(self) -> int:
        """The first row that may draw a new id."""
        return int(round(self.new_id_start * self.num_rows))

    @property
    def schema(self) -> DataSchema:
        return DataSchema(tuple(f"I{j + 1}" for j in range(self.num_dense)),
                          tuple(f"C{f + 1}" for f in range(self.num_sparse)))


def zipf_ranks(u: np.ndarray, num_ids: int, exponent: float) -> np.ndarray:
    """Popularity ranks in [0, num_ids) from uniforms, by inverting the continuous power law
    x^-a on [0.5, num_ids + 0.5]: P(rank r) = integral over [r + 0.5, r + 1.5], close to
    (r + 1)^-a / H. O(1) memory, so any table size works.

    Example::

        >>> zipf_ranks(np.array([0.01, 0.5, 0.999]), 1000, 1.1).tolist()
        [0, 10, 988]
    """
    lo, hi = 0.5, num_ids + 0.5
    if abs(exponent - 1.0) < 1e-9:
        x = lo * (hi / lo) ** u
    else:
        e = 1.0 - exponent
        x = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)
    return np.clip(np.floor(x - 0.5), 0, num_ids - 1).astype(np.int64)


class SyntheticClickModel:
    """The planted generator: feature distributions and the click probability of a row.

    For row features (dense ``d``, raw ids ``i_f`` in [0, table_size_f))::

        logit = bias + sum_f s_f * e_f(i_f)                      per-id main effects
                     + sum_(f,g) s_p * <v_f(i_f), v_g(i_g)> / sqrt(k)  latent interactions
                     + sum_j b_j * d_j                            dense linear term
        P(click) = sigmoid(logit)

    ``e_f(i)`` and the ``k``-dim ``v_f(i)`` are standard normal, hashed from (seed, f, i), so
    popular and rare ids matter alike. Ids are drawn by popularity rank (``zipf_ranks``)
    then mapped through a per-feature affine bijection, so id order is not popularity order.

    Args:
        config (SyntheticConfig): the settings.
        seed (int): the seed; the model does not depend on ``config.num_rows``.

    Example::

        >>> m = SyntheticClickModel(SyntheticConfig(table_sizes=(1000, 10), num_dense=2), seed=0)
        >>> dense, ids = m.features(0, 5)
        >>> dense.shape, ids.shape, m.probabilities(dense, ids).shape
        ((5, 2), (5, 2), (5,))
    """

    def __init__(self, config: SyntheticConfig, seed: int = 0):
        self.config, self.seed = config, seed
        cfg = config
        weights = np.asarray(cfg.feature_weights or [1.0] * cfg.num_sparse)
        self.feature_scales: np.ndarray = cfg.sparse_scale * weights / np.linalg.norm(weights)
        self.pair_scale: float = (cfg.interaction_scale / math.sqrt(len(cfg.interaction_pairs))
                                  if cfg.interaction_pairs else 0.0)
        self._perm: List[Tuple[int, int]] = [self._permutation(f, v)
                                             for f, v in enumerate(cfg.table_sizes)]
        self._new_perm: List[Tuple[int, int]] = [self._permutation(f, v, "new")
                                                 for f, v in enumerate(cfg.ids_added) if v]
        didx = np.arange(cfg.num_dense, dtype=np.uint64)
        self.dense_log_mean: np.ndarray = 0.5 + 3.0 * uniform(didx, stream_key(seed, "dense_mu"))
        self.dense_log_std: np.ndarray = 0.5 + uniform(didx, stream_key(seed, "dense_sigma"))

        # Calibration rows fix the dense weights' scale and the bias from the model alone.
        rows = (_CALIBRATION_START, _CALIBRATION_START + _CALIBRATION_ROWS)
        dense, ids = self.features(*rows)
        raw = normal(didx, stream_key(seed, "dense_weight"))
        if cfg.num_dense:
            std = np.sqrt(np.sum((raw * dense.std(axis=0)) ** 2))
            self.dense_weights: np.ndarray = cfg.dense_scale * raw / max(std, 1e-12)
        else:
            self.dense_weights = raw
        self.bias = 0.0
        self.bias = _calibrate_bias(self.logits(dense, ids), cfg.click_rate)

    def _permutation(self, feature: int, num_ids: int, kind: str = "") -> Tuple[int, int]:
        """(multiplier, offset) of the bijection rank -> (m * rank + c) mod num_ids."""
        for attempt in itertools.count():
            m = stream_key(self.seed, kind + "perm", feature, attempt) % num_ids
            if math.gcd(m, num_ids) == 1:
                return m, stream_key(self.seed, kind + "offset", feature) % num_ids
        raise AssertionError("unreachable")

    def features(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """Features of rows ``start..stop-1``: dense float32 [n, num_dense] (log1p of
        log-normal counts, missing = 0) and raw ids int64 [n, num_sparse] (0-based)."""
        cfg, seed = self.config, self.seed
        rows = np.arange(start, stop, dtype=np.uint64)
        ids = np.empty((len(rows), cfg.num_sparse), dtype=np.int64)
        drifting = iter(self._new_perm)
        for f, num_ids in enumerate(cfg.table_sizes):
            ranks = zipf_ranks(uniform(rows, stream_key(seed, "zipf", f)), num_ids,
                               cfg.zipf_exponent)
            m, c = self._perm[f]
            ids[:, f] = (ranks * m + c) % num_ids  # < 2^62: no int64 overflow
            added = cfg.ids_added[f]
            if added:
                # Rows in [first_new_row, num_rows) draw a new id with probability new_id_share
                # (calibration rows, beyond num_rows, never do: the bias ignores the drift).
                m, c = next(drifting)
                new = ((rows >= cfg.first_new_row) & (rows < cfg.num_rows)
                       & (uniform(rows, stream_key(seed, "new", f)) < cfg.new_id_share))
                new_ranks = zipf_ranks(uniform(rows[new], stream_key(seed, "new_zipf", f)), added,
                                       cfg.zipf_exponent)
                ids[new, f] = num_ids + (new_ranks * m + c) % added
        counts = self.dense_counts(start, stop)
        dense = np.log1p(np.where(np.isnan(counts), 0.0, counts)).astype(np.float32)
        return dense, ids

    def dense_counts(self, start: int, stop: int) -> np.ndarray:
        """The raw dense counts of rows ``start..stop-1`` (``features`` holds their log1p),
        float64 [n, num_dense], NaN where missing."""
        cfg, seed = self.config, self.seed
        rows = np.arange(start, stop, dtype=np.uint64)
        counts = np.empty((len(rows), cfg.num_dense))
        for j in range(cfg.num_dense):
            z = normal(rows, stream_key(seed, "dense", j))
            counts[:, j] = np.floor(np.exp(self.dense_log_mean[j] + self.dense_log_std[j] * z))
            missing = uniform(rows, stream_key(seed, "missing", j)) < cfg.dense_missing_rate
            counts[missing, j] = np.nan
        return counts

    @property
    def term_names(self) -> List[str]:
        """Names of the columns of ``terms``."""
        schema = self.config.schema
        return ([f"effect_{n}" for n in schema.sparse_names]
                + [f"interaction_C{f + 1}_C{g + 1}" for f, g in self.config.interaction_pairs or ()]
                + [f"dense_{n}" for n in schema.dense_names])

    def terms(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The additive parts of the logit, float64 [n, len(term_names)]; logit = bias + sum."""
        cfg, seed = self.config, self.seed
        cols = [self.feature_scales[f] * normal(ids[:, f], stream_key(seed, "effect", f))
                for f in range(cfg.num_sparse)]
        for f, g in cfg.interaction_pairs or ():
            dot = sum(normal(ids[:, f], stream_key(seed, "latent", f, c))
                      * normal(ids[:, g], stream_key(seed, "latent", g, c))
                      for c in range(cfg.latent_dim))
            cols.append(self.pair_scale * dot / math.sqrt(cfg.latent_dim))
        cols += [self.dense_weights[j] * dense[:, j].astype(np.float64)
                 for j in range(cfg.num_dense)]
        return np.stack(cols, axis=1)

    def logits(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The planted logit of each row, float64 [n]."""
        return self.bias + self.terms(dense, ids).sum(axis=1)

    def probabilities(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The planted click probability of each row, float64 [n]."""
        return 1.0 / (1.0 + np.exp(-self.logits(dense, ids)))

    def labels(self, start: int, probabilities: np.ndarray) -> np.ndarray:
        """Bernoulli(probabilities) draws for rows ``start..``, float32 0/1."""
        rows = np.arange(start, start + len(probabilities), dtype=np.uint64)
        return (uniform(rows, stream_key(self.seed, "label")) < probabilities).astype(np.float32)


def _calibrate_bias(logits: np.ndarray, rate: float) -> float:
    """The b with mean(sigmoid(b + logits)) == rate (bisection; the mean is monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(mid + logits)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def split_sizes(num_rows: int, split: Sequence[float]) -> List[int]:
    """Rows per split for contiguous splitting: rounded fractions, the remainder to the last
    split with a non-zero fraction.

    Example::

        >>> split_sizes(1001, (0.8, 0.1, 0.1)), split_sizes(10, (0.9, 0.1, 0.0))
        ([801, 100, 100], [9, 1, 0])
    """
    fractions = check_fractions(split)
    sizes = [int(round(num_rows * f)) for f in fractions]
    last = max(i for i, f in enumerate(fractions) if f > 0)
    sizes[last] = num_rows - sum(sizes) + sizes[last]
    return sizes


def write_synthetic(config: SyntheticConfig, out_dir: str, *, seed: int, split: Sequence[float],
                    progress: bool, chunk_rows: int) -> Dict[str, Any]:
    """Generates ``config.num_rows`` rows into ``out_dir`` (the ``EncodedDataset`` layout plus
    ``probabilities.npy``) and returns the manifest body. Called by ``prepare_dataset``."""
    model = SyntheticClickModel(config, seed)
    sizes = split_sizes(config.num_rows, split)
    files = {}
    start = 0
    with tqdm(total=config.num_rows, desc="generating synthetic rows", unit=" rows",
              disable=not progress, mininterval=2.0) as bar:
        for s, n in zip(SPLITS, sizes):
            out = {"dense": open_array(out_dir, f"{s}/dense.npy", np.float32,
                                       (n, config.num_dense)),
                   "sparse": open_array(out_dir, f"{s}/sparse.npy", np.int32,
                                        (n, config.num_sparse)),
                   "labels": open_array(out_dir, f"{s}/labels.npy", np.float32, (n,)),
                   "probabilities": open_array(out_dir, f"{s}/probabilities.npy", np.float32,
                                               (n,))}
            for lo in range(0, n, chunk_rows):
                hi = min(lo + chunk_rows, n)
                dense, ids = model.features(start + lo, start + hi)
                p = model.probabilities(dense, ids)
                out["dense"][lo:hi] = dense
                out["sparse"][lo:hi] = ids + 1  # id 0 stays the (never drawn) OOV id
                out["probabilities"][lo:hi] = p
                out["labels"][lo:hi] = model.labels(start + lo, p)
                bar.update(hi - lo)
            for name, array in out.items():
                files[f"{s}/{name}.npy"] = close_array(out_dir, f"{s}/{name}.npy", array)
            start += n
    schema = config.schema
    return {
        "schema": schema.to_dict(),
        "num_rows": dict(zip(SPLITS, sizes)),
        "num_embeddings": {name: v + n + 1 for name, v, n in zip(
            schema.sparse_names, config.table_sizes, config.ids_added)},
        "synthetic": {"config": asdict(config), "seed": seed, "bias": model.bias,
                      "feature_scales": model.feature_scales.tolist(),
                      "dense_weights": model.dense_weights.tolist()},
        "files": files,
    }
