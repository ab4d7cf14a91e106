"""The memory budget allocator: which tables to compress, with which M and K, to fit a ratio.

Pure numerics (no process groups): per-table options with their bytes (as
``QuantizedEmbeddingBagCollection.memory_report()`` counts them) and an estimate of their
traffic-weighted reconstruction error go in; the choice per table that minimises the summed
error within the byte budget comes out (a multiple-choice knapsack, solved exactly by dynamic
programming over the budget cut into ``BUDGET_UNITS`` units).
"""
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from torchrec_mec.modules.quantized_embedding_configs import code_dtype
from torchrec_mec.quantize.config import MECConfig
from torchrec_mec.quantize.kmeans import kmeans, nearest_codewords, weighted_rows
from torchrec_mec.quantize.quantize_table import row_weights
from torchrec_mec.quantize.driver import table_seed
from torchrec_mec.quantize.threads import one_thread

BUDGET_UNITS = 1 << 14
"""A budget of more bytes is cut into this many units (a smaller one into bytes); an option's
bytes are rounded up to whole units, so a plan always fits, and it spends at least
``1 - tables / BUDGET_UNITS`` of what it could."""

DEFAULT_CODEBOOK_SIZES: Tuple[int, ...] = (16, 64, 256)
"""Codebook sizes the allocator considers by default: all with one-byte codes (K <= 256)."""

ESTIMATE_POINTS_PER_CENTROID = 64
"""Sample draws per codeword of the largest K in :func:`estimate_errors`."""

SMALL_K_SAVING = 0.05
"""A smaller K of the same code width is a candidate only if it saves this share of bytes."""

EstimateMemo = MutableMapping[Tuple[Any, ...], "TableOption"]
"""Error estimates of :func:`plan_tables` kept for later plans of the same tables (the same
weights and counts): ``(table, rows, dim, weighting, seed, sample rows, M, K) -> option``."""


class BudgetError(ValueError):
    """A memory budget that no choice of options meets; names the smallest reachable ratio.

    Example::

        >>> tables = {"t": TableCosts(1000, (TableOption(2, 256, 100, 1.0),))}
        >>> try:
        ...     allocate(tables, target_ratio=20)
        ... except BudgetError as e:
        ...     print(e)
        target ratio 20 cannot be met: the smallest embedding memory reachable is 100 B, 10.0x
        smaller than the float32 baseline of 1000 B (every table at its smallest option)
    """


@dataclass(frozen=True)
class TableOption:
    """One way to store a table.

    Args:
        num_subspaces (int): M; 0 for the full (uncompressed) table.
        codebook_size (int): K; 0 for the full table.
        bytes (int): memory of the table stored this way.
        error (float): estimated traffic-weighted squared reconstruction error per lookup
            (``sum_i n_i ||e_i - q_i||^2 / sum_i n_i``); 0 for the full table.

    Example::

        >>> TableOption(4, 256, bytes=4 * 1000 + 256 * 64 * 4, error=0.1).compressed
        True
    """

    num_subspaces: int
    codebook_size: int
    bytes: int
    error: float

    @property
    def compressed(self) -> bool:
        return self.codebook_size > 0


@dataclass(frozen=True)
class TableCosts:
    """A table's float32 size and its compressed options.

    Args:
        baseline_bytes (int): the float32 full table (``rows x dim x 4``); keeping the table
            full is always an option, of error 0.
        options (Tuple[TableOption, ...]): compressed options (may be empty).

    Example::

        >>> costs = TableCosts(1000, (TableOption(1, 16, 100, 0.5),))
        >>> [o.bytes for o in costs.all_options()]
        [1000, 100]
    """

    baseline_bytes: int
    options: Tuple[TableOption, ...] = ()

    def all_options(self) -> List[TableOption]:
        """The full table first, then the compressed options."""
        return [TableOption(0, 0, self.baseline_bytes, 0.0), *self.options]


def table_bytes(num_rows: int, dim: int, num_subspaces: int, codebook_size: int) -> int:
    """Bytes of a table as ``QuantizedEmbeddingBagCollection.memory_report()`` counts them: codes
    ``rows x M`` of ``code_dtype(K)`` plus float32 codebooks ``K x dim``; or, for
    ``codebook_size=0``, the float32 table ``rows x dim x 4``.

    Example::

        >>> table_bytes(100_000, 64, 4, 256), table_bytes(100_000, 64, 0, 0)
        (465536, 25600000)
    """
    if codebook_size == 0:
        return num_rows * dim * 4
    itemsize = torch.empty(0, dtype=code_dtype(codebook_size)).element_size()
    return num_rows * num_subspaces * itemsize + codebook_size * dim * 4


def candidate_shapes(
    num_rows: int, dim: int, codebook_sizes: Sequence[int] = DEFAULT_CODEBOOK_SIZES
) -> List[Tuple[int, int]]:
    """The (M, K) worth considering for a table: M any divisor of ``dim``, K in
    ``codebook_sizes`` and at most ``num_rows``, stored in fewer bytes than the full table.
    A K smaller than the largest K of the same code width (one or two bytes) saves only
    codebook bytes, so it is kept only where that saves at least ``SMALL_K_SAVING`` of the
    larger option's bytes (small tables, whose codebooks weigh as much as their codes).

    Example::

        >>> candidate_shapes(1000, 4, codebook_sizes=(16, 256))
        [(1, 16), (1, 256), (2, 16), (2, 256), (4, 16), (4, 256)]
        >>> candidate_shapes(10**6, 4, codebook_sizes=(16, 256))  # codebooks weigh nothing
        [(1, 256), (2, 256), (4, 256)]
        >>> candidate_shapes(10, 4)  # K > rows: nothing to gain
        []
    """
    full = table_bytes(num_rows, dim, 0, 0)
    sizes = sorted(k for k in codebook_sizes if k <= num_rows)
    out = []
    for m in range(1, dim + 1):
        if dim % m:
            continue
        for k in sizes:
            largest = max(j for j in sizes if code_dtype(j) == code_dtype(k))
            nbytes = table_bytes(num_rows, dim, m, k)
            if nbytes >= full or (
                    k < largest and table_bytes(num_rows, dim, m, largest) - nbytes
                    < SMALL_K_SAVING * table_bytes(num_rows, dim, m, largest)):
                continue
            out.append((m, k))
    return out


@torch.no_grad()
def estimate_errors(
    weight: torch.Tensor,
    counts: torch.Tensor,
    shapes: Sequence[Tuple[int, int]],
    *,
    fit_weights: Optional[torch.Tensor] = None,
    points_per_centroid: int = ESTIMATE_POINTS_PER_CENTROID,
    kmeans_iters: int = 10,
    generator: Optional[torch.Generator] = None,
    sample_rows: Optional[int] = None,
) -> List[TableOption]:
    """Each shape's bytes and its traffic-weighted squared error per lookup, measured cheaply:
    weighted k-means product quantization on a sample of the table, scored on an independent
    draw of rows by traffic (the id counts).

    With S = ``sample_rows`` (default ``points_per_centroid`` x the largest K of ``shapes``),
    the k-means uses the rows of positive ``fit_weights`` (default: the counts, MEC's traffic
    weighting) with their weights if there are at most S of them, else S draws by weight (each
    distinct row weighted by how often it was drawn); the error is the weighted mean over S
    other draws by count (all rows seen in training, weighted exactly, if there are at most
    S). A table no row of which was seen is scored by uniform traffic. Each shape's k-means
    draws from its own generator, seeded from ``generator`` and (M, K), so a shape's estimate
    does not depend on which other shapes are estimated with it.

    Args:
        weight (Tensor): [N, D] the table.
        counts (Tensor): [N] training counts (the traffic).
        shapes (Sequence[Tuple[int, int]]): (M, K) pairs to estimate.
        fit_weights (Optional[Tensor]): [N] the quantizer's row weights (default: counts).
        points_per_centroid (int): sample draws per codeword of the largest K.
        kmeans_iters (int): Lloyd iterations per estimate.
        generator (Optional[torch.Generator]): source of the draws (default: seed 0).
        sample_rows (Optional[int]): S, the size of both samples (default: above).

    Returns:
        List[TableOption]: one per shape, in order.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> table, counts = torch.randn(2000, 8, generator=g), torch.randint(0, 50, (2000,))
        >>> opts = estimate_errors(table, counts, [(2, 16), (4, 16)], generator=g)
        >>> [o.bytes for o in opts], opts[0].error > opts[1].error > 0
        ([4512, 8512], True)
    """
    generator = generator or torch.Generator().manual_seed(0)
    n, dim = weight.shape
    traffic = counts.double()
    if not float(traffic.sum()) > 0:
        traffic = torch.ones(n, dtype=torch.float64)
    fit = traffic if fit_weights is None else fit_weights.double()
    if not float(fit.sum()) > 0:
        fit = torch.ones(n, dtype=torch.float64)
    if sample_rows is None:
        sample_rows = points_per_centroid * max((k for _, k in shapes), default=1)
    fit_rows, fit_w = weighted_rows(fit, sample_rows, generator)
    score_rows, score_w = weighted_rows(traffic, sample_rows, generator)
    kmeans_seed = int(torch.randint(1 << 62, (), generator=generator))
    # Standardised as the quantizer does, so k-means sees well-scaled numbers.
    p = (fit_w / fit_w.sum()).float().unsqueeze(1)
    x = weight[fit_rows].float()
    mean = (p * x).sum(0)
    scale = float((p * (x - mean).pow(2)).sum(0).mean().sqrt())
    scale = scale if scale > 0 else 1.0
    x = (x - mean) / scale
    y = (weight[score_rows].float() - mean) / scale
    out = []
    for m, k in shapes:
        shape_generator = torch.Generator().manual_seed(table_seed(kmeans_seed, f"{m}x{k}"))
        codebooks, _ = kmeans(x, k, m, kmeans_iters, shape_generator, fit_w.float())
        codes = nearest_codewords(y, codebooks)
        recon = codebooks[torch.arange(m), codes].flatten(1)
        err = (y - recon).pow(2).sum(1).double() * scale**2
        out.append(TableOption(m, k, table_bytes(n, dim, m, k),
                               float((err * score_w).sum() / score_w.sum())))
    return out


def check_ratio(
    sizes: Mapping[str, Tuple[int, int]],
    target_ratio: float,
    codebook_sizes: Sequence[int] = DEFAULT_CODEBOOK_SIZES,
) -> None:
    """Raises :class:`BudgetError` if no plan of :func:`plan_tables` can reach
    ``target_ratio`` for tables of these (rows, dim): a check on sizes alone, before any error
    is estimated.

    Example::

        >>> check_ratio({"t": (100_000, 64)}, target_ratio=200)  # 1 byte a row: 250x at most
        >>> try:
        ...     check_ratio({"t": (100_000, 64)}, target_ratio=300)
        ... except BudgetError as e:
        ...     print(str(e).split(":")[1])
         the smallest embedding memory reachable is 104096 B, 245.9x smaller than the float32
         baseline of 25600000 B (every table at its smallest option)
    """
    _smallest_fits(_size_costs(sizes, codebook_sizes), target_ratio)


def affordable_shapes(
    sizes: Mapping[str, Tuple[int, int]],
    target_ratio: float,
    codebook_sizes: Sequence[int] = DEFAULT_CODEBOOK_SIZES,
) -> Dict[str, List[Tuple[int, int]]]:
    """Per table of these (rows, dim), the candidate shapes (:func:`candidate_shapes`) that
    fit the budget with every other table at its smallest option. :func:`allocate` never
    chooses the others (no plan within the budget holds them), so their errors need not be
    estimated: with many tables and a high ratio, that is most large-M shapes.

    Raises:
        BudgetError: as :func:`check_ratio`.

    Example::

        >>> sizes = {"a": (10_000, 8), "b": (10_000, 8)}  # 320,000 B of float32 tables
        >>> affordable_shapes(sizes, target_ratio=10, codebook_sizes=(256,))["a"]  # 32,000 B
        [(1, 256), (2, 256)]
        >>> candidate_shapes(10_000, 8, codebook_sizes=(256,))
        [(1, 256), (2, 256), (4, 256), (8, 256)]
    """
    costs = _size_costs(sizes, codebook_sizes)
    _smallest_fits(costs, target_ratio)
    budget = sum(t.baseline_bytes for t in costs.values()) / target_ratio
    smallest = {name: min(o.bytes for o in t.all_options()) for name, t in costs.items()}
    others = sum(smallest.values())
    return {name: [(o.num_subspaces, o.codebook_size) for o in t.options
                   if o.bytes + others - smallest[name] <= budget]
            for name, t in costs.items()}


def _size_costs(sizes: Mapping[str, Tuple[int, int]], codebook_sizes: Sequence[int]
                ) -> Dict[str, TableCosts]:
    """Every table's candidate options by bytes alone (errors 0)."""
    return {name: TableCosts(table_bytes(n, dim, 0, 0), tuple(
        TableOption(m, k, table_bytes(n, dim, m, k), 0.0)
        for m, k in candidate_shapes(n, dim, codebook_sizes)))
        for name, (n, dim) in sizes.items()}


def _smallest_fits(tables: Mapping[str, TableCosts], target_ratio: float) -> None:
    if not tables:
        raise ValueError("allocate: no tables")
    if not target_ratio >= 1:
        raise ValueError(f"target ratio must be >= 1, got {target_ratio}")
    baseline = sum(t.baseline_bytes for t in tables.values())
    smallest = sum(min(o.bytes for o in t.all_options()) for t in tables.values())
    if smallest > baseline / target_ratio:
        raise BudgetError(
            f"target ratio {target_ratio:g} cannot be met: the smallest embedding memory "
            f"reachable is {smallest} B, {baseline / smallest:.1f}x smaller than the float32 "
            f"baseline of {baseline} B (every table at its smallest option)")


def allocate(tables: Mapping[str, TableCosts], target_ratio: float) -> Dict[str, TableOption]:
    """The option per table that minimises the summed error with total bytes at most the
    float32 baseline (the sum of ``baseline_bytes``) divided by ``target_ratio``.

    Exact up to rounding each option's bytes up to a whole unit of ``budget / BUDGET_UNITS``
    (exact for budgets of at most ``BUDGET_UNITS`` bytes); the plan always fits. Among plans of
    least error the one of fewest units wins. Keeping a table full is an option of every
    table.

    Args:
        tables (Mapping[str, TableCosts]): per table, its baseline and compressed options.
        target_ratio (float): baseline bytes / allowed bytes, >= 1.

    Returns:
        Dict[str, TableOption]: the chosen option per table.

    Raises:
        BudgetError: even the smallest option of every table exceeds the budget; the message
            names the smallest reachable ratio.
        ValueError: ``target_ratio`` < 1 or no tables.

    Example::

        >>> tables = {"big": TableCosts(10_000, (TableOption(1, 16, 1_000, 4.0),
        ...                                      TableOption(2, 16, 2_000, 1.0))),
        ...           "small": TableCosts(1_000, (TableOption(1, 16, 200, 3.0),))}
        >>> plan = allocate(tables, target_ratio=11_000 / 3_000)
        >>> {t: (o.num_subspaces, o.bytes) for t, o in plan.items()}
        {'big': (2, 2000), 'small': (0, 1000)}
    """
    _smallest_fits(tables, target_ratio)
    budget = sum(t.baseline_bytes for t in tables.values()) / target_ratio
    names = sorted(tables)
    options = {name: _frontier(tables[name].all_options()) for name in names}
    capacity = min(BUDGET_UNITS, math.floor(budget))
    unit = budget / BUDGET_UNITS if capacity == BUDGET_UNITS else 1.0
    # best[c]: least error of the tables so far within c units; choice[t][c]: option index.
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    choices = []
    for name in names:
        opts = options[name]
        new = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
        pick = torch.full((capacity + 1,), -1, dtype=torch.long)
        for i, opt in enumerate(opts):
            cost = math.ceil(opt.bytes / unit - 1e-9)
            if cost > capacity:
                continue
            cand = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
            cand[cost:] = best[: capacity + 1 - cost] + opt.error
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        choices.append(pick)
    if not math.isfinite(float(best[capacity])):
        # Rounding up lost the last few units: the smallest options fit, take them.
        return {name: options[name][0] for name in names}
    plan: Dict[str, TableOption] = {}
    # best[] does not increase with c: the fewest units that reach the least error.
    c = int((best <= best[capacity]).nonzero()[0])
    for name, pick in zip(reversed(names), reversed(choices)):
        opt = options[name][int(pick[c])]
        plan[name] = opt
        c -= math.ceil(opt.bytes / unit - 1e-9)
    return dict(sorted(plan.items()))


def _frontier(options: Sequence[TableOption]) -> List[TableOption]:
    """Options that no other option beats in both bytes and error, by bytes ascending."""
    out: List[TableOption] = []
    for opt in sorted(options, key=lambda o: (o.bytes, o.error)):
        if not out or opt.error < out[-1].error:
            out.append(opt)
    return out


def plan_tables(
    tables: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    config: MECConfig,
    target_ratio: float,
    *,
    codebook_sizes: Sequence[int] = DEFAULT_CODEBOOK_SIZES,
    progress: bool = True,
    sizes: Optional[Mapping[str, Tuple[int, int]]] = None,
    memo: Optional[EstimateMemo] = None,
    table_weights: Optional[Mapping[str, float]] = None,
) -> Dict[str, TableOption]:
    """Decides for every table whether to compress it and with which M and K, so that all
    tables together take at most their float32 size / ``target_ratio``, spending bytes where
    they cut the traffic-weighted error most (each table's error times its weight in
    ``table_weights``, if given: e.g. the model's sensitivity to the table,
    ``torchrec_mec.pipeline.sensitivity``).

    Each table's candidates that can fit the budget (:func:`affordable_shapes`) get an error
    estimate (:func:`estimate_errors`, k-means fitted with ``config.weighting``'s row weights,
    seeded by ``table_seed(config.seed, name)``, sampled for the largest K of all its
    :func:`candidate_shapes`; on one torch thread, :func:`~torchrec_mec.quantize.threads
    .one_thread`), then :func:`allocate` picks one option per table: the plan :func:`allocate`
    makes from the estimates of all candidates.

    An estimate depends on the table (its rows and counts), the weighting, the seed, the sample
    size and its own shape alone (:func:`estimate_errors`: not on the other shapes estimated
    with it), so plans at several ratios, or of methods of the same weighting, can share them
    through ``memo`` and get the same plans as without it.

    Args:
        tables (Mapping[str, Tuple[Tensor, Tensor]]): name -> (weight [N, D], counts [N]).
        config (MECConfig): the quantizer that will run (its weighting and seed are used).
        target_ratio (float): float32 bytes / allowed bytes.
        codebook_sizes (Sequence[int]): the K considered.
        progress (bool): show a progress bar over tables.
        sizes (Optional[Mapping[str, Tuple[int, int]]]): every table's (rows, dim), when
            ``tables`` loads tables on access (else read from the weights).
        memo (Optional[EstimateMemo]): estimates of earlier plans of these same tables
            (weights and counts: one memo per set of tables), used instead of estimating
            again; the new ones are added. A table all of whose shapes are in it is not read.
        table_weights (Optional[Mapping[str, float]]): per table, a finite weight >= 0 of its
            error in the sum :func:`allocate` minimises (None: all 1).

    Returns:
        Dict[str, TableOption]: per table; ``codebook_size == 0`` means kept full. Each
        option's ``error`` is the estimate itself, not weighted.

    Raises:
        BudgetError: the ratio cannot be reached; names the smallest one that can.
        ValueError: ``table_weights`` misses a table or holds a negative or non-finite weight
            (names the table).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> tables = {"big": (torch.randn(5000, 8, generator=g), torch.randint(0, 9, (5000,))),
        ...           "tiny": (torch.randn(20, 8, generator=g), torch.randint(0, 9, (20,)))}
        >>> plan = plan_tables(tables, MECConfig(), target_ratio=8, progress=False)
        >>> plan["tiny"].compressed, plan["big"].compressed
        (False, True)
        >>> sum(o.bytes for o in plan.values()) <= 5020 * 8 * 4 / 8
        True
    """
    if sizes is None:
        sizes = {name: (int(w.shape[0]), int(w.shape[1])) for name, (w, _) in tables.items()}
    if table_weights is not None:
        for name in sorted(tables):
            factor = table_weights.get(name)
            if factor is None or not (math.isfinite(factor) and factor >= 0):
                raise ValueError(f"table {name!r}: table weight must be finite and >= 0, got "
                                 f"{factor!r}")
    affordable = affordable_shapes(sizes, target_ratio, codebook_sizes)
    costs: Dict[str, TableCosts] = {}
    raw: Dict[str, Dict[Tuple[int, int], TableOption]] = {}
    memo = {} if memo is None else memo
    for name in tqdm(sorted(tables), desc="plan: estimating errors", unit="table",
                     disable=not progress, leave=False):
        n, dim = sizes[name]
        options: Tuple[TableOption, ...] = ()
        if affordable[name]:
            largest_k = max(k for _, k in candidate_shapes(n, dim, codebook_sizes))
            sample_rows = ESTIMATE_POINTS_PER_CENTROID * largest_k
            keys = {shape: (name, n, dim, config.weighting, config.seed, sample_rows, *shape)
                    for shape in affordable[name]}
            todo = [shape for shape in affordable[name] if keys[shape] not in memo]
            if todo:
                weight, counts = tables[name]
                generator = torch.Generator().manual_seed(table_seed(config.seed, name))
                with one_thread():
                    found = estimate_errors(
                        weight, counts, todo, fit_weights=row_weights(counts, config.weighting),
                        generator=generator, sample_rows=sample_rows)
                memo.update((keys[shape], option) for shape, option in zip(todo, found))
            options = tuple(memo[keys[shape]] for shape in affordable[name])
        raw[name] = {(o.num_subspaces, o.codebook_size): o for o in options}
        if table_weights is not None:
            options = tuple(replace(o, error=o.error * table_weights[name]) for o in options)
        costs[name] = TableCosts(table_bytes(n, dim, 0, 0), options)
    plan = allocate(costs, target_ratio)
    return {name: raw[name].get((o.num_subspaces, o.codebook_size), o)
            for name, o in plan.items()}
