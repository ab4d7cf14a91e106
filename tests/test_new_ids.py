"""New ids after compression: fallback tables, assign_codes and promotion (docs/new_ids.md).

References are independent of the library's lookup paths: rows resolved with plain Python
(coded id -> its codes, promoted id -> its slot's codes, other new id -> fallback row
(id - coded_rows) % fallback_rows) and pooled with explicit loops in float64.
"""
import itertools
from typing import Dict, List

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.models import MODEL_NAMES, ModelConfig, build_model
from torchrec_mec.modules import ProductQuantizedTable
from torchrec_mec.modules.quantized_embedding_bag_collection import EMPTY_SLOT
from torchrec_mec.ops.fast_lookup import cpu_operator_available
from torchrec_mec.quantize import assign_codes, promote_frequent, promote_ids

from tests.pooling_reference import pooled_reference
from tests.qebc_testing import randomize_
from tests.test_quantized_embedding_bag_collection import random_kjt

CODED, NEW = 40, 25  # t_new: ids [0, 40) have codes, [40, 65) are new


def configs(pooling: PoolingType) -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(name="t_new", num_embeddings=CODED + NEW, embedding_dim=8,
                                    feature_names=["a", "b"], num_subspaces=4, codebook_size=16,
                                    coded_rows=CODED, fallback_rows=6, promotion_slots=5,
                                    pooling=pooling),
        # uint16 codes and a register-sum shape (M=4, d=16) with a fallback
        QuantizedEmbeddingBagConfig(name="t_wide", num_embeddings=320, embedding_dim=64,
                                    feature_names=["c"], num_subspaces=4, codebook_size=300,
                                    coded_rows=300, fallback_rows=3, promotion_slots=2,
                                    pooling=pooling),
        QuantizedEmbeddingBagConfig(name="t_pq", num_embeddings=30, embedding_dim=4,
                                    feature_names=["d"], num_subspaces=2, codebook_size=8,
                                    pooling=pooling),
        QuantizedEmbeddingBagConfig(name="t_full", num_embeddings=12, embedding_dim=4,
                                    feature_names=["e"], pooling=pooling),
    ]


def collection(pooling: PoolingType, weighted: bool, seed: int = 0) -> QuantizedEmbeddingBagCollection:
    """Random codes and parameters; two new ids of t_new and one of t_wide promoted."""
    qebc = randomize_(QuantizedEmbeddingBagCollection(configs(pooling), is_weighted=weighted), seed)
    qebc.promote("t_new", torch.tensor([61, 44]), torch.tensor([[1, 2, 3, 4], [15, 0, 7, 9]]))
    qebc.promote("t_wide", torch.tensor([310]), torch.tensor([[299, 0, 150, 7]]))
    return qebc


def rows64(module, fallback: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Every id's row in float64, resolved in plain Python (autograd to fallback and books)."""
    promoted = [int(v) for v in module.promoted_ids.tolist()] if module.fallback is not None else []
    rows = []
    for i in range(module.num_embeddings):
        if module.fallback is not None and i >= module.coded_rows and i not in promoted:
            rows.append(fallback[(i - module.coded_rows) % fallback.shape[0]])
            continue
        r = i if i < module.coded_rows else module.coded_rows + promoted.index(i)
        rows.append(torch.cat([books[m, int(module.codes[r, m])] for m in range(books.shape[0])]))
    return torch.stack(rows)


def leaves64(qebc) -> Dict[str, torch.Tensor]:
    out = {}
    for name, module in qebc.embedding_bags.items():
        if isinstance(module, ProductQuantizedTable):
            out[name + ".codebooks"] = module.codebooks.detach().double().requires_grad_()
            if module.fallback is not None:
                out[name + ".fallback"] = module.fallback.detach().double().requires_grad_()
        else:
            out[name + ".weight"] = module.weight.detach().double().requires_grad_()
    return out


def tables64(qebc, leaves) -> Dict[str, torch.Tensor]:
    out = {}
    for name, module in qebc.embedding_bags.items():
        if isinstance(module, ProductQuantizedTable):
            out[name] = rows64(module, leaves.get(name + ".fallback"), leaves[name + ".codebooks"])
        else:
            out[name] = leaves[name + ".weight"]
    return out


def parameters(qebc) -> Dict[str, torch.Tensor]:
    return {n.replace("embedding_bags.", ""): p for n, p in qebc.named_parameters()}


@pytest.mark.parametrize("path", ["operator", "per_feature"])
@pytest.mark.parametrize("pooling,weighted", [
    (PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, False),
])
def test_fallback_lookup_and_gradients_match_float64(path, pooling, weighted):
    if path == "operator" and not cpu_operator_available():
        pytest.skip("torchrec_mec._C is not built (pip install --no-build-isolation -e .)")
    qebc = collection(pooling, weighted)
    kjt = random_kjt(qebc.embedding_bag_configs(), batch=16, max_len=5, weighted=weighted, seed=1)
    values = kjt.to_dict()
    below = values["a"].values() < CODED
    assert below.any() and (~below).any()  # ids below and above the coded range
    assert bool(torch.isin(values["a"].values(), torch.tensor([44, 61])).any())  # promoted ones
    out = qebc(kjt).values() if path == "operator" else qebc._device_forward(qebc._split(kjt))

    leaves = leaves64(qebc)
    ref = pooled_reference(tables64(qebc, leaves), qebc.embedding_bag_configs(), kjt, weighted)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    upstream = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(upstream.float())
    ref.backward(upstream)
    for name, param in parameters(qebc).items():
        torch.testing.assert_close(param.grad.double(), leaves[name].grad, atol=1e-5, rtol=1e-5,
                                   msg=name)
    assert parameters(qebc)["t_new.fallback"].grad.abs().sum() > 0


def test_ids_outside_the_id_space_still_fail_with_the_named_error():
    qebc = collection(PoolingType.SUM, False)
    for bad in (CODED + NEW, -1):
        kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b", "c", "d", "e"],
                                                  torch.tensor([3, bad, 1, 2, 0]),
                                                  torch.tensor([1, 1, 1, 1, 1]))
        with pytest.raises(ValueError, match=f"feature 'b': id {bad} is out of range for table "
                                             f"'t_new' with {CODED + NEW} rows"):
            qebc(kjt)
    with pytest.raises(ValueError, match="id 65 is out of range for table 't_new'"):
        qebc.embedding_bags["t_new"].embeddings(torch.tensor([65]))


def brute_force_codes(x: torch.Tensor, books: torch.Tensor) -> List[List[int]]:
    m_count, k_count, d = books.shape
    codes = []
    for row in x.tolist():
        codes.append([])
        for m in range(m_count):
            sub = row[m * d:(m + 1) * d]
            dists = [sum((a - b) ** 2 for a, b in zip(sub, books[m, k].tolist()))
                     for k in range(k_count)]
            codes[-1].append(dists.index(min(dists)))
    return codes


@pytest.mark.parametrize("k", [16, 300])
def test_assign_codes_is_the_nearest_codeword_per_subspace(k):
    gen = torch.Generator().manual_seed(2)
    books = torch.randn(3, k, 2, generator=gen)
    x = torch.randn(20, 6, generator=gen)
    codes = assign_codes(x, books)
    assert codes.dtype == (torch.uint8 if k <= 256 else torch.uint16)
    assert codes.to(torch.int64).tolist() == brute_force_codes(x, books)


def test_promotion_moves_an_id_from_the_fallback_to_codes():
    qebc = collection(PoolingType.SUM, False)
    table = qebc.embedding_bags["t_new"]
    new_id, sharer = 52, 58  # both read fallback row (52 - 40) % 6 == (58 - 40) % 6 == 0
    before = table.embeddings(torch.tensor([new_id, sharer])).detach()
    torch.testing.assert_close(before, table.fallback[[0, 0]].detach())
    with torch.no_grad():
        table.fallback[0] = table.decode(torch.tensor([7]))[0] + 0.01  # near a decodable row
    codes = promote_ids(qebc, "t_new", torch.tensor([new_id]))
    assert codes.tolist() == brute_force_codes(table.fallback[[0]].detach(), table.codebooks.detach())
    assert table.promoted_ids.tolist()[:3] == [44, 52, 61] and table.num_promoted == 3
    after = table.embeddings(torch.tensor([new_id, sharer])).detach()
    slot = 1 + CODED  # 52 sorts between 44 and 61
    assert torch.equal(table.codes[slot], codes[0])
    decoded = torch.cat([table.codebooks[m, int(codes[0, m])] for m in range(4)]).detach()
    torch.testing.assert_close(after[0], decoded)
    torch.testing.assert_close(after[0], table.decode(torch.tensor([7]))[0].detach())
    torch.testing.assert_close(after[1], table.fallback[0].detach())  # the sharer stays
    # The pooled lookup reads the new codes: a bag holding only the promoted id.
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b", "c", "d", "e"],
                                              torch.tensor([new_id, 1, 1, 1, 1]),
                                              torch.tensor([1, 1, 1, 1, 1]))
    torch.testing.assert_close(qebc(kjt).to_dict()["a"][0], decoded)


def test_promotion_refuses_what_it_cannot_do():
    qebc = collection(PoolingType.SUM, False)
    with pytest.raises(ValueError, match="table 't_new': id 12 is not a new id"):
        promote_ids(qebc, "t_new", torch.tensor([12]))
    with pytest.raises(ValueError, match="table 't_new': id 44 is already promoted"):
        promote_ids(qebc, "t_new", torch.tensor([44]))
    with pytest.raises(ValueError, match="table 't_new': 4 ids to promote but only 3 of 5"):
        promote_ids(qebc, "t_new", torch.tensor([40, 41, 42, 43]))
    with pytest.raises(ValueError, match="table 't_pq' is not a compressed table with a fallback"):
        promote_ids(qebc, "t_pq", torch.tensor([1]))
    assert qebc.embedding_bags["t_new"].num_promoted == 2  # nothing changed


def test_promote_frequent_takes_the_busiest_new_ids_that_fit():
    qebc = collection(PoolingType.SUM, False)
    counts = torch.zeros(CODED + NEW, dtype=torch.int64)
    counts[:CODED] = 1000  # coded ids are never promoted
    counts[[41, 44, 50, 55, 63, 64]] = torch.tensor([30, 99, 12, 30, 4, 50])  # 44 is promoted
    chosen = promote_frequent(qebc, {"t_new": counts}, min_count=10)
    assert chosen["t_new"].tolist() == [64, 41, 55]  # 3 free slots: 50 (12) does not fit
    assert chosen["t_wide"].tolist() == []
    assert qebc.embedding_bags["t_new"].promoted_ids.tolist() == [41, 44, 55, 61, 64]


def test_state_dict_round_trips_and_bad_new_id_state_names_the_table():
    qebc = collection(PoolingType.SUM, True, seed=3)
    state = qebc.state_dict()
    assert {"embedding_bags.t_new.fallback", "embedding_bags.t_new.promoted_ids"} <= set(state)
    fresh = QuantizedEmbeddingBagCollection(configs(PoolingType.SUM), is_weighted=True)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    kjt = random_kjt(qebc.embedding_bag_configs(), batch=8, max_len=5, weighted=True, seed=4)
    assert torch.equal(fresh(kjt).values(), qebc(kjt).values())

    unsorted = dict(state, **{"embedding_bags.t_new.promoted_ids": torch.tensor(
        [61, 44, EMPTY_SLOT, EMPTY_SLOT, EMPTY_SLOT])})
    with pytest.raises(ValueError, match="table 't_new': promoted_ids must be new ids in"):
        fresh.load_state_dict(unsorted)
    coded = dict(state, **{"embedding_bags.t_new.promoted_ids": torch.tensor(
        [3, EMPTY_SLOT, EMPTY_SLOT, EMPTY_SLOT, EMPTY_SLOT])})
    with pytest.raises(ValueError, match="table 't_new': promoted_ids must be new ids"):
        fresh.load_state_dict(coded)
    with pytest.raises(ValueError, match=r"table 't_wide': fallback is torch.float32 \(4, 64\)"):
        fresh.load_state_dict({"embedding_bags.t_wide.fallback": torch.zeros(4, 64)}, strict=False)
    for key, value in fresh.state_dict().items():  # nothing was loaded by the failed calls
        assert torch.equal(value, state[key]), key


def test_meta_construction_and_reset_parameters_give_the_eager_values():
    torch.manual_seed(5)
    eager = QuantizedEmbeddingBagCollection(configs(PoolingType.SUM))
    torch.manual_seed(5)
    meta = QuantizedEmbeddingBagCollection(configs(PoolingType.SUM), device=torch.device("meta"))
    assert meta.embedding_bags["t_new"].fallback.device.type == "meta"
    meta.to_empty(device=torch.device("cpu"))
    meta.reset_parameters()
    for (key, a), b in zip(eager.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), key
    table = eager.embedding_bags["t_new"]
    assert table.promoted_ids.tolist() == [EMPTY_SLOT] * 5
    assert 0 < table.fallback.abs().max() <= table.config.get_weight_init_max()


def test_memory_report_counts_fallback_bytes():
    report = collection(PoolingType.SUM, False).memory_report().tables
    new = report["t_new"]
    assert new.codes_bytes == (CODED + 5) * 4  # coded rows and promotion slots, 4 uint8 codes
    assert new.fallback_bytes == 6 * 8 * 4 + 5 * 8  # fallback floats and promoted ids
    assert new.total_bytes == new.codes_bytes + new.codebooks_bytes + new.fallback_bytes
    assert new.baseline_bytes == (CODED + NEW) * 8 * 4
    assert report["t_wide"].codes_bytes == (300 + 2) * 4 * 2  # uint16 codes
    assert report["t_pq"].fallback_bytes == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(coded_rows=40), r"ids \[40, 65\) have no codes and need a fallback table"),
    (dict(fallback_rows=3), "fallback_rows=3 but every id has codes"),
    (dict(coded_rows=0, fallback_rows=3), r"coded_rows must be an integer in \[1, num_embeddings=65\]"),
    (dict(coded_rows=60, fallback_rows=3, promotion_slots=6), "promotion_slots=6 is more than"),
    (dict(coded_rows=40, fallback_rows=-1), "fallback_rows must be an integer >= 0"),
])
def test_new_id_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=f"table 't': {message}"):
        QuantizedEmbeddingBagConfig(name="t", num_embeddings=65, embedding_dim=8,
                                    num_subspaces=4, codebook_size=16, **kwargs)
    with pytest.raises(ValueError, match="are for compressed tables"):
        QuantizedEmbeddingBagConfig(name="t", num_embeddings=65, embedding_dim=8, coded_rows=40,
                                    fallback_rows=3)


def test_load_codes_takes_the_coded_rows_and_keeps_the_promoted_ones():
    qebc = collection(PoolingType.SUM, False)
    table = qebc.embedding_bags["t_new"]
    promoted = table.codes[CODED:].clone()
    codes = torch.randint(0, 16, (CODED, 4), dtype=torch.uint8)
    qebc.load_codes("t_new", codes, table.codebooks.detach().clone())
    assert torch.equal(table.codes[:CODED], codes) and torch.equal(table.codes[CODED:], promoted)


pytestmark_compile = pytest.mark.skipif(
    not cpu_operator_available(),
    reason="torchrec_mec._C is not built (pip install --no-build-isolation -e .)")


def model_with_fallback(name: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=8, dense_hidden_sizes=(16,),
                                    over_hidden_sizes=(16,), dcn_num_layers=2, dcn_low_rank_dim=4,
                                    deepfm_dimension=8),
                        num_dense=3, sparse_names=["C1", "C2"], num_embeddings={"C1": 65, "C2": 7},
                        compressed={"t_C1": (4, 16)},
                        new_ids={"t_C1": {"coded_rows": 40, "fallback_rows": 6, "promotion_slots": 5}})
    qebc = model.embedding_bag_collection
    with torch.no_grad():
        qebc.embedding_bags["t_C1"].fallback.normal_()
    promote_ids(qebc, "t_C1", torch.tensor([50, 61]))
    return model


def ctr_batch(seed: int, batch: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (2 * batch,), generator=gen)
    sizes = lengths.view(2, -1).sum(1).tolist()
    values = torch.cat([torch.randint(0, 65, (sizes[0],), generator=gen),
                        torch.randint(0, 7, (sizes[1],), generator=gen)])
    return torch.randn(batch, 3, generator=gen), KeyedJaggedTensor(keys=["C1", "C2"], values=values,
                                                                    lengths=lengths)


@pytestmark_compile
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_with_fallback_tables_compile_fullgraph_and_export(name):
    # Each model is a new module to guard on: start from empty caches, so that the compiles of
    # earlier tests in the session do not count against dynamo's recompile limit.
    torch._dynamo.reset()
    model = model_with_fallback(name)
    dense, kjt = ctr_batch(seed=2)
    assert bool((kjt.to_dict()["C1"].values() >= 40).any())

    def run(call):
        model.zero_grad(set_to_none=True)
        out = call(dense, kjt)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_out, eager_grads = run(model)
    out, grads = run(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for param, grad in eager_grads.items():
        torch.testing.assert_close(grads[param], grad, atol=1e-5, rtol=1e-5, msg=param)
    assert grads["arch.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.fallback"].abs().sum() > 0

    program = torch.export.export(model, (dense, kjt))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(dense, kjt), model(dense, kjt),
                                   atol=1e-5, rtol=1e-5)


def test_every_promoted_id_reads_its_own_slot():
    """Ids on both sides of every promoted one (the binary search's edges), one bag each."""
    qebc = collection(PoolingType.SUM, False)
    table = qebc.embedding_bags["t_new"]
    ids = torch.tensor(sorted({i for p in (44, 61) for i in (p - 1, p, p + 1)} | {CODED, 64}))
    lengths = torch.cat([torch.ones(len(ids), dtype=torch.int64),
                         torch.zeros(4 * len(ids), dtype=torch.int64)])
    kjt = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"], values=ids, lengths=lengths)
    out = qebc(kjt).to_dict()["a"]
    leaves = leaves64(qebc)
    expected = rows64(table, leaves["t_new.fallback"], leaves["t_new.codebooks"])[ids]
    torch.testing.assert_close(out.double(), expected.detach())
    for i, j in itertools.combinations(range(len(ids)), 2):
        if int(ids[i]) in (44, 61) or int(ids[j]) in (44, 61):
            assert not torch.equal(out[i], out[j])
