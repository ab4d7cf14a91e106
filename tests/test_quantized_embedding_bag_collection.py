"""QuantizedEmbeddingBagCollection against a float64 reference, TorchRec's EBC and its models."""
from typing import Dict, List

import pytest
import torch
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import ProductQuantizedTable
from torchrec_mec.modules import quantized_embedding_bag_collection as qebc_module

from tests.pooling_reference import decoded_table64, pooled_reference
from tests.qebc_testing import randomize_


def random_kjt(
    configs: List[EmbeddingBagConfig], batch: int, max_len: int, weighted: bool, seed: int
) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    rows = {f: c.num_embeddings for c in configs for f in c.feature_names}
    for f, n in rows.items():
        lens = torch.randint(0, max_len + 1, (batch,), generator=gen)
        lens[0] = 0  # always one empty bag
        keys.append(f)
        lengths.append(lens)
        values.append(torch.randint(0, n, (int(lens.sum()),), generator=gen))
    v = torch.cat(values)
    w = torch.rand(v.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, v, torch.cat(lengths), weights=w)


def mixed_configs(pooling: PoolingType) -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name="t0", num_embeddings=50, embedding_dim=8,
                                    feature_names=["f0", "f0b"], num_subspaces=4,
                                    codebook_size=6, pooling=pooling),
        QuantizedEmbeddingBagConfig(name="t1", num_embeddings=7, embedding_dim=4,
                                    feature_names=["f1"], pooling=pooling),
        QuantizedEmbeddingBagConfig(name="t2", num_embeddings=300, embedding_dim=6,
                                    feature_names=["f2"], num_subspaces=2, codebook_size=300,
                                    pooling=pooling),
    ]


def tables64(qebc: QuantizedEmbeddingBagCollection, grad: bool = False) -> Dict[str, torch.Tensor]:
    """Float64 copies of every table's parameters (leaves) and the decoded tables."""
    out = {}
    for name, module in qebc.embedding_bags.items():
        if isinstance(module, ProductQuantizedTable):
            books = module.codebooks.detach().double().requires_grad_(grad)
            out[name + ".param"] = books
            out[name] = decoded_table64(module.codes, books)
        else:
            weight = module.weight.detach().double().requires_grad_(grad)
            out[name + ".param"] = weight
            out[name] = weight
    return out


@pytest.mark.parametrize("backend", ["default", "fbgemm"])
@pytest.mark.parametrize("pooling,weighted", [
    (PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, False),
])
def test_forward_and_gradients_match_float64_reference(pooling, weighted, backend, monkeypatch):
    if backend == "fbgemm":  # the FBGEMM TBE path, taken when the compiled operator is absent
        monkeypatch.setattr(qebc_module, "cpu_operator_available", lambda: False)
    configs = mixed_configs(pooling)
    qebc = QuantizedEmbeddingBagCollection(configs, is_weighted=weighted)
    randomize_(qebc, seed=1)
    kjt = random_kjt(configs, batch=9, max_len=5, weighted=weighted, seed=2)
    out = qebc(kjt)
    assert out.keys() == ["f0", "f0b", "f1", "f2"]
    assert out.length_per_key() == [8, 8, 4, 6]
    assert qebc.embedding_bags["t2"].codes.dtype == torch.uint16
    assert qebc.embedding_bags["t0"].codes.dtype == torch.uint8

    ref_tables = tables64(qebc, grad=True)
    ref = pooled_reference(ref_tables, configs, kjt, weighted)
    torch.testing.assert_close(out.values().double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out.values()[0] == 0)  # first bag of every feature is empty

    upstream = torch.randn(ref.shape, dtype=torch.float64)
    out.values().backward(upstream.float())
    ref.backward(upstream)
    for name, module in qebc.embedding_bags.items():
        param = module.codebooks if isinstance(module, ProductQuantizedTable) else module.weight
        torch.testing.assert_close(param.grad.double(), ref_tables[name + ".param"].grad,
                                   atol=1e-5, rtol=1e-5)


def test_kjt_key_order_does_not_matter():
    configs = mixed_configs(PoolingType.SUM)
    qebc = QuantizedEmbeddingBagCollection(configs)
    randomize_(qebc, seed=3)
    kjt = random_kjt(configs, batch=4, max_len=3, weighted=False, seed=4)
    jt = kjt.to_dict()
    keys = list(reversed(kjt.keys()))
    shuffled = KeyedJaggedTensor.from_jt_dict({k: jt[k] for k in keys})
    assert shuffled.keys() == keys
    torch.testing.assert_close(qebc(shuffled).values(), qebc(kjt).values())


def test_exact_match_with_torchrec_ebc_when_codebooks_reproduce_the_table():
    n, d = 40, 8
    ebc_cfg = [EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=["f"])]
    ebc = EmbeddingBagCollection(ebc_cfg)
    codes = torch.arange(n, dtype=torch.uint8).view(n, 1)  # M=1, K=N: codebook = the table
    books = ebc.embedding_bags["t"].weight.detach().clone().view(1, n, d)
    qebc = QuantizedEmbeddingBagCollection.from_embedding_bag_collection(ebc, {"t": (codes, books)})
    kjt = random_kjt(ebc_cfg, batch=16, max_len=6, weighted=False, seed=5)
    torch.testing.assert_close(qebc(kjt).values(), ebc(kjt).values(), atol=1e-6, rtol=0)


def test_full_tables_load_a_plain_ebc_state_and_state_dict_round_trips():
    configs = mixed_configs(PoolingType.SUM)
    plain = [EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings,
                                embedding_dim=c.embedding_dim, feature_names=c.feature_names)
             for c in configs]
    ebc = EmbeddingBagCollection(plain)
    qebc = QuantizedEmbeddingBagCollection(configs)
    randomize_(qebc, seed=6)
    full_state = {k: v for k, v in ebc.state_dict().items() if k.startswith("embedding_bags.t1.")}
    qebc.load_state_dict(full_state, strict=False)
    torch.testing.assert_close(qebc.embedding_bags["t1"].weight, ebc.embedding_bags["t1"].weight)

    state = qebc.state_dict()
    assert set(state) == {"embedding_bags.t0.codes", "embedding_bags.t0.codebooks",
                          "embedding_bags.t1.weight", "embedding_bags.t2.codes",
                          "embedding_bags.t2.codebooks"}
    assert state["embedding_bags.t0.codes"].shape == (50, 4)
    assert state["embedding_bags.t0.codebooks"].shape == (4, 6, 2)
    other = QuantizedEmbeddingBagCollection(configs)
    other.load_state_dict(state)
    kjt = random_kjt(configs, batch=5, max_len=4, weighted=False, seed=7)
    torch.testing.assert_close(other(kjt).values(), qebc(kjt).values(), atol=0, rtol=0)


def test_bad_codes_at_load_time_name_the_table():
    configs = mixed_configs(PoolingType.SUM)
    qebc = QuantizedEmbeddingBagCollection(configs)
    state = qebc.state_dict()
    for key, bad, match in [
        ("embedding_bags.t0.codes", state["embedding_bags.t0.codes"].long(), "t0.*dtype"),
        ("embedding_bags.t0.codes", torch.zeros(49, 4, dtype=torch.uint8), "t0.*shape"),
        ("embedding_bags.t0.codes", torch.full((50, 4), 6, dtype=torch.uint8), "t0.*code 6"),
        ("embedding_bags.t2.codebooks", torch.zeros(2, 300, 3, dtype=torch.float64), "t2.*dtype"),
        ("embedding_bags.t2.codebooks", torch.zeros(3, 300, 2), "t2.*shape"),
    ]:
        broken = dict(state)
        broken[key] = bad
        with pytest.raises(ValueError, match=match):
            qebc.load_state_dict(broken)


@pytest.mark.parametrize("bad_id", [-1, 50])
def test_out_of_range_ids_name_the_feature(bad_id):
    configs = mixed_configs(PoolingType.SUM)
    qebc = QuantizedEmbeddingBagCollection(configs)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f0b", "f1", "f2"], torch.tensor([1, bad_id, 2, 3]), torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match=rf"feature 'f0b': id {bad_id} is out of range"):
        qebc(kjt)


def test_missing_unknown_features_and_wrong_dtype_are_named():
    configs = mixed_configs(PoolingType.SUM)
    qebc = QuantizedEmbeddingBagCollection(configs)
    missing = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f0b", "f1"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="missing.*'f2'"):
        qebc(missing)
    unknown = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f0b", "f1", "f2", "zz"], torch.tensor([1, 2, 3, 4, 5]), torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="'zz'"):
        qebc(unknown)
    floats = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f0b", "f1", "f2"], torch.tensor([1.0, 2, 3, 4]), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="int32 or int64"):
        qebc(floats)


def test_config_validation_names_the_table():
    with pytest.raises(ValueError, match="'bad'.*divisible"):
        QuantizedEmbeddingBagConfig(name="bad", num_embeddings=10, embedding_dim=10,
                                    num_subspaces=4, codebook_size=16)
    for k in (1, 65537):
        with pytest.raises(ValueError, match="'bad'.*codebook_size"):
            QuantizedEmbeddingBagConfig(name="bad", num_embeddings=10, embedding_dim=8,
                                        num_subspaces=4, codebook_size=k)


def test_parameters_repack_after_being_moved():
    configs = mixed_configs(PoolingType.SUM)
    qebc = QuantizedEmbeddingBagCollection(configs)
    randomize_(qebc, seed=8)
    kjt = random_kjt(configs, batch=6, max_len=4, weighted=False, seed=9)
    before = qebc(kjt).values().detach()
    qebc = qebc.to(torch.device("cpu"))
    books = qebc.embedding_bags["t0"].codebooks
    books.data = books.data.clone()  # gives the parameter a storage of its own
    with torch.no_grad():
        books[0, 0].add_(1.0)
        books[0, 0].sub_(1.0)
    out = qebc(kjt).values()
    torch.testing.assert_close(out, before)
    out.sum().backward()
    assert books.grad is not None and books.grad.abs().sum() > 0


def test_memory_report_counts_packed_codes_and_codebooks():
    qebc = QuantizedEmbeddingBagCollection(mixed_configs(PoolingType.SUM))
    report = qebc.memory_report()
    t0, t1, t2 = (report.tables[n] for n in ("t0", "t1", "t2"))
    assert (t0.codes_bytes, t0.codebooks_bytes, t0.weight_bytes) == (50 * 4 * 1, 4 * 6 * 2 * 4, 0)
    assert (t1.codes_bytes, t1.codebooks_bytes, t1.weight_bytes) == (0, 0, 7 * 4 * 4)
    assert (t2.codes_bytes, t2.codebooks_bytes) == (300 * 2 * 2, 2 * 300 * 3 * 4)
    baseline = (50 * 8 + 7 * 4 + 300 * 6) * 4
    assert report.baseline_bytes == baseline
    assert report.ratio == pytest.approx(baseline / (200 + 192 + 112 + 1200 + 7200))


def model_configs() -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=8,
                                    feature_names=[f"f{i}"], num_subspaces=m, codebook_size=k)
        for i, (n, m, k) in enumerate([(100, 4, 16), (20, 1, 0), (500, 2, 32)])
    ]


@pytest.mark.parametrize("model_name", ["dlrm", "dlrm_dcn", "deepfm"])
def test_trains_inside_torchrec_models(model_name):
    torch.manual_seed(0)
    configs = model_configs()
    qebc = QuantizedEmbeddingBagCollection(configs)
    if model_name == "dlrm":
        model = DLRM(qebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
                     over_arch_layer_sizes=[8, 1])
    elif model_name == "dlrm_dcn":
        model = DLRM_DCN(qebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
                         over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
    else:
        model = SimpleDeepFMNN(num_dense_features=4, embedding_bag_collection=qebc,
                               hidden_layer_size=16, deep_fm_dimension=8)
    kjt = random_kjt(configs, batch=8, max_len=3, weighted=False, seed=10)
    dense = torch.randn(8, 4)
    codes_before = {n: m.codes.clone() for n, m in qebc.embedding_bags.items()
                    if isinstance(m, ProductQuantizedTable)}
    books_before = {n: qebc.embedding_bags[n].codebooks.detach().clone() for n in codes_before}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    logits = model(dense, kjt)
    assert logits.shape == (8, 1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.squeeze(1), torch.randint(0, 2, (8,)).float())
    loss.backward()
    opt.step()
    for name, codes in codes_before.items():
        module = qebc.embedding_bags[name]
        assert torch.equal(module.codes, codes)
        assert not module.codes.requires_grad
        assert not torch.equal(module.codebooks.detach(), books_before[name])
