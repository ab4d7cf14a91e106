"""The MEC quantizer (stage 2) on small tables, against independent references."""
import math

import pytest
import torch

from torchrec_mec.modules.quantized_embedding_configs import code_dtype
from torchrec_mec.quantize import (
    MECConfig,
    MECQuantizer,
    popularity_weights,
    quantize_table,
    row_weights,
)
from torchrec_mec.quantize.kmeans import nearest_codewords, weighted_sample
from torchrec_mec.quantize.losses import (
    contrastive_loss,
    semi_synthetic_negatives,
    usage_regularizer,
)

# Small and fast: a few thousand rows, a few hundred optimizer steps at most.
SMALL = dict(num_subspaces=2, codebook_size=16, epochs=4, samples_per_epoch=4096,
             batch_size=1024, eval_rows=512)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def planted_table(seed: int, n: int, m: int, k: int, d: int, sigma: float):
    """Rows made of known codewords (M codebooks, well separated) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(m, k, d, generator=g)
    codes = torch.randint(k, (n, m), generator=g)
    rows = codebooks[torch.arange(m), codes].flatten(1) + sigma * torch.randn(n, m * d, generator=g)
    counts = torch.randint(0, 1000, (n,), generator=g)
    return rows, counts, codebooks, codes


def gaussian_table(seed: int, n: int = 3000, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 500, (n,), generator=g)


def same_result(a, b) -> bool:
    sa, sb = a.stats.to_dict(), b.stats.to_dict()
    sa.pop("seconds"), sb.pop("seconds")
    sa.pop("resumed_from_epoch"), sb.pop("resumed_from_epoch")
    return torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and sa == sb


def test_nearest_codewords_matches_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 12, generator=g)
    codebooks = torch.randn(3, 37, 4, generator=g)
    codes = nearest_codewords(x, codebooks, chunk_rows=7)  # many chunks, a ragged last one
    subs = x.double().view(-1, 3, 4)
    dist = ((subs.unsqueeze(2) - codebooks.double().unsqueeze(0)) ** 2).sum(-1)  # [N, M, K]
    best = dist.min(-1).values
    chosen = dist.gather(2, codes.unsqueeze(2)).squeeze(2)
    assert codes.shape == (1000, 3) and int(codes.min()) >= 0 and int(codes.max()) < 37
    # float32 may flip exact near-ties; the chosen codeword must still be (near) nearest.
    assert torch.allclose(chosen, best, rtol=1e-5, atol=1e-5)
    assert (codes == dist.argmin(-1)).float().mean() > 0.99


def test_weighted_sample_follows_weights_and_never_draws_zero_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.0, 1.0, 3.0, 0.0])
    draws = weighted_sample(w, 40_000, g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[0] == 0 and freq[3] == 0
    assert abs(freq[2] - 0.75) < 0.01


def test_popularity_weights_are_floor_log2_at_least_one():
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1023, 1024, 10**9])
    want = [max(1, math.floor(math.log2(c))) if c > 0 else 1 for c in counts.tolist()]
    assert popularity_weights(counts).tolist() == want


def test_negatives_differ_from_positive_in_exactly_one_code_per_sample():
    g = torch.Generator().manual_seed(0)
    k = 8
    codes = torch.randint(k, (2000, 4), generator=g)
    neg = semi_synthetic_negatives(codes, k, num_negatives=3, generator=g)
    assert neg.shape == (2000, 3, 4)
    differs = neg != codes.unsqueeze(1)
    assert (differs.sum(-1) == 1).all()
    assert int(neg.min()) >= 0 and int(neg.max()) < k
    # Per sample, not per batch: subspace and replacement vary across samples and negatives.
    which = differs.float().argmax(-1)
    assert set(which.flatten().tolist()) == {0, 1, 2, 3}
    shift = (neg - codes.unsqueeze(1)).sum(-1) % k
    assert set(shift.flatten().tolist()) == set(range(1, k))


def test_usage_regularizer_is_kl_from_uniform_with_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 6, generator=g, requires_grad=True)
    reg = usage_regularizer(logits)
    p = torch.softmax(logits.detach().double(), -1).mean(1)
    want = (p * (p * 6).log()).sum(-1).mean()
    assert torch.allclose(reg.double(), want, atol=1e-6)
    reg.backward()
    assert logits.grad.abs().sum() > 0  # unlike a perplexity of hard one-hot codes
    uniform = torch.zeros(2, 50, 6)
    assert abs(float(usage_regularizer(uniform))) < 1e-6


def test_contrastive_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    anchor, pos = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    negs, w = torch.randn(5, 3, 6, generator=g), torch.rand(5, generator=g)
    got = contrastive_loss(anchor, pos, negs, temperature=0.2, weights=w)
    total = 0.0
    for i in range(5):
        cands = [pos[i]] + [negs[i, j] for j in range(3)]
        sims = [float(torch.dot(anchor[i].double(), c.double())
                      / (anchor[i].double().norm() * c.double().norm())) / 0.2 for c in cands]
        total += float(w[i]) * (math.log(sum(math.exp(s) for s in sims)) - sims[0])
    assert abs(float(got) - total / float(w.sum())) < 1e-5


def test_deterministic_for_a_seed():
    weight, counts = gaussian_table(0)
    a = quantize_table(weight, counts, MECConfig(**SMALL, seed=3), progress=False)
    b = quantize_table(weight, counts, MECConfig(**SMALL, seed=3), progress=False)
    c = quantize_table(weight, counts, MECConfig(**SMALL, seed=4), progress=False)
    assert same_result(a, b)
    assert not torch.equal(a.codebooks, c.codebooks)


@pytest.mark.parametrize("k", [16, 300])
def test_codes_in_range_and_packed(k):
    weight, counts = gaussian_table(1, n=1200)
    cfg = MECConfig(**{**SMALL, "codebook_size": k, "epochs": 1})
    res = quantize_table(weight, counts, cfg, progress=False)
    assert res.codes.dtype == code_dtype(k) == (torch.uint8 if k <= 256 else torch.uint16)
    assert res.codes.shape == (1200, 2) and int(res.codes.long().max()) < k
    assert res.codebooks.shape == (2, k, 4) and res.codebooks.dtype == torch.float32
    # Codebooks live in the table's space: the decoded rows are the reported error.
    decoded = res.codebooks[torch.arange(2), res.codes.long()].flatten(1)
    assert math.isclose(float(((weight - decoded) ** 2).mean()), res.stats.mse, rel_tol=1e-4)
    usage = torch.bincount(res.codes[:, 0].long(), minlength=k).double() / 1200
    nz = usage[usage > 0]
    assert math.isclose(res.stats.perplexity[0], float(torch.exp(-(nz * nz.log()).sum())),
                        rel_tol=1e-6)
    assert res.stats.dead_codewords[0] == int((usage == 0).sum())


def test_planted_codebook_is_recovered_to_the_noise_floor():
    sigma = 0.01
    rows, counts, planted, planted_codes = planted_table(0, n=4000, m=4, k=16, d=4, sigma=sigma)
    # Every row, seen or not, is a planted codeword plus noise: all of them are encoded.
    cfg = MECConfig(**{**SMALL, "num_subspaces": 4}, unseen_rows="nearest")
    res = quantize_table(rows, counts, cfg, progress=False)
    assert res.stats.mse < 1.2 * sigma**2  # the noise floor is sigma^2 per element
    # Every planted codeword has a learned one within a few noise standard deviations ...
    gap = torch.cdist(planted, res.codebooks).min(-1).values
    assert float(gap.max()) < 5 * sigma
    # ... and the learned codes are the planted ones up to a relabelling per codebook.
    for m in range(4):
        pairs = set(zip(planted_codes[:, m].tolist(), res.codes[:, m].long().tolist()))
        assert len(pairs) == 16


def test_popularity_weighting_lowers_error_of_popular_ids():
    weight, _ = gaussian_table(2, n=6000)
    counts = torch.ones(6000, dtype=torch.long)
    popular = torch.randperm(6000, generator=torch.Generator().manual_seed(123))[:60]
    counts[popular] = 2**30  # weight 30: the 1% popular ids carry a third of the mass
    on = quantize_table(weight, counts, MECConfig(**SMALL), progress=False)
    off = quantize_table(weight, counts, MECConfig(**SMALL, weighting="uniform"),
                         progress=False)
    assert on.stats.mse_popular < 0.9 * off.stats.mse_popular
    assert on.stats.weighted_mse < off.stats.weighted_mse


def test_traffic_weighting_gives_rows_never_seen_no_weight():
    counts = torch.tensor([0, 1, 5, 0, 1000])
    assert row_weights(counts, "traffic").tolist() == [0.0, 1.0, 5.0, 0.0, 1000.0]
    assert row_weights(counts, "uniform").tolist() == [1.0] * 5
    published = [max(1, math.floor(math.log2(c))) if c else 1 for c in counts.tolist()]
    assert row_weights(counts, "published").tolist() == published
    weight, counts = gaussian_table(7, n=3000)
    counts[::3] = 0
    unseen = counts == 0
    moved = weight.clone()
    moved[unseen] = 50 * torch.randn(int(unseen.sum()), 8, generator=torch.Generator().manual_seed(1))
    # Rows never seen do not change the codebooks or the codes of the other rows ...
    a = quantize_table(weight, counts, MECConfig(**SMALL), progress=False)
    b = quantize_table(moved, counts, MECConfig(**SMALL), progress=False)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.codes[~unseen], b.codes[~unseen])
    # ... which they do with MEC's published weights (every row counts at least once).
    cfg = MECConfig(**SMALL, weighting="published")
    c = quantize_table(weight, counts, cfg, progress=False)
    d = quantize_table(moved, counts, cfg, progress=False)
    assert not torch.equal(c.codebooks, d.codebooks)
    assert a.stats.traffic_mse < c.stats.traffic_mse


def test_a_table_never_seen_in_training_falls_back_to_uniform_weights():
    weight, _ = gaussian_table(8, n=1000)
    res = quantize_table(weight, torch.zeros(1000), MECConfig(**SMALL), progress=False)
    assert res.stats.relative_mse < 1.0
    assert res.stats.traffic_mse == res.stats.mse


def test_kmeans_pq_config_is_plain_per_subspace_kmeans():
    rows, counts, _, _ = planted_table(1, n=2000, m=2, k=8, d=3, sigma=0.3)
    # A sample of up to 256 x K rows covers the whole table: k-means runs on every row.
    cfg = MECConfig(num_subspaces=2, codebook_size=8, kmeans_iters=50,
                    kmeans_points_per_centroid=256).kmeans_pq()
    res = quantize_table(rows, counts, cfg, progress=False)
    assert res.stats.epochs_run == 0 and res.stats.eval_loss == []
    # A k-means fixed point, checked in float64: every code is the nearest codeword of its
    # sub-vector, and every codeword is the (unweighted) mean of the sub-vectors coded to it.
    x, cb, codes = rows.double().view(-1, 2, 3), res.codebooks.double(), res.codes.long()
    dist = ((x.unsqueeze(2) - cb.unsqueeze(0)) ** 2).sum(-1)  # [N, M, K]
    assert torch.allclose(dist.gather(2, codes.unsqueeze(2)).squeeze(2), dist.min(-1).values,
                          atol=1e-9, rtol=1e-6)
    for m in range(2):
        for k in range(8):
            members = x[codes[:, m] == k, m]
            assert members.shape[0] > 0
            assert torch.allclose(cb[m, k], members.mean(0), atol=1e-5)
    # Counts play no part.
    flat = quantize_table(rows, torch.ones(2000), cfg, progress=False)
    assert torch.equal(flat.codebooks, res.codebooks) and torch.equal(flat.codes, res.codes)


def test_kmeans_pq_config_matches_faiss_product_quantizer():
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is a dev requirement")
    weight, counts = gaussian_table(9, n=4000, d=8)
    res = quantize_table(weight, counts,
                         MECConfig(num_subspaces=2, codebook_size=16).kmeans_pq(), progress=False)
    pq = faiss.ProductQuantizer(8, 2, 4)
    pq.train(weight.numpy())
    ref = torch.from_numpy(pq.decode(pq.compute_codes(weight.numpy())))
    faiss_mse = float((weight.double() - ref.double()).pow(2).mean())
    # Two k-means runs land in different local optima: equal within a few percent.
    assert abs(res.stats.mse - faiss_mse) < 0.03 * faiss_mse


def test_usage_regularizer_raises_perplexity():
    g = torch.Generator().manual_seed(2)
    # Heavy-tailed rows: k-means spends codewords on rarely used tails (low perplexity).
    weight = torch.randn(6000, 8, generator=g) * torch.exp(torch.randn(6000, 1, generator=g))
    counts = torch.randint(0, 100, (6000,), generator=g)
    base = {**SMALL, "epochs": 8, "lr": 1e-2, "contrastive_weight": 0.0,
            "early_stopping_patience": 0, "unseen_rows": "nearest"}  # perplexity over all rows
    off = quantize_table(weight, counts, MECConfig(**base, reg_weight=0.0), progress=False)
    on = quantize_table(weight, counts, MECConfig(**base, reg_weight=1.0), progress=False)
    for with_reg, without in zip(on.stats.perplexity, off.stats.perplexity):
        assert with_reg > 1.1 * without


def test_every_part_can_be_switched_off():
    weight, counts = gaussian_table(3, n=1000)
    cfg = MECConfig(**SMALL, encoder="none", weighting="uniform", reg_weight=0.0,
                    contrastive_weight=0.0, reseed_dead=False, kmeans_init=False,
                    early_stopping_patience=0)
    res = quantize_table(weight, counts, cfg, progress=False)
    assert res.stats.epochs_run == SMALL["epochs"] and res.stats.eval_loss == []
    assert res.stats.relative_mse < 1.0


@pytest.mark.parametrize("metric", ["error", "loss"])
def test_early_stopping_keeps_the_best_evaluated_state(metric):
    weight, counts = gaussian_table(4)
    # A huge learning rate wrecks the codebooks: the k-means start (epoch 0) must be kept.
    cfg = MECConfig(**{**SMALL, "epochs": 20, "lr": 50.0}, early_stopping_patience=2,
                    early_stopping_metric=metric)
    res = quantize_table(weight, counts, cfg, progress=False)
    assert res.stats.best_epoch == 0 and res.stats.epochs_run == 2
    assert len(res.stats.eval_loss) == 3
    assert res.stats.eval_loss[0] == min(res.stats.eval_loss)


def test_early_stopping_on_error_keeps_no_state_worse_than_the_kmeans_start():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(3000, 8, generator=g) * torch.exp(torch.randn(3000, 1, generator=g))
    counts = torch.randint(0, 50, (3000,), generator=g)
    # Heavy usage and contrastive terms: the objective falls while the reconstruction error rises.
    base = {**SMALL, "epochs": 10, "reg_weight": 1.0, "contrastive_weight": 0.5,
            "eval_rows": 4096, "early_stopping_patience": 3}
    start = quantize_table(weight, counts, MECConfig(**{**base, "epochs": 0}), progress=False)
    by_loss = quantize_table(weight, counts, MECConfig(**base, early_stopping_metric="loss"),
                             progress=False)
    by_error = quantize_table(weight, counts, MECConfig(**base), progress=False)
    assert by_loss.stats.best_epoch > 0  # the objective kept improving ...
    assert by_loss.stats.traffic_mse > 1.03 * start.stats.traffic_mse  # ... at the error's cost
    errors = by_error.stats.eval_loss
    assert errors[by_error.stats.best_epoch] == min(errors)
    assert by_error.stats.epochs_run < base["epochs"]  # stopped after the patience
    # The same k-means start up to its random draw (the evaluation rows are drawn first).
    assert by_error.stats.traffic_mse < 1.02 * start.stats.traffic_mse


def test_rows_never_seen_decode_to_zero_through_the_least_used_codeword():
    weight, counts = gaussian_table(6, n=3000)
    counts[::3] = 0  # a third of the rows never seen in training
    base = {**SMALL, "encoder": "none", "epochs": 2}
    near = quantize_table(weight, counts, MECConfig(**base, unseen_rows="nearest"), progress=False)
    zero = quantize_table(weight, counts, MECConfig(**base), progress=False)
    unseen, m = counts == 0, SMALL["num_subspaces"]
    cb = zero.codebooks.double()
    decoded = cb[torch.arange(m), zero.codes.long()].flatten(-2)
    assert decoded[unseen].abs().max() < 1e-5
    for j in range(m):
        # The codeword moved is the one the seen rows' traffic used least under "nearest".
        traffic = torch.bincount(near.codes[~unseen, j].long(), weights=counts[~unseen].double(),
                                 minlength=SMALL["codebook_size"])
        moved = int(torch.argmin(traffic))
        assert (zero.codes[unseen, j].long() == moved).all()
        other = torch.arange(SMALL["codebook_size"]) != moved
        assert torch.equal(zero.codebooks[j, other], near.codebooks[j, other])
        # Seen rows: the nearest codeword of the final codebook (float64 brute force).
        sub = weight[~unseen, j * 4 : (j + 1) * 4].double()
        nearest = torch.cdist(sub, cb[j]).argmin(1)
        assert (zero.codes[~unseen, j].long() == nearest).float().mean() > 0.999
    near_decoded = near.codebooks[torch.arange(m), near.codes.long()].flatten(-2)
    assert near_decoded[unseen].abs().amax(1).min() > 1e-2  # "nearest": trained codewords
    assert zero.stats.traffic_mse < 1.1 * near.stats.traffic_mse


def test_kmeans_pq_encodes_every_row_to_its_nearest_codeword():
    assert MECConfig().kmeans_pq().unseen_rows == "nearest"


def test_dead_codewords_are_reseeded():
    weight, counts = gaussian_table(5, n=2000)
    g = torch.Generator().manual_seed(0)
    mq = MECQuantizer(8, 2, 16, encoder="none", generator=g)
    mq.init_from_sample(weight, kmeans_iters=5, generator=g)
    with torch.no_grad():
        mq.codebooks[0, 3] = 1e3  # far from every row: nobody picks it
    from torchrec_mec.quantize.quantize_table import _train_epoch

    opt = torch.optim.Adam(mq.parameters(), lr=1e-3)
    for reseed in (False, True):
        cfg = MECConfig(**SMALL, reseed_dead=reseed)
        _train_epoch(mq, opt, weight, torch.ones(2000), cfg, g)
        far = float(mq.codebooks[0, 3].abs().max())
        assert (far > 100) == (not reseed)
    assert int(torch.bincount(mq.compute_codes(weight)[:, 0], minlength=16)[3]) > 0


@pytest.mark.parametrize(
    "weight, counts, cfg, match",
    [
        (torch.zeros(100, 8, dtype=torch.long), torch.ones(100), {}, "2-D float"),
        (torch.zeros(100), torch.ones(100), {}, "2-D float"),
        (torch.zeros(100, 8), torch.ones(99), {}, "length N=100"),
        (torch.zeros(100, 8), -torch.ones(100), {}, ">= 0"),
        (torch.zeros(100, 9), torch.ones(100), {}, "not divisible"),
        (torch.zeros(10, 8), torch.ones(10), {}, "exceeds the number of rows"),
        (torch.full((100, 8), float("nan")), torch.ones(100), {}, "NaN"),
    ],
)
def test_bad_input_names_the_table(weight, counts, cfg, match):
    with pytest.raises(ValueError, match=f"table 'user_id'.*{match}"):
        quantize_table(weight, counts, MECConfig(**{**SMALL, **cfg}), name="user_id",
                       progress=False)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="codebook_size"):
        MECConfig(codebook_size=1)
    with pytest.raises(ValueError, match="encoder"):
        MECConfig(encoder="transformer")


def test_result_loads_into_qebc_and_reproduces_the_reconstruction():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_mec.modules import QuantizedEmbeddingBagCollection

    weight, counts = gaussian_table(6, n=1000)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", num_embeddings=1000,
                                                     embedding_dim=8, feature_names=["f"])])
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(weight)
    res = quantize_table(weight, counts, MECConfig(**SMALL), progress=False)
    qebc = QuantizedEmbeddingBagCollection.from_embedding_bag_collection(
        ebc, {"t": (res.codes, res.codebooks)})
    ids = torch.tensor([3, 999, 0])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids,
                                              lengths=torch.tensor([1, 1, 1]))
    pooled = qebc(kjt)["f"]
    decoded = res.codebooks[torch.arange(2), res.codes[ids].long()].flatten(1)
    assert torch.allclose(pooled, decoded, atol=1e-6)
    # the compressed rows approximate the pretrained ones (stage 3 starts from them)
    assert float((pooled - weight[ids]).pow(2).mean()) < float(weight[ids].pow(2).mean())


def test_docs_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "quantizer.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/quantizer.md", "exec"), {})
