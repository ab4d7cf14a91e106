"""The fast lookup paths (compiled CPU operator, Triton kernel) against the reference paths.

Every comparison is on random inputs with empty bags, and covers SUM, MEAN and per-id weights,
uint8 and uint16 codes, int32 and int64 ids, shared tables, full tables, and both the
register-sum shapes of the operator and its general loop.
"""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import ProductQuantizedTable
from torchrec_mec.modules import quantized_embedding_bag_collection as qebc_module
from torchrec_mec.ops import fast_lookup
from torchrec_mec.ops.fast_lookup import cpu_operator_available, pq_embedding_bag_fast
from torchrec_mec.ops.reference import pq_embedding_bag

from tests.pooling_reference import decoded_table64, pooled_reference
from tests.qebc_testing import randomize_

REPO = Path(__file__).resolve().parents[1]
needs_operator = pytest.mark.skipif(
    not cpu_operator_available(),
    reason="torchrec_mec._C is not built (pip install --no-build-isolation -e .)",
)


def configs(pooling: PoolingType) -> List[QuantizedEmbeddingBagConfig]:
    def cfg(name, rows, dim, features, m=1, k=0):
        return QuantizedEmbeddingBagConfig(
            name=name, num_embeddings=rows, embedding_dim=dim, feature_names=features,
            num_subspaces=m, codebook_size=k, pooling=pooling,
        )

    return [
        cfg("reg128", 200, 128, ["a", "a2"], m=8, k=256),   # register sums, shared table
        cfg("reg16", 90, 16, ["b"], m=4, k=16),              # register sums, 4-float subspaces
        cfg("general", 70, 10, ["c"], m=5, k=7),             # general loop (d = 2)
        cfg("wide", 300, 6, ["d"], m=2, k=300),              # uint16 codes, general loop
        cfg("full20", 30, 20, ["e"]),                        # full table, general loop
        cfg("full16", 25, 16, ["g", "g2"]),                  # full table, register sums
    ]


def random_qebc(cfgs, weighted: bool, seed: int) -> QuantizedEmbeddingBagCollection:
    return randomize_(QuantizedEmbeddingBagCollection(cfgs, is_weighted=weighted), seed)


def random_kjt(cfgs, batch: int, weighted: bool, ids_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for c in cfgs:
        for f in c.feature_names:
            lens = torch.randint(0, 7, (batch,), generator=gen)
            lens[::5] = 0  # empty bags, also at the start of each feature
            keys.append(f)
            lengths.append(lens)
            values.append(torch.randint(0, c.num_embeddings, (int(lens.sum()),), generator=gen))
    v = torch.cat(values).to(ids_dtype)
    w = torch.rand(v.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, v, torch.cat(lengths), weights=w)


def params(qebc) -> Dict[str, torch.Tensor]:
    return {name: m.codebooks if isinstance(m, ProductQuantizedTable) else m.weight
            for name, m in qebc.embedding_bags.items()}


def forward_and_grads(qebc, kjt, upstream):
    for p in qebc.parameters():
        p.grad = None
    out = qebc(kjt).values()
    out.backward(upstream)
    return out.detach(), {n: p.grad.clone() for n, p in params(qebc).items()}


def per_feature_reference(qebc, cfgs, kjt, weighted):
    """The plain-PyTorch reference path: pq_embedding_bag / F.embedding_bag, feature by feature."""
    jt = kjt.to_dict()
    outs = []
    for c in cfgs:
        module = qebc.embedding_bags[c.name]
        mode = "mean" if c.pooling == PoolingType.MEAN else "sum"
        for f in c.feature_names:
            ids = jt[f].values()
            offsets = F.pad(jt[f].lengths().cumsum(0), (1, 0))
            w = jt[f].weights() if weighted else None
            if isinstance(module, ProductQuantizedTable):
                outs.append(pq_embedding_bag(module.codes, module.codebooks, ids, offsets, w, mode))
            else:
                outs.append(F.embedding_bag(ids.long(), module.weight, offsets, mode=mode,
                                            per_sample_weights=w, include_last_offset=True))
    return torch.cat(outs, dim=1)


@needs_operator
@pytest.mark.parametrize("pooling,weighted,ids_dtype", [
    (PoolingType.SUM, False, torch.int64),
    (PoolingType.SUM, True, torch.int32),
    (PoolingType.MEAN, False, torch.int32),
    (PoolingType.MEAN, False, torch.int64),
])
def test_fused_operator_matches_reference_paths(pooling, weighted, ids_dtype, monkeypatch):
    cfgs = configs(pooling)
    qebc = random_qebc(cfgs, weighted, seed=1)
    kjt = random_kjt(cfgs, batch=66, weighted=weighted, ids_dtype=ids_dtype, seed=2)
    upstream = torch.randn(66, sum(c.embedding_dim * len(c.feature_names) for c in cfgs))
    fused_out, fused_grads = forward_and_grads(qebc, kjt, upstream)
    assert torch.all(fused_out[0] == 0)  # bag 0 of every feature is empty

    # float64, independent of the library
    tables = {}
    for name, module in qebc.embedding_bags.items():
        leaf = params(qebc)[name].detach().double().requires_grad_(True)
        tables[name + ".param"] = leaf
        tables[name] = decoded_table64(module.codes, leaf) if isinstance(
            module, ProductQuantizedTable) else leaf
    ref = pooled_reference(tables, cfgs, kjt, weighted)
    ref.backward(upstream.double())
    torch.testing.assert_close(fused_out.double(), ref, atol=1e-5, rtol=1e-5)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad.double(), tables[name + ".param"].grad, atol=1e-4, rtol=1e-5)

    # the plain-PyTorch reference path, and the FBGEMM TBE path the module falls back to
    plain = per_feature_reference(qebc, cfgs, kjt, weighted)
    torch.testing.assert_close(fused_out, plain.detach(), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(qebc_module, "cpu_operator_available", lambda: False)
    tbe_out, tbe_grads = forward_and_grads(qebc, kjt, upstream)
    torch.testing.assert_close(fused_out, tbe_out, atol=1e-5, rtol=1e-5)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, tbe_grads[name], atol=1e-4, rtol=1e-5)


@needs_operator
def test_forward_without_grad_matches():
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, False, seed=3)
    kjt = random_kjt(cfgs, batch=40, weighted=False, ids_dtype=torch.int64, seed=4)
    with torch.no_grad():
        out = qebc(kjt).values()
    torch.testing.assert_close(out, qebc(kjt).values().detach(), atol=0, rtol=0)


@needs_operator
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_first_feature_with_a_bad_id_is_named(ids_dtype):
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, False, seed=5)
    keys = [f for c in cfgs for f in c.feature_names]
    values = torch.zeros(len(keys), dtype=ids_dtype)
    values[keys.index("c")] = 70   # "general" has 70 rows
    values[keys.index("g2")] = -3
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, torch.ones(len(keys), dtype=torch.long))
    with pytest.raises(ValueError, match=r"feature 'c': id 70 is out of range for table 'general'"):
        qebc(kjt)


@needs_operator
def test_codes_outside_the_codebooks_name_the_table():
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, False, seed=6)
    qebc.embedding_bags["wide"].codes[3, 1] = 300  # K = 300: a uint16 holds it, the table does not
    kjt = random_kjt(cfgs, batch=30, weighted=False, ids_dtype=torch.int64, seed=7)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), torch.full_like(kjt.values(), 3), kjt.lengths())
    with pytest.raises(ValueError, match=r"table 'wide': codes hold a value >= codebook_size 300"):
        qebc(kjt)


@needs_operator
@pytest.mark.parametrize("codes_dtype,k", [(torch.uint8, 256), (torch.uint8, 5), (torch.uint16, 1000)])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_pq_embedding_bag_fast_matches_reference(codes_dtype, k, mode, weighted):
    gen = torch.Generator().manual_seed(k)
    n, m, d, batch = 500, 8, 4, 60
    codes = torch.randint(0, k, (n, m), generator=gen).to(codes_dtype)
    books = torch.randn(m, k, d, generator=gen, requires_grad=True)
    lengths = torch.randint(0, 9, (batch,), generator=gen)
    lengths[:3] = 0
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    ids = torch.randint(0, n, (int(lengths.sum()),), generator=gen)
    w = torch.rand(ids.numel(), generator=gen) if weighted else None
    upstream = torch.randn(batch, m * d, generator=gen)
    fast = pq_embedding_bag_fast(codes, books, ids, offsets, w, mode)
    (fast_grad,) = torch.autograd.grad(fast, books, upstream)
    ref = pq_embedding_bag(codes, books, ids, offsets, w, mode)
    (ref_grad,) = torch.autograd.grad(ref, books, upstream)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"id {n} is out of range for table #0 with {n} rows"):
        pq_embedding_bag_fast(codes, books, torch.tensor([n]), torch.tensor([0, 1]))


def test_missing_operator_falls_back_with_one_warning(monkeypatch):
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, False, seed=8)
    kjt = random_kjt(cfgs, batch=20, weighted=False, ids_dtype=torch.int64, seed=9)
    expected = per_feature_reference(qebc, cfgs, kjt, False).detach()
    monkeypatch.setattr(fast_lookup, "_CPU_OPERATOR_ERROR", "No module named 'torchrec_mec._C'")
    monkeypatch.setattr(fast_lookup, "_warned", False)
    with pytest.warns(RuntimeWarning, match="compiled CPU lookup operator .* not available"):
        first = qebc(kjt).values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = qebc(kjt).values()
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)


TRITON_CHECK = textwrap.dedent("""
    import torch
    from torchrec_mec.ops.triton_lookup import LaunchConfig, pq_embedding_bag_triton

    def reference64(codes, books, ids, offsets, weights, mode):
        table = torch.cat([books[m][codes[:, m].long()] for m in range(books.shape[0])], dim=1)
        out = []
        for b in range(offsets.numel() - 1):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            rows = table[ids[lo:hi].long()]
            if weights is not None:
                rows = rows * weights[lo:hi, None].double()
            acc = rows.sum(0)
            out.append(acc / max(hi - lo, 1) if mode == "mean" else acc)
        return torch.stack(out)

    gen = torch.Generator().manual_seed(0)
    # The default launch shape (4 ids per trip: bags of 0-5 ids end mid-trip), and one taking
    # one id per trip in blocks of 4 bags (a partial last block).
    for (codes_dtype, k, m, d), launch in [((torch.uint8, 256, 8, 16), LaunchConfig()),
                                           ((torch.uint16, 300, 3, 4), LaunchConfig()),
                                           ((torch.uint8, 7, 5, 2), LaunchConfig()),
                                           ((torch.uint8, 256, 8, 16), LaunchConfig(4, 1, 1))]:
        for mode, weighted in [("sum", False), ("sum", True), ("mean", False)]:
            n, batch = 200, 37
            codes = torch.randint(0, k, (n, m), generator=gen).to(codes_dtype)
            books = torch.randn(m, k, d, generator=gen, requires_grad=True)
            lengths = torch.randint(0, 6, (batch,), generator=gen)
            lengths[::4] = 0
            offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
            ids = torch.randint(0, n, (int(lengths.sum()),), generator=gen).int()
            w = torch.rand(ids.numel(), generator=gen) if weighted else None
            upstream = torch.randn(batch, m * d, generator=gen)
            out = pq_embedding_bag_triton(codes, books, ids, offsets, w, mode, launch)
            (grad,) = torch.autograd.grad(out, books, upstream)
            books64 = books.detach().double().requires_grad_(True)
            ref = reference64(codes, books64, ids, offsets, w, mode)
            ref.backward(upstream.double())
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad.double(), books64.grad, atol=1e-5, rtol=1e-5)

    # Registered as an operator: schema and autograd registration hold (fake tensors and
    # compile need a CUDA build of torch: the interpreter runs kernels on real CPU tensors).
    from torch.library import opcheck
    opcheck(torch.ops.torchrec_mec.pq_bag_triton_forward.default,
            (codes, books, ids, offsets, None, False, 16, 4, 4),
            test_utils=("test_schema", "test_autograd_registration"))

    # Nothing is read out of bounds: ids outside the table add nothing, a code >= K reads
    # codeword 0 (the device-side checks before the kernel report both).
    codes = torch.randint(0, 7, (30, 3), generator=gen).to(torch.uint8)
    books = torch.randn(3, 7, 4, generator=gen)
    ids = torch.randint(0, 30, (12,), generator=gen)
    offsets = torch.tensor([0, 5, 5, 12])
    bad = ids.clone()
    bad[1], bad[6] = 30, -4
    bad_codes = codes.clone()
    bad_codes[ids[2], 1] = 200
    safe_codes = bad_codes.clone()
    safe_codes[ids[2], 1] = 0
    keep = torch.ones(12)
    keep[1] = keep[6] = 0
    out = pq_embedding_bag_triton(bad_codes, books, bad, offsets)
    ref = reference64(safe_codes, books.double(), bad.clamp(0, 29), offsets, keep, "sum")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    print("triton interpreter: all cases match")
""")


def test_triton_kernel_matches_float64_in_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    # TRITON_INTERPRET must be set before the kernels are defined, hence a fresh interpreter.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all cases match" in run.stdout


def test_gpu_benchmark_runs_its_checks_in_the_interpreter():
    """``benchmarks/gpu_lookup.py`` is what a lent GPU runs, once: its CPU smoke mode (toy sizes,
    Triton's interpreter) goes through the same float64 checks, sweep and table."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_lookup.py"),
                          "--cpu-smoke"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # Both launch shapes of the smoke run, three pooling cases each, were checked.
    assert run.stdout.count("# correct:") == 6, run.stdout
    assert "zipf     PQ Triton fwd+bwd (best)" in run.stdout, run.stdout


def test_kernels_compile_for_hopper_without_spills_and_with_vector_accesses():
    """Compiled for sm_90 by the ptxas that Triton's wheel ships (no GPU needed): the default
    launch keeps everything in registers, has no block-wide barrier (which would serialise the
    unrolled loads), loads codewords and stores rows 16 bytes at a time and adds codebook
    gradients four floats per atomic."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernel_resources.py"),
                          "--default-only"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()
            if line.startswith(("forward", "backward"))}
    for name, row in rows.items():
        assert row[5] == "0", f"{name} kernel uses stack (spills): {row}"
        assert row[6] == "0", f"{name} kernel has block-wide barriers: {row}"
        assert "LDL" not in " ".join(row), f"{name} kernel reads local memory: {row}"
    assert "LDG.E.128" in rows["forward"] and "STG.E.128" in rows["forward"], rows["forward"]
    assert "REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU" in rows["backward"], rows["backward"]


def test_launch_config_refuses_a_block_that_is_not_a_power_of_two():
    from torchrec_mec.ops.triton_lookup import LaunchConfig

    with pytest.raises(ValueError, match="block_bags must be a power of two, got 12"):
        LaunchConfig(block_bags=12)


def test_device_path_on_cpu_matches_float64():
    """The CUDA path's own code (per-feature split with device-side checks, the plain-PyTorch
    PQ lookup where Triton is absent, full tables through FBGEMM's TBE) run on CPU tensors."""
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, True, seed=10)
    kjt = random_kjt(cfgs, batch=12, weighted=True, ids_dtype=torch.int64, seed=11)
    out = qebc._device_forward(qebc._split(kjt))
    tables = {}
    for name, module in qebc.embedding_bags.items():
        param = params(qebc)[name].detach().double()
        tables[name] = decoded_table64(module.codes, param) if isinstance(
            module, ProductQuantizedTable) else param
    torch.testing.assert_close(out.double(), pooled_reference(tables, cfgs, kjt, True),
                               atol=1e-5, rtol=1e-5)


def test_dense_tbe_function_matches_the_cpu_kernels():
    """``TableBatchedLookup(..., dense=True)`` (FBGEMM's autograd-aware dense TBE: what full
    tables run on CUDA) gives the CPU kernels' output and per-parameter gradients."""
    from torchrec_mec.ops.tbe import FlatParameterBuffer, TableBatchedLookup

    gen = torch.Generator().manual_seed(12)
    weights = [torch.nn.Parameter(torch.randn(9, 4, generator=gen)),
               torch.nn.Parameter(torch.randn(5, 8, generator=gen))]
    buffer = FlatParameterBuffer(lambda: weights)
    lookup = TableBatchedLookup([(9, 4), (5, 8)], feature_tables=[1, 0, 0])
    lengths = torch.tensor([2, 0, 1, 3, 1, 2])  # 3 features x 2 bags
    indices = torch.cat([torch.randint(0, 5, (2,), generator=gen),
                         torch.randint(0, 9, (5,), generator=gen),
                         torch.randint(0, 9, (2,), generator=gen)])
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    psw = torch.rand(indices.numel(), generator=gen)
    upstream = torch.randn(2, 16, generator=gen)
    results = []
    for dense in (False, True):
        out = lookup(buffer, indices, offsets, psw, dense=dense)
        grads = torch.autograd.grad(out, weights, upstream)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: runs the Triton kernel, the device-side id checks "
                           "and FBGEMM's CUDA TBE against the CPU operator")
def test_cuda_path_matches_the_cpu_operator():
    cfgs = configs(PoolingType.SUM)
    qebc = random_qebc(cfgs, True, seed=13)
    kjt = random_kjt(cfgs, batch=64, weighted=True, ids_dtype=torch.int64, seed=14)
    upstream = torch.randn(64, sum(c.embedding_dim * len(c.feature_names) for c in cfgs))
    cpu_out, cpu_grads = forward_and_grads(qebc, kjt, upstream)
    qebc = qebc.cuda()
    cuda_out, cuda_grads = forward_and_grads(qebc, kjt.to(torch.device("cuda")), upstream.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-5, rtol=1e-5)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name].cpu(), grad, atol=1e-4, rtol=1e-5)
