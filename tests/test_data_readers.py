"""The numpy text readers against the line-by-line reference readers (same encoded output, same
bad-row reports), the line and integer rules against Python's own, and the input probes of
issue 11: gzip mix-ups, truncated gzip, invalid UTF-8, garbage, huge integers."""
import gzip
import io
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from torchrec_mec.data import (
    AVAZU_COLUMNS,
    BadRowReport,
    DataFormatError,
    prepare_dataset,
    read_avazu_csv,
    read_criteo_tsv,
)
from torchrec_mec.data import _io, prepare
from torchrec_mec.data._fields import parse_int, parse_int_columns
from torchrec_mec.data.vocab import ValueCounter
from tests.pipeline_testing import AVAZU_SAMPLE, CRITEO_SAMPLE, MISSING_SAMPLE
from tests.reference_readers import read_avazu_csv_reference, read_criteo_tsv_reference

needs_samples = pytest.mark.skipif(
    not (CRITEO_SAMPLE.is_file() and AVAZU_SAMPLE.is_file()), reason=MISSING_SAMPLE)


def criteo_lines(n: int, seed: int, bad: bool) -> list:
    """Random Criteo-layout lines (bytes, endings included); with ``bad``, about one in six is
    broken or unusual in a way both readers must treat alike."""
    rng = np.random.default_rng(seed)
    odd_ints = ["x", "1.5", "0x1f", " 5", "+5", "5_0", "-0", "007", "-", "--3", "\u0663",
                "9223372036854775807", "-9223372036854775808", "123456789012345678", "1e3"]
    odd_cats = ["caf\u00e9", "\u65e5\u672c", "a\x00b", "q" * 90, "", "a b", "\u00a0"]
    lines = []
    for i in range(n):
        label = str(int(rng.random() < 0.3))
        ints = [str(v) if rng.random() > 0.1 else "" for v in
                np.floor(np.exp(rng.normal(1, 2, 13))).astype(np.int64) - 2]
        cats = [f"{v:08x}" for v in (rng.zipf(1.3, 26) * 2654435761) % (1 << 32)]
        ending = "\n"
        if bad and rng.random() < 0.17:
            kind = rng.integers(9)
            if kind == 0:
                label = str(rng.choice(["2", "", " 1", "1.0", "\u0661"]))
            elif kind == 1:
                ints[rng.integers(13)] = str(rng.choice(odd_ints))
            elif kind == 2:
                cats[rng.integers(26)] = str(rng.choice(odd_cats))
            elif kind == 3:
                cats = cats[: rng.integers(26)]
            elif kind == 4:
                cats.append("extra")
            elif kind == 5:
                ending = str(rng.choice(["\r\n", "\r", "\r\r\n"]))
            elif kind == 6:
                lines.append(b"\n" if rng.random() < 0.5 else b"\t\t\n")
            elif kind == 7:
                ints[rng.integers(13)] = "9" * int(rng.integers(19, 25))
            else:
                label, ints = "1", ["\u0663\u0664"] + ints[1:]
        lines.append(("\t".join([label, *ints, *cats]) + ending).encode())
    if bad:
        lines[-1] = lines[-1].rstrip(b"\r\n")  # no final line ending
    return lines


def avazu_lines(n: int, seed: int, bad: bool) -> list:
    rng = np.random.default_rng(seed)
    lines = [",".join(AVAZU_COLUMNS).encode() + b"\n"]
    for i in range(n):
        day = int(rng.integers(21, 31))
        fields = [str(rng.integers(1 << 62)), str(int(rng.random() < 0.2)),
                  f"1410{day:02d}{int(rng.integers(24)):02d}"]
        fields += [f"{v:x}" for v in rng.zipf(1.4, 21) % 5000]
        ending = "\n"
        if bad and rng.random() < 0.2:
            kind = rng.integers(6)
            if kind == 0:
                fields[1] = str(rng.choice(["2", "", "yes"]))
            elif kind == 1:
                fields[2] = str(rng.choice(["14023112", "14102124", "1410211", "14x02112",
                                            "\u0661\u0664\u0661\u0660\u0662\u0661\u0661\u0662",
                                            "1410211\u0661"]))
            elif kind == 2:
                fields[3 + rng.integers(21)] = str(rng.choice(["caf\u00e9", "", "z" * 80]))
            elif kind == 3:
                fields = fields[:20]
            elif kind == 4:
                ending = "\r\n"
            else:
                lines.append(b"\n")
        lines.append((",".join(fields) + ending).encode())
    return lines


def write(path: Path, lines: list) -> str:
    data = b"".join(lines)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def read_all(reader, path: str, policy: str = "report", **kw):
    report = BadRowReport(policy, max_examples=10**6)
    chunks = list(reader(path, report, **kw))
    columns = [[v.decode() if isinstance(v, bytes) else v for c in chunks
                for v in list(c.sparse[k])] for k in range(len(chunks[0].sparse))]
    return (np.concatenate([c.lines for c in chunks]), np.concatenate([c.labels for c in chunks]),
            np.concatenate([c.dense for c in chunks]), columns, report.to_dict())


def reference_reason(reason: str) -> str:
    """A reference reader's bad-row reason as the new readers word it: they quote a label as a
    str (the reference printed numpy's ``np.str_('2')``) and call a too-large integer out of
    range (the reference said "not an integer")."""
    reason = re.sub(r"np\.str_\((.*)\)$", r"\1", reason)
    huge = re.fullmatch(r"not an integer: '(-?[0-9]+)'", reason)
    if huge and not -(2**63) <= int(huge.group(1)) < 2**63:
        reason = f"integer out of range (must fit in 64 bits): {huge.group(1)}"
    return reason


def assert_same_rows(new, reference):
    for x, y in zip(new[:3], reference[:3]):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert new[3] == reference[3]
    for example in reference[4]["examples"]:
        example["reason"] = reference_reason(example["reason"])
    assert new[4] == reference[4]


def prepared_files(monkeypatch, tmp_path, source: str, format: str, reference: bool,
                   **kw) -> dict:
    """sha256 of every file ``prepare_dataset`` writes, with the new or the reference reader."""
    reader = {"criteo": read_criteo_tsv_reference, "avazu": read_avazu_csv_reference}
    if reference:
        monkeypatch.setitem(prepare._FORMATS, format,
                            (reader[format], prepare._FORMATS[format][1]))
    out = tmp_path / ("reference" if reference else "new")
    ds = prepare_dataset(source, format, str(out), progress=False, **kw)
    monkeypatch.undo()
    bad_rows = ds.manifest["bad_rows"]
    if reference:
        for example in bad_rows["examples"]:
            example["reason"] = reference_reason(example["reason"])
    return {"files": {k: v["sha256"] for k, v in ds.manifest["files"].items()},
            "bad_rows": bad_rows, "sizes": ds.manifest["num_embeddings"]}


@needs_samples
@pytest.mark.parametrize("format,sample", [("criteo", CRITEO_SAMPLE), ("avazu", AVAZU_SAMPLE)])
def test_real_samples_encode_byte_identical_to_the_reference_reader(
        monkeypatch, tmp_path, format, sample):
    new = prepared_files(monkeypatch, tmp_path, str(sample), format, reference=False)
    old = prepared_files(monkeypatch, tmp_path, str(sample), format, reference=True)
    assert new == old and len(new["files"]) > 10


@pytest.mark.parametrize("chunk_rows", [7, 1000, 65536])
def test_generated_criteo_with_bad_rows_matches_the_reference(tmp_path, chunk_rows):
    src = write(tmp_path / "day.tsv", criteo_lines(3000, seed=chunk_rows, bad=True))
    new = read_all(read_criteo_tsv, src, chunk_rows=chunk_rows)
    assert new[4]["count"] > 300  # the file does have many bad rows
    assert_same_rows(new, read_all(read_criteo_tsv_reference, src, chunk_rows=chunk_rows))


@pytest.mark.parametrize("chunk_rows", [5, 65536])
def test_generated_avazu_with_bad_rows_matches_the_reference(tmp_path, chunk_rows):
    src = write(tmp_path / "train.csv", avazu_lines(3000, seed=chunk_rows, bad=True))
    new = read_all(read_avazu_csv, src, chunk_rows=chunk_rows)
    assert new[4]["count"] > 300
    assert_same_rows(new, read_all(read_avazu_csv_reference, src, chunk_rows=chunk_rows))


@pytest.mark.parametrize("format", ["criteo", "avazu"])
def test_generated_files_encode_byte_identical_to_the_reference(monkeypatch, tmp_path, format):
    lines = (criteo_lines if format == "criteo" else avazu_lines)(4000, seed=3, bad=True)
    src = write(tmp_path / ("day.tsv.gz" if format == "criteo" else "train.csv.gz"), lines)
    new = prepared_files(monkeypatch, tmp_path, src, format, reference=False, min_count=2,
                         chunk_rows=999)
    old = prepared_files(monkeypatch, tmp_path, src, format, reference=True, min_count=2)
    assert new == old and new["bad_rows"]["count"] > 300


def test_lines_split_as_python_text_files_do(tmp_path, monkeypatch):
    """Line contents and numbers equal those of a text file opened with newline="", across
    block boundaries (blocks of 7 bytes here)."""
    monkeypatch.setattr(_io, "BLOCK_BYTES", 7)
    rng = np.random.default_rng(0)
    for trial in range(40):
        data = bytes(rng.choice(list(b"ab\t\r\n"), size=int(rng.integers(1, 120))).tolist())
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(data)
        want = [line.rstrip("\r\n").encode() for line in
                io.TextIOWrapper(io.BytesIO(data), encoding="ascii", newline="")]
        got, numbers = [], []
        try:
            for _, block in _io.line_blocks(str(path), 3, header=False, max_rows=None,
                                            progress=False):
                got += [block.text(i) for i in range(len(block))]
                numbers += block.numbers.tolist()
        except DataFormatError as e:
            assert not want and "no data rows" in str(e)
        assert got == want and numbers == list(range(1, len(want) + 1)), data


def test_bulk_integer_parsing_agrees_with_the_per_field_rule():
    rng = np.random.default_rng(0)
    pieces = ["0", "7", "-", "+", " ", "_", "x", "9" * 9, "00"]
    texts = ["".join(rng.choice(pieces, size=int(rng.integers(0, 4)))) for _ in range(3000)]
    texts += ["9223372036854775807", "-9223372036854775808", "9223372036854775808",
              "-" + "9" * 18, "9" * 18, "9" * 19, "-9223372036854775809"]
    raw = ("\t".join(texts) + "\n").encode()
    data = np.frombuffer(bytes(64) + raw + bytes(64), dtype=np.uint8)
    starts, offset = [], 64
    for t in texts:
        starts.append(offset)
        offset += len(t.encode()) + 1
    starts = np.array(starts).reshape(1, -1)
    ends = starts + np.array([len(t.encode()) for t in texts]).reshape(1, -1)
    values, issues = parse_int_columns(data, starts, ends)
    reasons = {c: reason for _, c, reason in issues}
    for c, t in enumerate(texts):
        value, reason = parse_int(t)
        assert (int(values[0, c]), reasons.get(c)) == (value, reason), t


# The probes of issue 11: each error names the file (and line and column where there is one).

def good_row(label: int = 1) -> bytes:
    return ("\t".join([str(label)] + ["3"] * 13 + ["a1b2c3d4"] * 26) + "\n").encode()


def test_gzip_file_named_tsv_is_named(tmp_path):
    src = tmp_path / "day.tsv"
    src.write_bytes(gzip.compress(good_row() * 3))
    with pytest.raises(DataFormatError, match=r"day.tsv: gzip-compressed, but the name does not "
                       r"end in .gz"):
        prepare_dataset(str(src), "criteo", str(tmp_path / "out"), progress=False)


def test_plain_text_named_gz_is_named(tmp_path):
    src = tmp_path / "day.tsv.gz"
    src.write_bytes(good_row() * 3)
    with pytest.raises(DataFormatError, match=r"day.tsv.gz: named .gz but not gzip-compressed"):
        prepare_dataset(str(src), "criteo", str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_gz_is_named(tmp_path, damage):
    rng = np.random.default_rng(0)
    rows = b"".join(("\t".join(["1"] + [str(v) for v in rng.integers(0, 99, 13)]
                               + [f"{v:08x}" for v in rng.integers(0, 1 << 32, 26)]) + "\n")
                    .encode() for _ in range(2000))
    packed = bytearray(gzip.compress(rows))
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    else:
        packed[-6] ^= 0xFF  # the CRC
    src = tmp_path / "day.tsv.gz"
    src.write_bytes(bytes(packed))
    with pytest.raises(DataFormatError, match=f"day.tsv.gz: the gzip stream is {damage}"):
        prepare_dataset(str(src), "criteo", str(tmp_path / "out"), progress=False)


def test_invalid_utf8_in_one_field_is_one_bad_row(tmp_path):
    bad = good_row().replace(b"a1b2c3d4", b"a1\xffc3d4", 1)  # C1 of line 2
    src = tmp_path / "day.tsv"
    src.write_bytes(good_row() + bad + good_row(0) * 2)
    ds = prepare_dataset(str(src), "criteo", str(tmp_path / "out"), split=(1.0, 0.0, 0.0),
                         min_count=1, progress=False)
    assert ds.num_rows("train") == 3 and ds.bad_rows.count == 1
    (example,) = ds.bad_rows.examples
    assert (example.line, example.column) == (2, "C1 (column 14)")
    assert "invalid UTF-8 (byte 0xff at offset 2)" in example.reason
    assert ds.arrays("train")["labels"].tolist() == [1.0, 0.0, 0.0]

    with pytest.raises(DataFormatError) as err:
        prepare_dataset(str(src), "criteo", str(tmp_path / "fail"), bad_rows="fail",
                        progress=False)
    assert (err.value.path, err.value.line, err.value.column) == (str(src), 2, "C1 (column 14)")
    assert "line 2" in str(err.value) and "invalid UTF-8" in str(err.value)


def test_invalid_utf8_in_avazu(tmp_path):
    row = ["7", "1", "14102117"] + ["x"] * 21
    lines = [",".join(AVAZU_COLUMNS).encode() + b"\n", ",".join(row).encode() + b"\n",
             ",".join(row).encode().replace(b",x,", b",\xc3(,", 1) + b"\n"]
    src = write(tmp_path / "train.csv", lines)
    ds = prepare_dataset(src, "avazu", str(tmp_path / "out"), split=(1.0, 0.0, 0.0),
                         min_count=1, progress=False)
    (example,) = ds.bad_rows.examples
    assert (example.line, example.column) == (3, "C1 (column 3)")
    assert "invalid UTF-8 (byte 0xc3 at offset 0)" in example.reason


def test_huge_integer_is_out_of_range(tmp_path):
    huge = good_row().replace(b"1\t3\t", b"1\t99999999999999999999\t", 1)
    src = tmp_path / "day.tsv"
    src.write_bytes(good_row() + huge)
    with pytest.raises(DataFormatError) as err:
        prepare_dataset(str(src), "criteo", str(tmp_path / "out"), bad_rows="fail",
                        progress=False)
    assert (err.value.line, err.value.column) == (2, "I1 (column 1)")
    assert "integer out of range (must fit in 64 bits): 99999999999999999999" in str(err.value)


def test_garbage_file_is_named_without_a_traceback_from_decoding(tmp_path):
    src = tmp_path / "day.tsv"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataFormatError, match="day.tsv: no valid rows"):
        prepare_dataset(str(src), "criteo", str(tmp_path / "out"), progress=False)
    with pytest.raises(DataFormatError, match=r"day.tsv, line 1: expected 40 tab-separated"):
        prepare_dataset(str(src), "criteo", str(tmp_path / "fail"), bad_rows="fail",
                        progress=False)


def test_overlong_line_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(_io, "BLOCK_BYTES", 256)
    src = tmp_path / "day.tsv"
    src.write_bytes(good_row() + b"x" * 5000 + b"\n")
    with pytest.raises(DataFormatError, match=r"day.tsv, line 2: line longer than 1000 bytes"):
        list(read_criteo_tsv(str(src), BadRowReport()))
    assert os.path.getsize(src) > 5000


def test_value_counter_gives_the_same_ids_for_bytes_arrays_and_strings():
    """The bulk path (numpy bytes, one dict operation per distinct value) against the
    one-value-at-a-time path, over chunks, for values shorter and longer than 8 bytes."""
    rng = np.random.default_rng(1)
    for width in (3, 8, 12):
        values = np.array(["".join(rng.choice(list("ab\x01"), size=rng.integers(0, width + 1)))
                           for _ in range(5000)])
        by_string, by_bytes = ValueCounter(), ValueCounter()
        for start in range(0, 5000, 700):
            part = values[start : start + 700]
            train = rng.random(len(part)) < 0.7
            np.testing.assert_array_equal(by_string.add(part.tolist(), train),
                                          by_bytes.add(part.astype("S"), train))
        (vocab_s, remap_s), (vocab_b, remap_b) = by_string.build(2), by_bytes.build(2)
        assert vocab_s.values == vocab_b.values and np.array_equal(remap_s, remap_b)


def test_reader_thread_hands_over_errors_and_stops_when_closed(tmp_path):
    src = tmp_path / "day.tsv"
    src.write_bytes(good_row() * 50 + b"2" + good_row()[1:] + good_row() * 50)
    chunks = read_criteo_tsv(str(src), BadRowReport("fail"), chunk_rows=10)
    assert len(next(chunks)) == 10
    with pytest.raises(DataFormatError, match="line 51, column label"):
        list(chunks)
    before = threading.active_count()
    chunks = read_criteo_tsv(str(src), BadRowReport(), chunk_rows=1)
    next(chunks)
    chunks.close()  # the thread, blocked on a full hand-over queue, ends
    assert threading.active_count() == before
