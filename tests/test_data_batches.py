"""Batching rules shared by every CTRDataset: rank slices, shuffling, drop_last, id counts."""
import numpy as np
import pytest
import torch

from torchrec_mec.data import (
    SyntheticConfig,
    batch_row_ranges,
    make_batch,
    prepare_dataset,
)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    cfg = SyntheticConfig(num_rows=1037, table_sizes=(300, 40, 7), num_dense=3)
    return prepare_dataset(None, "synthetic", str(out), synthetic=cfg, progress=False)


def flat(batches):
    """Rows of a list of batches, as (dense, ids [B, F], labels) numpy arrays."""
    dense = np.concatenate([b.dense_features.numpy() for b in batches])
    ids = np.concatenate([b.sparse_features.values().view(3, -1).T.numpy() for b in batches])
    labels = np.concatenate([b.labels.numpy() for b in batches])
    return dense, ids, labels


# 830 train rows: (4, 207) leaves a last global batch of 2 rows for 4 ranks (merged).
@pytest.mark.parametrize("world_size,local", [(2, 64), (3, 64), (4, 64), (4, 207)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_slices_concatenate_to_the_single_process_batch(ds, world_size, local, shuffle,
                                                             drop_last):
    assert ds.num_rows("train") == 830
    single = list(ds.batches("train", local * world_size, shuffle=shuffle, seed=3,
                             drop_last=drop_last))
    per_rank = [list(ds.batches("train", local, shuffle=shuffle, seed=3, rank=r,
                                world_size=world_size, drop_last=drop_last))
                for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    assert len(per_rank[0]) == ds.num_batches("train", local, world_size=world_size,
                                              drop_last=drop_last)
    if len(single) != len(per_rank[0]):  # a last batch of < world_size rows joins the one before
        single = single[:-2] + [single[-2:]]
    for step, batch in enumerate(single):
        parts = [p[step] for p in per_rank]
        assert all(len(p.labels) > 0 for p in parts)
        want = flat(batch if isinstance(batch, list) else [batch])
        for a, b in zip(flat(parts), want):
            np.testing.assert_array_equal(a, b)


def test_epoch_visits_every_row_once_and_shuffle_depends_on_seed(ds):
    arrays = ds.arrays("train")
    dense, ids, labels = flat(list(ds.batches("train", 100)))
    np.testing.assert_array_equal(ids, arrays["sparse"])
    np.testing.assert_array_equal(labels, arrays["labels"])
    _, ids1, _ = flat(list(ds.batches("train", 100, shuffle=True, seed=1)))
    _, ids1b, _ = flat(list(ds.batches("train", 100, shuffle=True, seed=1)))
    _, ids2, _ = flat(list(ds.batches("train", 100, shuffle=True, seed=2)))
    np.testing.assert_array_equal(ids1, ids1b)
    assert not np.array_equal(ids1, ids2) and not np.array_equal(ids1, ids)
    key = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
    assert key(ids1) == key(ids) == key(ids2)
    assert len(list(ds.batches("train", 100, drop_last=True))) == ds.num_rows("train") // 100


def test_id_counts_match_the_batches(ds):
    counts = ds.id_counts("val")
    seen = {k: torch.zeros(n, dtype=torch.int64) for k, n in ds.num_embeddings.items()}
    for batch in ds.batches("val", 50):
        for k, jt in batch.sparse_features.to_dict().items():
            seen[k] += torch.bincount(jt.values(), minlength=ds.num_embeddings[k])
    for k in seen:
        assert torch.equal(counts[k], seen[k])
    assert counts["C1"][0] == 0  # synthetic data never uses the OOV id


def test_batch_row_ranges_rules():
    assert batch_row_ranges(10, 2, rank=0, world_size=2) == [(0, 2), (4, 6), (8, 9)]
    # 9 rows, global batch 4: a last batch of 1 row < 2 ranks merges into the previous one.
    assert batch_row_ranges(9, 2, rank=0, world_size=2) == [(0, 2), (4, 6)]
    assert batch_row_ranges(9, 2, rank=1, world_size=2) == [(2, 4), (6, 9)]
    assert batch_row_ranges(9, 2, rank=1, world_size=2, drop_last=True) == [(2, 4), (6, 8)]
    assert batch_row_ranges(0, 8) == []
    with pytest.raises(ValueError, match="non-empty batch"):
        batch_row_ranges(2, 8, rank=0, world_size=3)
    with pytest.raises(ValueError):
        batch_row_ranges(10, 2, rank=2, world_size=2)


def test_make_batch_layout():
    b = make_batch(np.ones((3, 2), np.float32), np.array([[1, 2], [3, 4], [5, 6]], np.int32),
                   np.array([[1], [0], [1]], np.int32), ["a", "b"])
    kjt = b.sparse_features
    assert kjt.keys() == ["a", "b"] and kjt.stride() == 3
    assert kjt["a"].values().tolist() == [1, 3, 5] and kjt["b"].values().tolist() == [2, 4, 6]
    assert kjt.values().dtype == torch.int64 and kjt.lengths().tolist() == [1] * 6
    assert b.labels.tolist() == [1.0, 0.0, 1.0] and b.labels.dtype == torch.float32
