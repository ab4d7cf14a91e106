"""The synthetic generator: determinism, power-law popularity, the planted click model."""
import tracemalloc

import numpy as np
import pytest
import torch

from torchrec_mec.data import (
    EncodedDataset,
    SyntheticConfig,
    prepare_dataset,
)

SPLITS = ("train", "val", "test")


def make(tmp_path, name, seed=0, chunk_rows=65536, **config):
    return prepare_dataset(None, "synthetic", str(tmp_path / name), seed=seed,
                           synthetic=SyntheticConfig(**config), progress=False,
                           chunk_rows=chunk_rows)


def rank_auc(scores, labels):
    """AUC as the Mann-Whitney statistic (average ranks for ties), independent of torchmetrics."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_deterministic_for_a_seed_whatever_the_chunking(tmp_path):
    cfg = dict(num_rows=3000, table_sizes=(1000, 50, 5), num_dense=4)
    a = make(tmp_path, "a", seed=7, **cfg)
    b = make(tmp_path, "b", seed=7, chunk_rows=333, **cfg)
    c = make(tmp_path, "c", seed=8, **cfg)
    digest = lambda ds: {k: v["sha256"] for k, v in ds.manifest["files"].items()}  # noqa: E731
    assert digest(a) == digest(b)
    assert all(digest(a)[k] != digest(c)[k] for k in digest(a))
    assert a.schema.dense_names == ("I1", "I2", "I3", "I4")
    assert a.num_embeddings == {"C1": 1001, "C2": 51, "C3": 6}


def test_power_law_popularity_with_permuted_ids(tmp_path):
    exponent, size = 1.1, 10_000
    ds = make(tmp_path, "z", num_rows=100_000, table_sizes=(size, 10), num_dense=1,
              zipf_exponent=exponent)
    counts = sum(ds.id_counts(s)["C1"] for s in SPLITS)[1:].numpy()
    ranked = np.sort(counts)[::-1]
    zipf = np.arange(1, size + 1, dtype=np.float64) ** -exponent  # discrete Zipf reference
    top1 = ranked[: size // 100].sum() / ranked.sum()
    assert abs(top1 - zipf[: size // 100].sum() / zipf.sum()) < 0.02
    ranks = np.arange(10, 300)
    slope = np.polyfit(np.log(ranks + 1), np.log(ranked[ranks]), 1)[0]
    assert abs(slope + exponent) < 0.15
    # Ids are a permutation of popularity ranks: id order says nothing about popularity.
    assert counts.argmax() != 0
    seen = np.flatnonzero(counts)
    id_rank = np.argsort(np.argsort(seen))
    count_rank = np.argsort(np.argsort(counts[seen]))
    assert abs(np.corrcoef(id_rank, count_rank)[0, 1]) < 0.1


def test_time_drift_brings_new_ids_after_its_start_only(tmp_path):
    drift = dict(num_rows=20_000, table_sizes=(2000, 40, 5), num_dense=2)
    ds = make(tmp_path, "drift", new_ids=(500, 0, 0), new_id_share=0.3, new_id_start=0.8,  # val on
              **drift)
    plain = make(tmp_path, "plain", **drift)
    assert ds.num_embeddings == {"C1": 2000 + 500 + 1, "C2": 41, "C3": 6}
    train, test = ds.arrays("train")["sparse"], ds.arrays("test")["sparse"]
    assert train[:, 0].max() <= 2000  # stable ids are 1..2000, new ones 2001..2500
    new = test[:, 0] > 2000
    assert abs(new.mean() - 0.3) < 0.03
    assert 50 < len(np.unique(test[new, 0])) <= 500
    # Before the drift and in the other features, the rows are those of the same config without it.
    np.testing.assert_array_equal(train, plain.arrays("train")["sparse"])
    np.testing.assert_array_equal(test[:, 1:], plain.arrays("test")["sparse"][:, 1:])
    np.testing.assert_array_equal(test[~new, 0], plain.arrays("test")["sparse"][~new, 0])
    with pytest.raises(ValueError, match="new_ids needs one count >= 0 per table"):
        SyntheticConfig(table_sizes=(10, 10), new_ids=(5,), new_id_share=0.2)
    with pytest.raises(ValueError, match="new_id_share is 0"):
        SyntheticConfig(table_sizes=(10,), new_ids=(5,))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    cfg = SyntheticConfig(num_rows=60_000, table_sizes=(3000, 300, 30, 5), num_dense=3,
                          click_rate=0.3)
    return prepare_dataset(None, "synthetic", str(out), seed=3, synthetic=cfg, progress=False)


def test_stored_probabilities_are_the_planted_model(planted):
    model = planted.click_model()
    assert model.config == SyntheticConfig(num_rows=60_000, table_sizes=(3000, 300, 30, 5),
                                           num_dense=3, click_rate=0.3)
    arrays = planted.arrays("val")
    ids = np.asarray(arrays["sparse"], dtype=np.int64) - 1
    np.testing.assert_allclose(model.probabilities(np.asarray(arrays["dense"]), ids),
                               arrays["probabilities"], rtol=1e-5)
    labels = planted.arrays("train")["labels"]
    assert abs(labels.mean() - 0.3) < 0.02
    assert abs(planted.true_probabilities("train").mean().item() - labels.mean()) < 0.01


def test_bayes_auc(planted):
    auc = planted.bayes_auc("test")
    arrays = planted.arrays("test")
    assert 0.7 < auc < 0.9
    assert abs(auc - rank_auc(np.asarray(arrays["probabilities"]),
                              np.asarray(arrays["labels"]))) < 1e-6


def test_logistic_model_on_the_true_terms_approaches_bayes_auc(planted):
    """Fitting weights on the planted logit terms recovers about weight 1 and the Bayes AUC:
    the labels really were drawn from the stored probabilities."""
    model = planted.click_model()

    def xy(split):
        a = planted.arrays(split)
        terms = model.terms(np.asarray(a["dense"]), np.asarray(a["sparse"], np.int64) - 1)
        return torch.from_numpy(terms), torch.from_numpy(np.asarray(a["labels"], np.float64))

    x, y = xy("train")
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(w.mean().item() - 1.0) < 0.15
    assert abs(b.item() - model.bias) < 0.3
    xt, yt = xy("test")
    fitted = rank_auc((xt @ w + b).detach().numpy(), yt.numpy())
    assert fitted > planted.bayes_auc("test") - 0.005


def test_huge_tables_cost_no_memory(tmp_path):
    tracemalloc.start()
    ds = make(tmp_path, "huge", num_rows=5000, table_sizes=(50_000_000, 3), num_dense=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20  # a per-id array of 50M entries alone would be 400 MB
    sparse = np.asarray(ds.arrays("train")["sparse"])
    assert ds.num_embeddings["C1"] == 50_000_001
    assert 1 <= sparse[:, 0].min() and sparse[:, 0].max() <= 50_000_000
    assert sparse[:, 0].max() > 1_000_000  # popular ids are spread over the whole table
    EncodedDataset(str(tmp_path / "huge"), verify=True)


def test_config_is_validated():
    with pytest.raises(ValueError, match="interaction pair"):
        SyntheticConfig(table_sizes=(10, 10), interaction_pairs=((0, 2),))
    with pytest.raises(ValueError, match="table sizes"):
        SyntheticConfig(table_sizes=(0,))
    assert SyntheticConfig().interaction_pairs == ((0, 13), (1, 14))
    assert max(SyntheticConfig().table_sizes) >= 1_000_000


class TinyDLRM(torch.nn.Module):
    """DLRM's shape in plain PyTorch (sparse-gradient embeddings, dot interactions), so this
    test checks the data and not the project's modules."""

    def __init__(self, num_embeddings, num_dense, dim=16):
        super().__init__()
        self.tables = torch.nn.ModuleList(
            [torch.nn.Embedding(n, dim, sparse=True) for n in num_embeddings])
        for t in self.tables:
            torch.nn.init.uniform_(t.weight, -0.01, 0.01)
        self.bottom = torch.nn.Sequential(torch.nn.Linear(num_dense, 64), torch.nn.ReLU(),
                                          torch.nn.Linear(64, dim), torch.nn.ReLU())
        n = len(num_embeddings) + 1
        self.pairs = torch.triu_indices(n, n, 1)
        self.top = torch.nn.Sequential(torch.nn.Linear(dim + n * (n - 1) // 2, 128),
                                       torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def forward(self, batch):
        x = self.bottom(batch.dense_features)
        ids = batch.sparse_features.values().view(len(self.tables), -1)
        e = torch.stack([x] + [t(ids[f]) for f, t in enumerate(self.tables)], dim=1)
        dots = torch.bmm(e, e.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(-1)


@pytest.mark.heavy
def test_one_million_rows_are_learnable_by_a_dlrm_in_one_epoch(tmp_path):
    """Defaults, largest table 2M ids: one epoch of a DLRM-style model recovers most of the
    planted signal (measured: Bayes 0.83, model 0.78 on the val split)."""
    from torchmetrics.classification import BinaryAUROC

    torch.manual_seed(0)
    ds = make(tmp_path, "big", num_rows=1_000_000)
    assert ds.num_embeddings["C1"] == 2_000_001
    bayes = ds.bayes_auc("val")
    assert 0.78 < bayes < 0.88
    model = TinyDLRM(list(ds.num_embeddings.values()), ds.schema.num_dense)
    sparse_opt = torch.optim.Adagrad(model.tables.parameters(), lr=0.01)
    dense_opt = torch.optim.Adam([*model.bottom.parameters(), *model.top.parameters()],
                                 lr=1e-3)
    for batch in ds.batches("train", 1024, shuffle=True, seed=0):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch),
                                                                    batch.labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    auc = BinaryAUROC()
    with torch.no_grad():
        for batch in ds.batches("val", 8192):
            auc.update(torch.sigmoid(model(batch)), batch.labels.long())
    learned = float(auc.compute())
    assert learned - 0.5 > 0.75 * (bayes - 0.5)
