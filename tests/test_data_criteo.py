"""Criteo TSV reading and encoding, against hand-computed values and the real shared sample."""
import collections
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_mec.data import (
    CorruptDatasetError,
    DataFormatError,
    EncodedDataset,
    prepare_dataset,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CRITEO_SAMPLE = SHARED / "criteo_sample_8k.tsv"
needs_sample = pytest.mark.skipif(
    not CRITEO_SAMPLE.is_file(),
    reason=f"{CRITEO_SAMPLE} not found: the shared Criteo sample sits in ../shared/data beside "
    "the repository; copy criteo_sample_8k.tsv there to run this test")
ALL_TRAIN = (1.0, 0.0, 0.0)


def row(label, ints, cats):
    """A Criteo line: ints fill I1.. (rest '1'), cats fill C1.. (rest 'z')."""
    ints = list(ints) + ["1"] * (13 - len(ints))
    cats = list(cats) + ["z"] * (26 - len(cats))
    return "\t".join([str(label), *ints, *cats]) + "\n"


def write(path, lines):
    path.write_text("".join(lines))
    return str(path)


# Six rows: C1 counts aa=3, bb=2, cc=1; C2 counts ''=3, x=2, y=1.
TINY = [
    row(1, ["1"], ["aa", ""]),
    row(0, [""], ["bb", "x"]),
    row(0, ["-3"], ["aa", ""]),
    row(1, ["0"], ["cc", ""]),
    row(0, ["7"], ["aa", "y"]),
    row(1, ["100"], ["bb", "x"]),
]


def test_tiny_tsv_vocabulary_log_transform_and_batches(tmp_path):
    src = write(tmp_path / "tiny.tsv", TINY)
    ds = prepare_dataset(src, "criteo", str(tmp_path / "out"), min_count=2, split=ALL_TRAIN,
                         progress=False)
    assert ds.num_rows("train") == 6 and ds.num_rows("val") == ds.num_rows("test") == 0
    # Kept values in first-seen order get ids 1..; rarer ones (cc, y) are OOV id 0.
    assert ds.vocabulary("C1").values == ["aa", "bb"]
    assert ds.vocabulary("C2").values == ["", "x"]  # an empty field is a value like any other
    assert ds.num_embeddings["C1"] == 3 and ds.num_embeddings["C2"] == 3
    assert ds.num_embeddings["C3"] == 2
    sparse = np.asarray(ds.arrays("train")["sparse"])
    assert sparse[:, 0].tolist() == [1, 2, 1, 0, 1, 2]
    assert sparse[:, 1].tolist() == [1, 2, 1, 1, 0, 2]
    assert (sparse[:, 2:] == 1).all()
    expected_i1 = [math.log(2), 0.0, 0.0, 0.0, math.log(8), math.log(101)]
    np.testing.assert_allclose(ds.arrays("train")["dense"][:, 0], expected_i1, rtol=1e-6)
    np.testing.assert_allclose(ds.arrays("train")["dense"][:, 1:], math.log(2), rtol=1e-6)

    (batch,) = list(ds.batches("train", batch_size=6))
    kjt = batch.sparse_features
    assert kjt.keys() == [f"C{i}" for i in range(1, 27)]
    assert kjt["C1"].values().tolist() == [1, 2, 1, 0, 1, 2]
    assert kjt["C2"].values().tolist() == [1, 2, 1, 1, 0, 2]
    assert kjt.lengths().tolist() == [1] * (6 * 26) and kjt.values().dtype == torch.int64
    assert batch.labels.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert batch.labels.dtype == batch.dense_features.dtype == torch.float32
    assert batch.dense_features.shape == (6, 13)
    assert ds.id_counts("train")["C1"].tolist() == [1, 3, 2]


def test_bad_rows_are_skipped_and_listed_without_shifting(tmp_path):
    lines = [
        row(1, ["5"], ["aa"]),
        row(0, ["5"], ["aa"]).replace("\tz\n", "\n"),  # 39 columns
        row(0, ["6"], ["bb"]),
        row(1, ["1", "2", "abc"], ["aa"]),  # non-integer I3
        row(2, ["1"], ["aa"]),  # label 2
        row(1, ["9"], ["bb"]),
    ]
    src = write(tmp_path / "bad.tsv", lines)
    ds = prepare_dataset(src, "criteo", str(tmp_path / "out"), min_count=1, split=ALL_TRAIN,
                         progress=False)
    report = ds.bad_rows
    assert report.count == 3
    assert [(b.line, b.column) for b in report.examples] == [
        (2, None), (4, "I3 (column 3)"), (5, "label (column 0)")]
    assert "found 39" in report.examples[0].reason and "'abc'" in report.examples[1].reason
    assert all(b.path == src for b in report.examples)
    # The good rows (lines 1, 3, 6) keep their own values.
    np.testing.assert_allclose(ds.arrays("train")["dense"][:, 0],
                               np.log1p([5, 6, 9]).astype(np.float32))
    assert ds.arrays("train")["labels"].tolist() == [1.0, 0.0, 1.0]
    assert ds.vocabulary("C1").value(int(ds.arrays("train")["sparse"][2, 0])) == "bb"


def test_bad_rows_fail_names_file_line_and_column(tmp_path):
    src = write(tmp_path / "bad.tsv", [row(1, ["5"], []), row(0, ["1", "2", "x7"], [])])
    with pytest.raises(DataFormatError) as err:
        prepare_dataset(src, "criteo", str(tmp_path / "out"), bad_rows="fail", progress=False)
    assert isinstance(err.value, ValueError)
    assert (err.value.path, err.value.line, err.value.column) == (src, 2, "I3 (column 3)")
    assert src in str(err.value) and "line 2" in str(err.value) and "'x7'" in str(err.value)

    src = write(tmp_path / "short.tsv", [row(1, ["5"], []), "1\t2\t3\n"])
    with pytest.raises(DataFormatError, match="line 2.*expected 40 tab-separated columns"):
        prepare_dataset(src, "criteo", str(tmp_path / "out2"), bad_rows="fail", progress=False)


def test_missing_empty_and_all_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        prepare_dataset(str(tmp_path / "nope.tsv"), "criteo", str(tmp_path / "o"),
                        progress=False)
    empty = write(tmp_path / "empty.tsv", [])
    with pytest.raises(DataFormatError, match="empty.tsv: file has no data rows"):
        prepare_dataset(empty, "criteo", str(tmp_path / "o"), progress=False)
    bad = write(tmp_path / "allbad.tsv", ["1\t2\n", "x\n"])
    with pytest.raises(DataFormatError, match="allbad.tsv: no valid rows"):
        prepare_dataset(bad, "criteo", str(tmp_path / "o"), progress=False)


def random_tsv(path, n, seed):
    rng = np.random.default_rng(seed)
    lines = [row(int(rng.random() < 0.3), [str(v) for v in rng.integers(-2, 50, 13)],
                 [f"{v:08x}" for v in rng.zipf(1.5, 26) % 500]) for _ in range(n)]
    return write(path, lines)


def test_split_is_reproducible_from_seed(tmp_path):
    src = random_tsv(tmp_path / "r.tsv", 3000, seed=0)
    a = prepare_dataset(src, "criteo", str(tmp_path / "a"), seed=5, progress=False)
    b = prepare_dataset(src, "criteo", str(tmp_path / "b"), seed=5, progress=False,
                        chunk_rows=77)
    c = prepare_dataset(src, "criteo", str(tmp_path / "c"), seed=6, progress=False)
    sizes = [a.num_rows(s) for s in ("train", "val", "test")]
    assert sum(sizes) == 3000
    assert 2250 < sizes[0] < 2550 and 200 < sizes[1] < 400 and 200 < sizes[2] < 400
    for s in ("train", "val", "test"):
        for k in ("dense", "sparse", "labels"):
            np.testing.assert_array_equal(a.arrays(s)[k], b.arrays(s)[k])
    assert not np.array_equal(a.arrays("val")["dense"][:50], c.arrays("val")["dense"][:50])
    # Every raw row lands in exactly one split.
    raw = [line.rstrip("\n").split("\t") for line in open(src)]
    want = collections.Counter(
        (float(f[0]), *np.log1p(np.maximum(np.array(f[1:14], float), 0)).astype(np.float32))
        for f in raw)
    got = collections.Counter(
        (float(lab), *d) for s in ("train", "val", "test")
        for lab, d in zip(a.arrays(s)["labels"], a.arrays(s)["dense"]))
    assert got == want


def test_separate_split_files(tmp_path):
    train = write(tmp_path / "train.tsv", [row(1, [], ["aa"]), row(0, [], ["aa"])])
    test = write(tmp_path / "test.tsv", [row(0, [], ["aa"]), row(1, [], ["zz"])])
    ds = prepare_dataset({"train": train, "test": test}, "criteo", str(tmp_path / "o"),
                         min_count=1, progress=False)
    assert [ds.num_rows(s) for s in ("train", "val", "test")] == [2, 0, 2]
    assert ds.arrays("test")["sparse"][:, 0].tolist() == [1, 0]  # zz is unseen in train
    assert list(ds.batches("val", 4)) == []


def test_reuse_and_corruption_are_detected(tmp_path):
    src = random_tsv(tmp_path / "r.tsv", 500, seed=1)
    out = str(tmp_path / "out")
    prepare_dataset(src, "criteo", out, progress=False)
    sparse = os.path.join(out, "train", "sparse.npy")
    stamp = os.stat(sparse).st_mtime_ns
    prepare_dataset(src, "criteo", out, progress=False)
    assert os.stat(sparse).st_mtime_ns == stamp  # reused, not rewritten

    labels = os.path.join(out, "val", "labels.npy")
    data = bytearray(open(labels, "rb").read())
    data[-1] ^= 0xFF
    open(labels, "wb").write(bytes(data))
    EncodedDataset(out)  # same size: only the checksum sees it
    with pytest.raises(CorruptDatasetError, match="val/labels.npy.*sha256"):
        EncodedDataset(out, verify=True)
    with pytest.raises(CorruptDatasetError, match="val/labels.npy"):
        prepare_dataset(src, "criteo", out, progress=False)

    with open(sparse, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptDatasetError, match="train/sparse.npy.*truncated"):
        EncodedDataset(out)
    ds = prepare_dataset(src, "criteo", out, progress=False, overwrite=True)
    ds.verify()
    ds2 = prepare_dataset(src, "criteo", out, min_count=1, progress=False)  # new arguments
    assert ds2.manifest["fingerprint"]["min_count"] == 1
    assert sum(ds2.num_embeddings.values()) > sum(ds.num_embeddings.values())


@needs_sample
def test_real_sample_matches_raw_rows(tmp_path):
    ds = prepare_dataset(str(CRITEO_SAMPLE), "criteo", str(tmp_path / "out"), split=ALL_TRAIN,
                         min_count=3, progress=False)
    assert ds.num_rows("train") == 8000 and ds.bad_rows.count == 0
    labels = ds.arrays("train")["labels"]
    assert 0.19 < labels.mean() < 0.25
    raw = [line.rstrip("\n").split("\t") for line in open(CRITEO_SAMPLE)]
    counts = [collections.Counter(r[14 + k] for r in raw) for k in range(26)]
    batches = list(ds.batches("train", batch_size=1000))
    assert len(batches) == 8
    for b, batch in enumerate(batches[:2]):
        for i in range(0, 1000, 37):
            fields = raw[b * 1000 + i]
            assert batch.labels[i].item() == float(fields[0])
            dense = [math.log1p(max(int(v), 0)) if v else 0.0 for v in fields[1:14]]
            np.testing.assert_allclose(batch.dense_features[i].numpy(), dense, rtol=1e-6)
            for k, name in enumerate(ds.schema.sparse_names):
                idx = int(batch.sparse_features[name].values()[i])
                value = fields[14 + k]
                if counts[k][value] >= 3:
                    assert ds.vocabulary(name).value(idx) == value
                else:
                    assert idx == 0
    for k, name in enumerate(ds.schema.sparse_names):
        assert ds.num_embeddings[name] == 1 + sum(n >= 3 for n in counts[k].values())


@needs_sample
def test_real_sample_random_split(tmp_path):
    ds = prepare_dataset(str(CRITEO_SAMPLE), "criteo", str(tmp_path / "out"), progress=False)
    sizes = [ds.num_rows(s) for s in ("train", "val", "test")]
    assert sum(sizes) == 8000 and 6200 < sizes[0] < 6600
    counts = ds.id_counts("train")
    assert all(int(c[1:].min()) >= 3 for c in counts.values())  # min_count on train
    assert sum(int(c.sum()) for c in ds.id_counts("val").values()) == sizes[1] * 26
