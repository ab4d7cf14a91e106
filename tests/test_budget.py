"""The memory budget allocator, alone: fits the budget, is optimal, names impossible budgets."""
import itertools
import math
import random
import re

import pytest
import torch

from torchrec_mec.modules import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.quantize import MECConfig, budget, quantize_table
from torchrec_mec.quantize.budget import (
    BUDGET_UNITS,
    BudgetError,
    TableCosts,
    TableOption,
    affordable_shapes,
    allocate,
    candidate_shapes,
    estimate_errors,
    plan_tables,
    table_bytes,
)
from torchrec_mec.quantize.driver import table_seed
from torchrec_mec.quantize.quantize_table import row_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def brute_force(tables, budget):
    """Least summed error over every combination of options within ``budget`` bytes."""
    names = sorted(tables)
    best = math.inf
    for combo in itertools.product(*(tables[n].all_options() for n in names)):
        if sum(o.bytes for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


def random_tables(rng: random.Random, max_bytes: int):
    tables = {}
    for t in range(rng.randint(1, 5)):
        full = rng.randint(max_bytes // 10, max_bytes)
        options = []
        for _ in range(rng.randint(0, 3)):
            options.append(TableOption(rng.choice([1, 2, 4]), rng.choice([16, 256]),
                                       rng.randint(1, full - 1), rng.uniform(0.0, 5.0)))
        tables[f"t{t}"] = TableCosts(full, tuple(options))
    return tables


def test_hand_computed_case():
    # Budget 3,000 B of a 12,000 B baseline (ratio 4). By hand, every plan within 3,000 B:
    #   a full (8,000) never fits; a@1x16 (1,000, err 6) or a@2x16 (2,000, err 2);
    #   b full (1,000, err 0) or b@1x16 (300, err 1); c full (3,000) never fits with a, so
    #   c@1x16 (200, err 4) or c@2x16 (700, err 1.5).
    #   a2 + b full + c1 = 3,200 > 3,000;  a2 + b1 + c2 = 3,000, err 2 + 1 + 1.5 = 4.5;
    #   a2 + b1 + c1 = 2,500, err 7;  a1 + b full + c2 = 2,700, err 7.5;  a1 + b1 + c2 = 2,000,
    #   err 8.5. Best: a@2x16, b@1x16, c@2x16 with error 4.5.
    tables = {
        "a": TableCosts(8_000, (TableOption(1, 16, 1_000, 6.0), TableOption(2, 16, 2_000, 2.0))),
        "b": TableCosts(1_000, (TableOption(1, 16, 300, 1.0),)),
        "c": TableCosts(3_000, (TableOption(1, 16, 200, 4.0), TableOption(2, 16, 700, 1.5))),
    }
    plan = allocate(tables, target_ratio=4.0)
    assert {t: (o.num_subspaces, o.codebook_size) for t, o in plan.items()} == {
        "a": (2, 16), "b": (1, 16), "c": (2, 16)}
    assert sum(o.bytes for o in plan.values()) == 3_000
    # A generous budget keeps everything full; a tight one takes the smallest options.
    assert all(not o.compressed for o in allocate(tables, target_ratio=1.0).values())
    tight = allocate(tables, target_ratio=12_000 / 1_500)
    assert [o.bytes for o in tight.values()] == [1_000, 300, 200]


@pytest.mark.parametrize("seed", range(40))
def test_random_tables_fit_the_budget_and_match_brute_force(seed):
    rng = random.Random(seed)
    # Small budgets are solved in whole bytes: the plan must be the exact optimum.
    tables = random_tables(rng, max_bytes=4_000)
    baseline = sum(t.baseline_bytes for t in tables.values())
    smallest = sum(min(o.bytes for o in t.all_options()) for t in tables.values())
    ratio = baseline / rng.uniform(smallest, baseline)
    budget = baseline / ratio
    assert budget <= BUDGET_UNITS
    plan = allocate(tables, ratio)
    assert set(plan) == set(tables)
    assert sum(o.bytes for o in plan.values()) <= budget
    assert math.isclose(sum(o.error for o in plan.values()), brute_force(tables, budget),
                        abs_tol=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_large_budgets_fit_and_lose_at_most_the_rounding(seed):
    rng = random.Random(1000 + seed)
    tables = random_tables(rng, max_bytes=10**9)
    baseline = sum(t.baseline_bytes for t in tables.values())
    smallest = sum(min(o.bytes for o in t.all_options()) for t in tables.values())
    ratio = baseline / rng.uniform(smallest, baseline)
    budget = baseline / ratio
    plan = allocate(tables, ratio)
    assert sum(o.bytes for o in plan.values()) <= budget
    # Each option's bytes round up by less than one unit: at worst the plan is the optimum of a
    # budget smaller by one unit per table.
    shrunk = budget * (1 - len(tables) / BUDGET_UNITS)
    assert sum(o.error for o in plan.values()) <= brute_force(tables, shrunk) + 1e-9


def test_impossible_budget_names_the_smallest_reachable_ratio():
    tables = {"a": TableCosts(6_400, (TableOption(1, 16, 500, 3.0),)),
              "b": TableCosts(640, ())}  # too small to compress: stays full
    smallest = 500 + 640
    with pytest.raises(BudgetError, match="target ratio 20 cannot be met") as err:
        allocate(tables, target_ratio=20)
    reachable = float(re.search(r"([0-9.]+)x smaller", str(err.value)).group(1))
    assert reachable == round(7_040 / smallest, 1)
    # ... and that ratio itself is met.
    plan = allocate(tables, target_ratio=7_040 / smallest)
    assert sum(o.bytes for o in plan.values()) == smallest
    with pytest.raises(ValueError, match=">= 1"):
        allocate(tables, target_ratio=0.5)


@pytest.mark.parametrize("m, k", [(1, 16), (4, 256), (2, 300)])
def test_table_bytes_is_what_the_qebc_reports(m, k):
    rows, dim = 1_000, 8
    qebc = QuantizedEmbeddingBagCollection([
        QuantizedEmbeddingBagConfig(name="c", num_embeddings=rows, embedding_dim=dim,
                                    feature_names=["f"], num_subspaces=m, codebook_size=k),
        QuantizedEmbeddingBagConfig(name="f", num_embeddings=rows, embedding_dim=dim,
                                    feature_names=["g"])])
    report = qebc.memory_report().tables
    assert table_bytes(rows, dim, m, k) == report["c"].total_bytes
    assert table_bytes(rows, dim, 0, 0) == report["f"].total_bytes == report["c"].baseline_bytes


def test_candidate_shapes_are_divisors_smaller_than_the_full_table():
    shapes = candidate_shapes(300, 8, codebook_sizes=(16, 256))
    assert {m for m, _ in shapes} <= {1, 2, 4, 8}
    assert all(k <= 300 and table_bytes(300, 8, m, k) < 300 * 8 * 4 for m, k in shapes)
    # 256 codewords of 8 floats (8 KiB) outweigh a 300-row full table (9.4 KiB) once codes add up
    assert (8, 256) not in shapes and (1, 16) in shapes


def test_estimates_track_the_quantizers_traffic_error():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    weight = torch.randn(n, 8, generator=g) * torch.rand(n, 1, generator=g)
    counts = (1e5 / torch.arange(1, n + 1).double() ** 1.1).floor().long()[torch.randperm(n, generator=g)]
    shapes = [(1, 16), (2, 64), (4, 256)]
    est = estimate_errors(weight, counts, shapes)
    errors = [o.error for o in est]
    assert errors[0] > errors[1] > errors[2] > 0
    for (m, k), opt in zip(shapes, est):
        cfg = MECConfig(num_subspaces=m, codebook_size=k, weighting="traffic", epochs=0)
        res = quantize_table(weight, counts, cfg, progress=False)
        # per lookup, summed over the D dims (traffic_mse is per element)
        actual = res.stats.traffic_mse * 8
        assert abs(opt.error - actual) < 0.2 * actual, (m, k, opt.error, actual)


def test_affordable_shapes_drop_only_shapes_no_plan_can_hold():
    sizes = {"a": (5_000, 8), "b": (3_000, 8), "c": (40, 8), "d": (10, 8)}
    ratio = 12.0
    budget = sum(n * d * 4 for n, d in sizes.values()) / ratio
    affordable = affordable_shapes(sizes, ratio, codebook_sizes=(16, 256))
    smallest = {t: min([table_bytes(n, d, 0, 0)] + [table_bytes(n, d, m, k) for m, k in
                                                      candidate_shapes(n, d, (16, 256))])
                for t, (n, d) in sizes.items()}
    for t, (n, d) in sizes.items():
        others = sum(smallest.values()) - smallest[t]
        for m, k in candidate_shapes(n, d, (16, 256)):
            # kept exactly when it fits beside every other table at its smallest option
            assert ((m, k) in affordable[t]) == (table_bytes(n, d, m, k) + others <= budget)
    assert affordable["a"] and len(affordable["a"]) < len(candidate_shapes(5_000, 8, (16, 256)))
    with pytest.raises(BudgetError, match="cannot be met"):
        affordable_shapes(sizes, 1_000.0)


def test_an_estimate_does_not_depend_on_the_other_shapes():
    g = torch.Generator().manual_seed(3)
    weight, counts = torch.randn(3_000, 8, generator=g), torch.randint(0, 20, (3_000,))
    shapes = [(1, 16), (2, 64), (4, 16)]
    together = estimate_errors(weight, counts, shapes, sample_rows=2_000,
                               generator=torch.Generator().manual_seed(1))
    for shape, expected in zip(shapes, together):
        alone = estimate_errors(weight, counts, [shape], sample_rows=2_000,
                                generator=torch.Generator().manual_seed(1))
        assert alone == [expected]


@pytest.mark.parametrize("ratio", [4.0, 10.0, 16.0])
def test_plan_tables_equals_the_allocation_over_every_candidate(ratio):
    # Reference: estimate every candidate shape (no pruning), then allocate.
    g = torch.Generator().manual_seed(0)
    tables = {name: (torch.randn(n, 8, generator=g), torch.randint(0, 30, (n,)))
              for name, n in {"big": 2_000, "mid": 600, "small": 200, "tiny": 12}.items()}
    config, sizes = MECConfig(), (16, 64)
    costs = {}
    for name, (w, c) in tables.items():
        shapes = candidate_shapes(*w.shape, codebook_sizes=sizes)
        options = estimate_errors(
            w, c, shapes, fit_weights=row_weights(c, config.weighting),
            generator=torch.Generator().manual_seed(table_seed(config.seed, name)),
            sample_rows=64 * max(k for _, k in shapes)) if shapes else []
        costs[name] = TableCosts(table_bytes(*w.shape, 0, 0), tuple(options))
    plan = plan_tables(tables, config, ratio, codebook_sizes=sizes, progress=False)
    assert plan == allocate(costs, ratio)
    assert any(o.compressed for o in plan.values())
    # ... where, at the higher ratios, some candidates were not estimated (pruned)
    affordable = affordable_shapes({t: tuple(w.shape) for t, (w, _) in tables.items()}, ratio,
                                   sizes)
    pruned = sum(len(c.options) for c in costs.values()) - sum(map(len, affordable.values()))
    assert pruned > 0 if ratio >= 10 else pruned == 0


def test_plans_share_estimates_through_a_memo(monkeypatch):
    # Reference: each plan made alone, without a memo.
    g = torch.Generator().manual_seed(0)
    tables = {name: (torch.randn(n, 8, generator=g), torch.randint(0, 30, (n,)))
              for name, n in {"big": 2_000, "mid": 600, "small": 200}.items()}
    sizes, shapes = (16, 64), {t: tuple(w.shape) for t, (w, _) in tables.items()}
    estimated = []
    real = budget.estimate_errors

    def counting(weight, counts, todo, **kwargs):
        estimated.extend(todo)
        return real(weight, counts, todo, **kwargs)

    mec, pq = MECConfig(), MECConfig().for_method("kmeans_pq")
    alone = {(c.weighting, r): plan_tables(tables, c, r, codebook_sizes=sizes, progress=False)
             for c in (mec, pq) for r in (4.0, 10.0)}
    monkeypatch.setattr(budget, "estimate_errors", counting)
    memo: dict = {}
    assert plan_tables(tables, mec, 10.0, codebook_sizes=sizes, progress=False,
                       memo=memo) == alone[("traffic", 10.0)]
    assert len(estimated) == len(memo) == sum(map(len, affordable_shapes(shapes, 10.0,
                                                                         sizes).values()))
    estimated.clear()
    # 4x affords more shapes than 10x: only those are estimated, and the plan is unchanged.
    assert plan_tables(tables, mec, 4.0, codebook_sizes=sizes, progress=False,
                       memo=memo) == alone[("traffic", 4.0)]
    wider, narrower = affordable_shapes(shapes, 4.0, sizes), affordable_shapes(shapes, 10.0, sizes)
    new = sum(len(set(wider[t]) - set(narrower[t])) for t in tables)
    assert 0 < len(estimated) == new < sum(map(len, wider.values()))
    estimated.clear()
    assert plan_tables(tables, mec, 10.0, codebook_sizes=sizes, progress=False,
                       memo=memo) == alone[("traffic", 10.0)]
    assert estimated == []  # every estimate known
    # Another weighting (k-means PQ's uniform) is estimated anew and planned as alone.
    assert plan_tables(tables, pq, 10.0, codebook_sizes=sizes, progress=False,
                       memo=memo) == alone[("uniform", 10.0)]
    assert len(estimated) == sum(map(len, narrower.values()))


def _twin_tables():
    """Two tables of the same size and kind of rows."""
    g = torch.Generator().manual_seed(0)
    return {name: (torch.randn(2_000, 8, generator=g), torch.randint(1, 30, (2_000,)))
            for name in ("a", "b")}


def test_table_weights_move_bytes_to_the_weighted_table():
    tables, sizes = _twin_tables(), (16,)
    plain = plan_tables(tables, MECConfig(), 10.0, codebook_sizes=sizes, progress=False)
    memo: dict = {}
    heavy_a = plan_tables(tables, MECConfig(), 10.0, codebook_sizes=sizes, progress=False,
                          memo=memo, table_weights={"a": 20.0, "b": 1.0})
    heavy_b = plan_tables(tables, MECConfig(), 10.0, codebook_sizes=sizes, progress=False,
                          table_weights={"a": 1.0, "b": 20.0})
    assert heavy_a["a"].bytes > heavy_a["b"].bytes and heavy_b["b"].bytes > heavy_b["a"].bytes
    for plan in (heavy_a, heavy_b):
        assert sum(o.bytes for o in plan.values()) <= 2 * 2_000 * 8 * 4 / 10
    # Reference: the allocation over the weighted estimates (the memo holds them unweighted).
    costs = {t: TableCosts(table_bytes(2_000, 8, 0, 0), tuple(
        TableOption(o.num_subspaces, o.codebook_size, o.bytes, o.error * w)
        for key, o in memo.items() if key[0] == t)) for t, w in (("a", 20.0), ("b", 1.0))}
    expected = allocate(costs, 10.0)
    assert {t: (o.num_subspaces, o.codebook_size) for t, o in heavy_a.items()} == {
        t: (o.num_subspaces, o.codebook_size) for t, o in expected.items()}
    # The plan's errors are the estimates themselves, not weighted.
    assert all(o in memo.values() for o in heavy_a.values() if o.compressed)
    # Equal weights change nothing.
    assert plan_tables(tables, MECConfig(), 10.0, codebook_sizes=sizes, progress=False,
                       table_weights={"a": 3.0, "b": 3.0}) == plain


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 1.0, "b": -1.0},
                                     {"a": 1.0, "b": float("nan")}])
def test_bad_table_weights_name_the_table(weights):
    with pytest.raises(ValueError, match="table 'b'"):
        plan_tables(_twin_tables(), MECConfig(), 10.0, codebook_sizes=(16,), progress=False,
                    table_weights=weights)
