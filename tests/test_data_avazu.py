"""Avazu CSV reading and encoding, on hand-written files and the real shared sample."""
import collections
import datetime
from pathlib import Path

import pytest

from torchrec_mec.data import AVAZU_COLUMNS, DataFormatError, prepare_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AVAZU_SAMPLE = SHARED / "avazu_sample_9k.csv"
needs_sample = pytest.mark.skipif(
    not AVAZU_SAMPLE.is_file(),
    reason=f"{AVAZU_SAMPLE} not found: the shared Avazu sample sits in ../shared/data beside "
    "the repository; copy avazu_sample_9k.csv there to run this test")
HEADER = ",".join(AVAZU_COLUMNS) + "\n"


def line(rid, click, hour, fill="v"):
    return ",".join([str(rid), str(click), hour] + [f"{fill}{k}" for k in range(21)]) + "\n"


def test_hand_written_rows_and_bad_rows(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text(HEADER + "".join([
        line(1, 1, "14102117"),                  # line 2: Tuesday 17h
        line(2, 0, "14102603"),                  # line 3: Sunday 03h
        line(3, 0, "14102117").replace(",v20", ""),  # line 4: 23 columns
        line(4, "x", "14102117"),                # line 5: bad click
        line(5, 1, "1410211"),                   # line 6: bad hour
        line(6, 0, "14102203", fill="w"),        # line 7
    ]))
    ds = prepare_dataset(str(src), "avazu", str(tmp_path / "out"), min_count=1,
                         split=(1.0, 0.0, 0.0), progress=False)
    assert ds.schema.num_dense == 0 and ds.schema.sparse_names[:3] == (
        "hour_of_day", "weekday", "C1")
    assert [(b.line, b.column) for b in ds.bad_rows.examples] == [
        (4, None), (5, "click (column 1)"), (6, "hour (column 2)")]
    (batch,) = list(ds.batches("train", 3))
    assert batch.labels.tolist() == [1.0, 0.0, 0.0] and batch.dense_features.shape == (3, 0)
    vocab = {n: ds.vocabulary(n) for n in ds.schema.sparse_names}
    decoded = {n: [vocab[n].value(int(i)) for i in batch.sparse_features[n].values()]
               for n in ("hour_of_day", "weekday", "C1", "C21")}
    assert decoded == {"hour_of_day": ["17", "03", "03"], "weekday": ["1", "6", "2"],
                       "C1": ["v0", "v0", "w0"], "C21": ["v20", "v20", "w20"]}

    with pytest.raises(DataFormatError) as err:
        prepare_dataset(str(src), "avazu", str(tmp_path / "o2"), bad_rows="fail",
                        progress=False)
    assert (err.value.path, err.value.line) == (str(src), 4)
    assert "expected 24 comma-separated columns, found 23" in str(err.value)


def test_header_is_checked(tmp_path):
    src = tmp_path / "h.csv"
    src.write_text(HEADER.replace("click", "clicked") + line(1, 1, "14102117"))
    with pytest.raises(DataFormatError, match="h.csv, line 1: header is not the Avazu header"):
        prepare_dataset(str(src), "avazu", str(tmp_path / "o"), progress=False)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="e.csv: file is empty"):
        prepare_dataset(str(empty), "avazu", str(tmp_path / "o"), progress=False)


@needs_sample
def test_real_sample(tmp_path):
    ds = prepare_dataset(str(AVAZU_SAMPLE), "avazu", str(tmp_path / "out"), min_count=2,
                         split=(1.0, 0.0, 0.0), progress=False)
    assert ds.num_rows("train") == 8999 and ds.bad_rows.count == 0
    assert 0.12 < ds.arrays("train")["labels"].mean() < 0.22
    def expected(fields):
        hour = fields[2]
        day = datetime.date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6])).weekday()
        return [hour[6:], str(day), *fields[3:]]

    raw = [r.rstrip("\n").split(",") for r in open(AVAZU_SAMPLE)][1:]
    rows = [expected(f) for f in raw]
    counts = [collections.Counter(r[k] for r in rows) for k in range(len(rows[0]))]
    names = ds.schema.sparse_names
    assert len(names) == len(rows[0]) == 23
    sparse = ds.arrays("train")["sparse"]
    for i in range(0, 8999, 97):
        assert ds.arrays("train")["labels"][i] == float(raw[i][1])
        for k, name in enumerate(names):
            if counts[k][rows[i][k]] >= 2:
                assert ds.vocabulary(name).value(int(sparse[i, k])) == rows[i][k]
            else:
                assert sparse[i, k] == 0
    for k, name in enumerate(names):
        assert ds.num_embeddings[name] == 1 + sum(n >= 2 for n in counts[k].values())
        assert int(ds.id_counts()[name][0]) == sum(n for n in counts[k].values() if n < 2)
