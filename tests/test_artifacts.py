"""Artifacts: round trip, atomic writes, and every kind of damage reported by file name."""
import os

import pytest
import torch

from torchrec_mec.artifacts import (
    ArtifactError,
    load_artifact,
    read_artifact_header,
    save_artifact,
)


def _tensors():
    return {
        "codes": torch.arange(12, dtype=torch.uint8).view(6, 2),
        "wide": torch.tensor([0, 300, 65535]).to(torch.uint16),
        "codebooks": torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)),
    }


def test_round_trip(tmp_path):
    uri = str(tmp_path / "sub" / "t.mec")  # parent folder is created
    meta = {"stats": {"mse": 0.25, "perplexity": [3.5, 4.0]}, "table": "t"}
    save_artifact(uri, _tensors(), meta, "mec_quantized_table")
    tensors, got = load_artifact(uri, expect_kind="mec_quantized_table")
    assert got == meta
    for k, v in _tensors().items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v)
    header = read_artifact_header(uri)
    assert header["format"] == "torchrec_mec-artifact" and header["version"] == 1
    assert header["kind"] == "mec_quantized_table" and len(header["sha256"]) == 64
    assert os.listdir(tmp_path / "sub") == ["t.mec"]  # no temporary file left behind


def test_overwrite_replaces(tmp_path):
    uri = str(tmp_path / "t.mec")
    save_artifact(uri, {"x": torch.zeros(2)}, {"v": 1}, "demo")
    save_artifact(uri, {"x": torch.ones(3)}, {"v": 2}, "demo")
    tensors, meta = load_artifact(uri)
    assert meta == {"v": 2} and torch.equal(tensors["x"], torch.ones(3))


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    first = data.index(b"\n") + 1
    if how == "truncate":
        data = data[: first + (len(data) - first) // 2]
    elif how == "flip_payload":
        data[-10] ^= 0xFF
    elif how == "flip_header":
        data[first + 3] ^= 0x01
    elif how == "bad_first_line":
        data[0:5] = b"xxxxx"
    elif how == "version":
        data = data.replace(b" v1 ", b" v9 ", 1)
    elif how == "trailing":
        data += b"junk"
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncate", "truncated"),
        ("flip_payload", "checksum mismatch"),
        ("flip_header", "checksum mismatch"),
        ("bad_first_line", "not a torchrec_mec-artifact"),
        ("version", "version v9 is not supported"),
        ("trailing", "trailing bytes"),
    ],
)
def test_damaged_artifact_is_reported_by_name(tmp_path, how, match):
    uri = str(tmp_path / "user_id.mec")
    save_artifact(uri, _tensors(), {"table": "user_id"}, "mec_quantized_table")
    _damage(uri, how)
    with pytest.raises(ArtifactError, match=match) as err:
        load_artifact(uri)
    assert uri in str(err.value)


def test_wrong_kind_and_missing_file(tmp_path):
    uri = str(tmp_path / "a.mec")
    save_artifact(uri, {}, {}, "metrics")
    with pytest.raises(ArtifactError, match=f"{uri}.*'metrics', expected 'mec_quantized_table'"):
        load_artifact(uri, expect_kind="mec_quantized_table")
    with pytest.raises(ArtifactError, match="file not found"):
        load_artifact(str(tmp_path / "nope.mec"))


def test_empty_file_is_not_an_artifact(tmp_path):
    uri = tmp_path / "empty.mec"
    uri.write_bytes(b"")
    with pytest.raises(ArtifactError, match=str(uri)):
        load_artifact(str(uri))
