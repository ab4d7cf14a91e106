"""The adapter over TorchRec's Criteo 1TB npy files, checked against TorchRec's own datapipe."""
import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import BinaryCriteoUtils, InMemoryBinaryCriteoIterDataPipe

from torchrec_mec.data import BinaryCriteoDataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three tiny days written by TorchRec's own converter (tsv_to_npys)."""
    root = tmp_path_factory.mktemp("criteo1tb")
    rng = np.random.default_rng(0)
    for day, rows in enumerate((23, 17, 11)):
        lines = []
        for _ in range(rows):
            ints = [str(v) for v in rng.integers(0, 20, 13)]
            cats = [f"{v:x}" for v in rng.integers(0, 50, 26)]
            lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]))
        tsv = root / f"day_{day}"
        tsv.write_text("\n".join(lines) + "\n")
        BinaryCriteoUtils.tsv_to_npys(str(tsv), *(str(root / f"day_{day}_{k}.npy")
                                                  for k in ("dense", "sparse", "labels")))
    return str(root)


def paths(root, days, kind):
    return [f"{root}/day_{d}_{kind}.npy" for d in days]


@pytest.mark.parametrize("split,days", [("train", [0, 1]), ("val", [2]), ("test", [2])])
def test_batches_equal_torchrec_datapipe(root, split, days):
    hashes = [7] * 26
    ds = BinaryCriteoDataset(root, train_days=[0, 1], eval_day=2,
                             num_embeddings_per_feature=hashes)
    pipe = InMemoryBinaryCriteoIterDataPipe(
        split, paths(root, days, "dense"), paths(root, days, "sparse"),
        paths(root, days, "labels"), batch_size=5, rank=0, world_size=1, hashes=hashes)
    ours, theirs = list(ds.batches(split, 5)), list(pipe)
    assert len(ours) == len(theirs) == ds.num_batches(split, 5)
    assert sum(len(b.labels) for b in ours) == ds.num_rows(split)
    for a, b in zip(ours, theirs):
        assert a.sparse_features.keys() == b.sparse_features.keys()
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values().long())
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.labels, b.labels.float()) and a.labels.dtype == torch.float32


def test_sizes_counts_and_rank_slices(root):
    ds = BinaryCriteoDataset(root, train_days=[0, 1], eval_day=2)
    assert [ds.num_rows(s) for s in ("train", "val", "test")] == [40, 6, 5]
    sparse = np.concatenate([np.load(p) for p in paths(root, [0, 1], "sparse")])
    top = max(int(np.load(p)[:, 0].max()) for p in paths(root, [0, 1, 2], "sparse"))
    assert ds.num_embeddings["cat_0"] == top + 1
    counts = ds.id_counts("train")
    for f, name in enumerate(ds.schema.sparse_names):
        assert counts[name].tolist() == np.bincount(
            sparse[:, f], minlength=ds.num_embeddings[name]).tolist()
    single = list(ds.batches("train", 8, shuffle=True, seed=1))
    ranks = [list(ds.batches("train", 4, shuffle=True, seed=1, rank=r, world_size=2))
             for r in range(2)]
    for step, batch in enumerate(single):
        got = torch.cat([ranks[0][step].sparse_features.values().view(26, -1),
                         ranks[1][step].sparse_features.values().view(26, -1)], dim=1)
        assert torch.equal(got, batch.sparse_features.values().view(26, -1))


def test_missing_day_is_named(root):
    with pytest.raises(FileNotFoundError, match="day_5_dense.npy"):
        BinaryCriteoDataset(root, train_days=[0, 5], eval_day=2)
