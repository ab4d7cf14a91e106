"""A failed re-prepare loses nothing: the new data set is built beside the old one and swapped in
only once complete (issue 11: a wrong --format, a gzip file named .tsv or a bad row under
data.bad_rows=fail deleted data/manifest.json and every array first)."""
import gzip
import hashlib
import os
import shutil

import pytest

from tests.pipeline_testing import write_criteo
from torchrec_mec.cli import main
from torchrec_mec.data import EncodedDataset, prepare_dataset


def _snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def prepared(tmp_path):
    good = write_criteo(tmp_path / "day.tsv", 300)
    out = str(tmp_path / "run")
    argv = ["prepare", "--data", good, "--format", "criteo", "--out", out, "--no-progress"]
    assert main(argv) == 0
    return good, out, argv


def test_failed_reprepare_keeps_the_old_data_set(prepared, tmp_path, capsys):
    good, out, argv = prepared
    data = os.path.join(out, "data")
    before = _snapshot(data)
    gz = tmp_path / "packed.tsv"
    gz.write_bytes(gzip.compress(open(good, "rb").read()))
    bad_row = tmp_path / "bad_row.tsv"
    lines = open(good).read().splitlines(keepends=True)
    bad_row.write_text("".join(lines[:100] + ["0\tnot-a-number\n"] + lines[100:]))
    attempts = {
        "wrong --format": ["prepare", "--data", good, "--format", "avazu"],
        "gzip named .tsv": ["prepare", "--data", str(gz), "--format", "criteo"],
        "bad row under fail": ["prepare", "--data", str(bad_row), "--format", "criteo", "--set",
                               "data.bad_rows=fail"],
    }
    for what, attempt in attempts.items():
        assert main(attempt + ["--out", out, "--no-progress"]) != 0, what
        capsys.readouterr()
        assert _snapshot(data) == before, what
        assert not [f for f in os.listdir(out) if f.startswith(".data.")], what
    EncodedDataset(data, verify=True)
    # The old set and its lineage still agree: preparing it again finds it up to date.
    assert main(argv) == 0
    assert "prepare: up to date" in capsys.readouterr().err


def test_reprepare_swaps_in_the_new_set(prepared, tmp_path):
    _, out, _ = prepared
    other = write_criteo(tmp_path / "other.tsv", 200, seed=1)
    assert main(["prepare", "--data", other, "--format", "criteo", "--out", out,
                 "--no-progress"]) == 0
    ds = EncodedDataset(os.path.join(out, "data"), verify=True)
    assert sum(ds.num_rows(s) for s in ("train", "val", "test")) == 200
    assert not [f for f in os.listdir(out) if f.startswith(".data.")]


def test_swap_killed_between_its_two_renames_is_undone(prepared, tmp_path):
    """The old set was moved aside by a process that has ended; the next prepare puts it back
    and reuses it."""
    good, out, _ = prepared
    data = os.path.join(out, "data")
    before = _snapshot(data)
    os.rename(data, os.path.join(out, ".data.old-999999999"))  # no such process
    os.makedirs(os.path.join(out, ".data.new-999999999"))  # a half-built set of that process
    ds = prepare_dataset(good, "criteo", data, progress=False)
    assert _snapshot(data) == before and ds.num_rows("train") > 0
    assert sorted(os.listdir(out)) == ["data", "lineage", "mec.lock"]


def test_a_folder_that_is_not_a_data_set_is_never_replaced(tmp_path):
    good = write_criteo(tmp_path / "day.tsv", 50)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files but no manifest.json"):
        prepare_dataset(good, "criteo", str(folder), progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"
    shutil.rmtree(folder)
