"""``mec compare``: the alternatives' numerics against hand-computed values and numpy, and the
stage end to end on a tiny synthetic run (every method, a crash and its resume, the report)."""
import importlib
import json
import math
import os

import numpy as np
import pytest
import torch

from tests.pipeline_testing import tiny_flags, tiny_settings
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.cli import main
from torchrec_mec.pipeline import RUN_STAGE_NAMES, DataSource, read_comparisons, run, run_stages
from torchrec_mec.pipeline.alternatives import (
    FLOAT_BYTES,
    UnreachableError,
    hash_ids,
    hashed_rows,
    rowwise_bytes,
    rowwise_dequantize,
    rowwise_quantize,
    small_dim,
)
from torchrec_mec.pipeline.outputs import COUNTS_FILE, COUNTS_KIND, TABLES_DIR
from torchrec_mec.pipeline.settings import COMPARE_METHODS
from torchrec_mec.quantize import budget

# The modules, not the functions the package exports under the same names.
compare_module = importlib.import_module("torchrec_mec.pipeline.compare")
compress_module = importlib.import_module("torchrec_mec.pipeline.compress")


def _random_tables(gen: torch.Generator) -> dict:
    count = int(torch.randint(1, 12, (1,), generator=gen))
    sizes = torch.randint(1, 50_000, (count,), generator=gen)
    return {f"C{i}": int(n) for i, n in enumerate(sizes)}


def test_small_dim_is_the_largest_dimension_that_fits() -> None:
    # Hand case: 1,024 rows; a budget of 26,214 B holds 6 floats per row (24,576 B), not 7.
    assert small_dim({"C1": 1000, "C2": 24}, 26214.4) == 6
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        tables = _random_tables(gen)
        rows = sum(tables.values())
        budget = float(torch.randint(1, 64, (1,), generator=gen)) * rows * FLOAT_BYTES / \
            float(torch.randint(1, 300, (1,), generator=gen))
        try:
            dim = small_dim(tables, budget)
        except UnreachableError:
            assert rows * FLOAT_BYTES > budget
            continue
        assert rows * dim * FLOAT_BYTES <= budget < rows * (dim + 1) * FLOAT_BYTES


def test_hashed_rows_hand_case() -> None:
    # 2,000 rows of budget, tables of 10,000, 1,000 and 10 rows, 100 kept: the 10-row table
    # stays whole, the others keep 100 plus the same share s = 1,790 / 10,800 of the rest.
    rows = hashed_rows({"C1": 10_000, "C2": 1_000, "C3": 10}, dim=2, budget_bytes=2 * 4 * 2000,
                       keep_rows=100)
    s = 1790 / 10_800
    assert rows == {"C1": 100 + math.floor(s * 9_900), "C2": 100 + math.floor(s * 900), "C3": 10}
    # Too small for 100 rows each: one cap for the large tables (45 + 45 + 10 = 100 rows).
    assert hashed_rows({"C1": 10_000, "C2": 1_000, "C3": 10}, dim=2, budget_bytes=2 * 4 * 100,
                       keep_rows=100) == {"C1": 45, "C2": 45, "C3": 10}
    # A budget that holds all rows keeps every table whole.
    assert hashed_rows({"C1": 50}, dim=4, budget_bytes=10**6, keep_rows=1) == {"C1": 50}
    with pytest.raises(UnreachableError, match="3 tables"):
        hashed_rows({"C1": 10_000, "C2": 1_000, "C3": 10}, dim=2, budget_bytes=2 * 4 * 2,
                    keep_rows=100)


def test_hashed_rows_fit_the_budget_on_random_tables() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        tables = _random_tables(gen)
        dim = int(torch.randint(1, 65, (1,), generator=gen))
        keep = int(torch.randint(1, 5000, (1,), generator=gen))
        full = sum(tables.values()) * dim * FLOAT_BYTES
        budget = full / float(torch.randint(1, 1000, (1,), generator=gen))
        try:
            rows = hashed_rows(tables, dim, budget, keep)
        except UnreachableError:
            assert len(tables) * dim * FLOAT_BYTES > budget
            continue
        assert sum(rows.values()) * dim * FLOAT_BYTES <= budget
        assert all(1 <= rows[f] <= n for f, n in tables.items())
        if sum(min(n, keep) for n in tables.values()) * dim * FLOAT_BYTES <= budget:
            assert all(rows[f] == n for f, n in tables.items() if n <= keep)
        by_size = sorted(tables, key=tables.__getitem__)
        assert all(rows[a] <= rows[b] for a, b in zip(by_size, by_size[1:]))


def test_hash_ids() -> None:
    assert hash_ids(torch.tensor([0, 5, 7, 12]), 5).tolist() == [0, 0, 2, 2]
    assert hash_ids(torch.tensor([9, 9]), torch.tensor([4, 5])).tolist() == [1, 4]


def _numpy_rowwise(w: np.ndarray, bits: int) -> np.ndarray:
    """Row-wise min/max quantization in numpy: q = round((w - min) / scale), scale =
    (max - min) / (2^bits - 1), both stored as float16, dequantized q * scale + min."""
    low = w.min(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    scale = ((w.max(axis=1, keepdims=True) - low) / (2**bits - 1)).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
    q = np.clip(np.rint((w - low) / scale), 0, 2**bits - 1)
    return q * scale + low


@pytest.mark.parametrize("bits", [8, 4])
def test_rowwise_quantization_against_numpy(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 16, generator=gen) * torch.rand(300, 1, generator=gen) * 3
    fused = rowwise_quantize(w, bits)
    assert fused.dtype == torch.uint8 and fused.shape == (300, 16 * bits // 8 + 4)
    assert fused.numel() == rowwise_bytes(300, 16, bits)
    got = rowwise_dequantize(fused, bits).numpy()
    ref = _numpy_rowwise(w.numpy(), bits)
    step = (w.max(1, keepdim=True).values - w.min(1, keepdim=True).values).numpy() / (2**bits - 1)
    # Within the quantization error of the float table (half a step, plus float16's rounding
    # of scale and bias), and the same levels as numpy's up to one step where a value sits on
    # a rounding boundary.
    slack = 1e-3 * np.abs(w.numpy()).max(axis=1, keepdims=True)
    assert (np.abs(got - w.numpy()) <= 0.5 * step * 1.01 + slack).all()
    assert (np.abs(got - ref) <= step * 1.01 + slack).all()
    assert np.mean(np.isclose(got, ref, rtol=0, atol=1e-5)) > 0.99


def test_cells_and_settings() -> None:
    s = tiny_settings(compare__ratios=[10, 30], compare__methods=["hashing", "int8"])
    assert [c.name for c in compare_module.cells(s)] == [
        "baseline", "hashing-10x", "hashing-30x", "int8"]
    assert "compare" not in RUN_STAGE_NAMES  # mec run does not compare unless asked
    with pytest.raises(ValueError, match="compare.methods"):
        tiny_settings(compare__methods=["pruning"])


def test_compare_stage_every_method_resumes_after_a_crash(tmp_path, monkeypatch, capsys) -> None:
    # Ratio 3 every method reaches; 2,000 none of the trained ones can (D = 8, 1,239 rows).
    # One codebook size keeps the budget allocator's error estimates (k-means) cheap.
    settings = tiny_settings(compare__ratios=[3, 2000], compare__hashing_keep_rows=50,
                             pretrain__epochs=1, compress__codebook_sizes=[16])
    run_dir = str(tmp_path / "run")
    ran = []
    runners = dict(compare_module.RUNNERS)

    def crash(job, cell):
        raise RuntimeError("simulated crash")

    def counting(method):
        def runner(job, cell):
            ran.append(cell.name)
            return runners[method](job, cell)
        return runner

    monkeypatch.setattr(compare_module, "RUNNERS", {**runners, "small_dim": crash})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stages(run_dir, "compare", settings, source=DataSource("synthetic"),
                   redo=("prepare", "pretrain"), progress=False)
    done = sorted(os.listdir(os.path.join(run_dir, "compare", "cells")))
    assert done == ["baseline.mec", "kmeans_pq-2000x.mec", "kmeans_pq-3x.mec", "mec-2000x.mec",
                    "mec-3x.mec"]

    monkeypatch.setattr(compare_module, "RUNNERS", {m: counting(m) for m in runners})
    report = run(None, "synthetic", run_dir, settings, progress=False, compare=True)
    assert ran == ["small_dim-3x", "small_dim-2000x", "hashing-3x", "hashing-2000x", "int8",
                   "int4"]  # the cells finished before the crash were not redone
    rows = read_comparisons(os.path.join(run_dir, "compare"))["comparisons"]
    assert report["comparisons"] == json.loads(json.dumps(rows))
    assert {r["method"] for r in rows} == {"baseline", *COMPARE_METHODS}
    by_name = {(r["method"], r["target_ratio"]): r for r in rows}
    baseline = by_name[("baseline", None)]
    assert baseline["ratio"] == 1 and baseline["bytes"] == 1239 * 8 * 4
    for method in ("mec", "kmeans_pq", "small_dim", "hashing"):
        reached = by_name[(method, 3.0)]
        assert reached["unreachable"] is None and 0 < reached["auc"] < 1
        assert reached["ratio"] >= 3 and reached["bytes"] == baseline["bytes"] / reached["ratio"]
        assert by_name[(method, 2000.0)]["unreachable"]
        assert by_name[(method, 2000.0)]["auc"] is None
    assert by_name[("small_dim", 3.0)]["embedding_dim"] == 2
    # int8 / int4 at D = 8: 8 + 4 and 4 + 4 bytes for a row of 32.
    assert by_name[("int8", None)]["ratio"] == pytest.approx(32 / 12)
    assert by_name[("int4", None)]["ratio"] == pytest.approx(32 / 8)
    assert os.path.isfile(report["comparisons_plot"])
    # Up to date now: a second run --compare, or mec compare, redoes nothing; mec compare
    # prints the rows.
    ran.clear()
    run(None, "synthetic", run_dir, settings, progress=False, compare=True)
    extra = {"compare.ratios": "[3, 2000]", "compare.hashing_keep_rows": "50",
             "pretrain.epochs": "1", "compress.codebook_sizes": "[16]"}
    capsys.readouterr()
    assert main(["compare", "--out", run_dir, "--preset", "sample", "--no-progress",
                 *tiny_flags(), *[f"{k}={v}" for k, v in extra.items()]]) == 0
    assert ran == []
    printed = capsys.readouterr().out
    assert "int4" in printed and "mec        at 2000x: unreachable (target ratio 2000" in printed


def test_compare_cells_share_the_allocators_estimates(tmp_path, monkeypatch) -> None:
    # 2x then 3x: the second cell's plan needs no new estimate (3x affords a subset of 2x's
    # shapes) and is the plan the allocator makes alone (reference: plan_tables, no memo).
    settings = tiny_settings(compare__ratios=[2, 3], compare__methods=["mec"],
                             pretrain__epochs=1, compress__codebook_sizes=[16])
    run_dir = str(tmp_path / "run")
    plans, estimated = [], [0]  # (ratio, plan, estimates it made); shapes estimated so far
    real_plan, real_estimate = budget.plan_tables, budget.estimate_errors

    def recording_plan(tables, config, ratio, **kwargs):
        before = estimated[0]
        plan = real_plan(tables, config, ratio, **kwargs)
        plans.append((ratio, plan, estimated[0] - before))
        return plan

    def counting_estimate(weight, counts, shapes, **kwargs):
        estimated[0] += len(shapes)
        return real_estimate(weight, counts, shapes, **kwargs)

    monkeypatch.setattr(compress_module, "plan_tables", recording_plan)
    monkeypatch.setattr(budget, "estimate_errors", counting_estimate)
    run_stages(run_dir, "compare", settings, source=DataSource("synthetic"),
               redo=("prepare", "pretrain", "compare"), progress=False)
    assert [(r, n > 0) for r, _, n in plans] == [(2.0, True), (3.0, False)]
    pretrain = os.path.join(run_dir, "pretrain")
    counts, _ = load_artifact(os.path.join(pretrain, COUNTS_FILE), expect_kind=COUNTS_KIND)
    tables = compress_module.TablesOnDisk(os.path.join(pretrain, TABLES_DIR), counts)
    monkeypatch.undo()
    for ratio, plan, _ in plans:
        assert plan == budget.plan_tables(tables, settings.compress.config, ratio,
                                          codebook_sizes=[16], progress=False)
    assert any(o.compressed for o in plans[1][1].values())


@pytest.mark.parametrize("bits,dtype", [(8, torch.quint8), (4, torch.quint4x2)])
def test_rowwise_tables_pool_what_torchrec_quant_pools(bits: int, dtype: torch.dtype) -> None:
    """The int8 / int4 rows score the model with the dequantized tables: the same sums as
    TorchRec's own quantized EmbeddingBagCollection (torchrec.quant) built from the table."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=16,
                                                     num_embeddings=50, feature_names=["f"])])
    ebc.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=dtype))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 7, 9, 49, 3]),
                                              lengths=torch.tensor([2, 0, 3]))
    expected = QuantEBC.from_float(ebc)(kjt).values()
    weight = ebc.embedding_bags["t"].weight
    with torch.no_grad():
        weight.copy_(rowwise_dequantize(rowwise_quantize(weight, bits), bits))
    torch.testing.assert_close(ebc(kjt).values(), expected, rtol=0, atol=1e-6)
