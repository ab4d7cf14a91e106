"""Construction, initialisation and state checks of a QEBC: the meta device, reset_parameters,
parameters replaced by load_state_dict(assign=True), and partial or bad state dicts."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import (
    CodebookLargerThanTableWarning,
    ProductQuantizedTable,
    init_codebooks_,
    init_codes_,
    init_weight_,
)
from torchrec_mec.modules import initialization
from torchrec_mec.modules import quantized_embedding_bag_collection as qebc_module

from tests.pooling_reference import pooled_reference
from tests.qebc_testing import randomize_
from tests.test_quantized_embedding_bag_collection import mixed_configs, random_kjt, tables64

REPO = Path(__file__).resolve().parents[1]


def test_meta_construction_of_two_billion_row_tables_allocates_nothing():
    """Two 1B-row tables (D=128, M=8) hold 16 GB of codes once allocated; on meta, nothing.

    Run in a fresh process whose peak RSS is reset (``/proc/self/clear_refs``) just before the
    build, so that any transient allocation counts."""
    script = textwrap.dedent("""
        import json, torch
        from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        tables = [QuantizedEmbeddingBagConfig(name=f"t{i}", num_embeddings=10**9, embedding_dim=128,
                                              feature_names=[f"f{i}"], num_subspaces=8,
                                              codebook_size=256) for i in range(2)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status("VmRSS")
        qebc = QuantizedEmbeddingBagCollection(tables, device=torch.device("meta"))
        print(json.dumps({"peak_growth": status("VmHWM") - before,
                          "codes_bytes": qebc.memory_report().tables["t0"].codes_bytes,
                          "device": str(qebc.device)}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes_bytes"] == 10**9 * 8  # what the table would hold
    assert result["device"] == "meta"
    assert result["peak_growth"] < 100 * 2**20, result


def _assert_same_state(a: QuantizedEmbeddingBagCollection, b: QuantizedEmbeddingBagCollection) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("backend", ["default", "fbgemm"])
def test_to_empty_and_reset_parameters_give_the_construction_values(backend, monkeypatch):
    if backend == "fbgemm":  # the FBGEMM TBE path, whose flat buffer must follow the new tensors
        monkeypatch.setattr(qebc_module, "cpu_operator_available", lambda: False)
    configs = mixed_configs(PoolingType.SUM)
    torch.manual_seed(11)
    eager = QuantizedEmbeddingBagCollection(configs)
    torch.manual_seed(11)
    lazy = QuantizedEmbeddingBagCollection(configs, device=torch.device("meta"))
    assert lazy.device.type == "meta"
    lazy.to_empty(device=torch.device("cpu"))
    assert lazy.device.type == "cpu"
    lazy.reset_parameters()
    _assert_same_state(lazy, eager)

    for name, module in lazy.embedding_bags.items():
        if isinstance(module, ProductQuantizedTable):
            assert torch.isfinite(module.codebooks).all(), name
            assert module.codebooks.abs().max() > 0, name
            assert int(module.codes.to(torch.int32).max()) < module.codebook_size, name
    kjt = random_kjt(configs, batch=7, max_len=4, weighted=False, seed=3)
    out = lazy(kjt).values()
    ref = pooled_reference(tables64(lazy), configs, kjt, weighted=False)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in lazy.parameters())


def test_reset_parameters_restores_the_values_after_training():
    configs = mixed_configs(PoolingType.MEAN)
    torch.manual_seed(2)
    qebc = QuantizedEmbeddingBagCollection(configs)
    initial = {k: v.clone() for k, v in qebc.state_dict().items()}
    randomize_(qebc, seed=4)
    qebc.reset_parameters()
    for key, value in qebc.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_the_global_seed_decides_the_initial_values():
    configs = mixed_configs(PoolingType.SUM)
    torch.manual_seed(0)
    a = QuantizedEmbeddingBagCollection(configs)
    torch.manual_seed(1)
    b = QuantizedEmbeddingBagCollection(configs)
    assert not torch.equal(a.embedding_bags["t0"].codebooks, b.embedding_bags["t0"].codebooks)
    assert not torch.equal(a.embedding_bags["t1"].weight, b.embedding_bags["t1"].weight)


def test_any_part_of_a_table_initialises_as_the_whole(monkeypatch):
    monkeypatch.setattr(initialization, "ROW_BLOCK", 16)  # parts that straddle several blocks
    pq = QuantizedEmbeddingBagConfig(name="pq", num_embeddings=400, embedding_dim=12,
                                     num_subspaces=6, codebook_size=300)
    full = QuantizedEmbeddingBagConfig(name="full", num_embeddings=100, embedding_dim=6)
    codes = init_codes_(torch.empty(400, 6, dtype=torch.uint16), pq, seed=3)
    books = init_codebooks_(torch.empty(6, 300, 2), pq, seed=3)
    weight = init_weight_(torch.empty(100, 6), full, seed=3)
    for first_row, rows, first_col, cols in [(0, 100, 0, 6), (13, 40, 2, 3), (99, 1, 5, 1), (16, 16, 0, 6)]:
        part = init_codes_(torch.empty(rows, cols, dtype=torch.uint16), pq, 3, first_row, first_col)
        assert torch.equal(part, codes[first_row : first_row + rows, first_col : first_col + cols])
        part = init_weight_(torch.empty(rows, cols), full, 3, first_row, first_col)
        assert torch.equal(part, weight[first_row : first_row + rows, first_col : first_col + cols])
    assert torch.equal(init_codebooks_(torch.empty(2, 300, 2), pq, 3, first_subspace=4), books[4:])
    # uniform codes over [0, K), weights inside TorchRec's default init range
    assert int(codes.to(torch.int32).min()) == 0 and int(codes.to(torch.int32).max()) == 299
    bound = full.get_weight_init_max()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 4
    with pytest.raises(ValueError, match="'pq': rows \\[390, 410\\)"):
        init_codes_(torch.empty(20, 6, dtype=torch.uint16), pq, 3, first_row=390)


@pytest.mark.parametrize("backend", ["default", "fbgemm"])
def test_load_state_dict_with_assign_uses_the_new_tensors(backend, monkeypatch):
    if backend == "fbgemm":
        monkeypatch.setattr(qebc_module, "cpu_operator_available", lambda: False)
    configs = mixed_configs(PoolingType.SUM)
    qebc = randomize_(QuantizedEmbeddingBagCollection(configs), seed=1)
    other = randomize_(QuantizedEmbeddingBagCollection(configs), seed=2)
    kjt = random_kjt(configs, batch=6, max_len=4, weighted=False, seed=5)
    qebc(kjt)  # packs the flat buffer around the old parameters
    qebc.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    torch.testing.assert_close(qebc(kjt).values(), other(kjt).values(), atol=0, rtol=0)


# -- bad or partial state dicts, bad configs (docs/reliability.md, "Lookups and the QEBC") ------
def test_partial_state_dicts_are_checked_like_whole_ones():
    tables = [QuantizedEmbeddingBagConfig(name="t", num_embeddings=300, embedding_dim=8,
                                          feature_names=["f"], num_subspaces=4, codebook_size=256),
              QuantizedEmbeddingBagConfig(name="small_k", num_embeddings=40, embedding_dim=8,
                                          feature_names=["g"], num_subspaces=4, codebook_size=6)]
    qebc = QuantizedEmbeddingBagCollection(tables)
    before = {k: v.clone() for k, v in qebc.state_dict().items()}
    wide = torch.full((300, 4), 300, dtype=torch.int64)  # would wrap to 44 as uint8
    for state, match in [
        ({"embedding_bags.t.codes": wide}, "table 't': codes have dtype torch.int64"),
        ({"embedding_bags.small_k.codes": torch.full((40, 4), 6, dtype=torch.uint8)},
         "table 'small_k': code 6 >= codebook_size 6"),
        ({"embedding_bags.t.codes": torch.zeros(299, 4, dtype=torch.uint8)}, "table 't': codes have shape"),
        ({"embedding_bags.t.codebooks": torch.zeros(4, 255, 2)}, "table 't': codebooks have shape"),
        ({"embedding_bags.t.codebooks": torch.zeros(4, 256, 2, dtype=torch.float64)},
         "table 't': codebooks have dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            qebc.load_state_dict(state, strict=False)
    for key, value in qebc.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key
    fine = torch.full((40, 4), 5, dtype=torch.uint8)
    result = qebc.load_state_dict({"embedding_bags.small_k.codes": fine}, strict=False)
    assert torch.equal(qebc.embedding_bags["small_k"].codes, fine)
    assert "embedding_bags.t.codes" in result.missing_keys


@pytest.mark.parametrize("field", ["num_embeddings", "embedding_dim"])
@pytest.mark.parametrize("value", [0, -3])
def test_empty_tables_are_refused_naming_the_table(field, value):
    kwargs = dict(name="empty", num_embeddings=10, embedding_dim=8, feature_names=["f"])
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"table 'empty': {field} must be an integer >= 1, got {value}"):
        QuantizedEmbeddingBagConfig(**kwargs)


def test_a_codebook_larger_than_the_table_warns_naming_it():
    with pytest.warns(CodebookLargerThanTableWarning, match="table 'tiny': codebook_size 256 > num_embeddings 100"):
        QuantizedEmbeddingBagConfig(name="tiny", num_embeddings=100, embedding_dim=8,
                                    num_subspaces=4, codebook_size=256)
