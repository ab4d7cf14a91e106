"""quantize_tables in one process: kept-full tables, artifacts, skipping, resuming, damage."""
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch

from torchrec_mec.artifacts import ArtifactError, load_artifact
from torchrec_mec.quantize import (
    MECConfig,
    assign_tables,
    quantize_table,
    quantize_tables,
    table_seed,
)

driver = importlib.import_module("torchrec_mec.quantize.driver")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = MECConfig(num_subspaces=2, codebook_size=16, epochs=6, samples_per_epoch=2048,
                batch_size=512, eval_rows=256, early_stopping_patience=10)


def make_tables(sizes=(("ads", 3000), ("users", 2000), ("tiny", 300))):
    out = {}
    for i, (name, n) in enumerate(sizes):
        g = torch.Generator().manual_seed(100 + i)
        out[name] = (torch.randn(n, 8, generator=g), torch.randint(0, 1000, (n,), generator=g))
    return out


def same_result(a, b) -> bool:
    sa, sb = a.stats.to_dict(), b.stats.to_dict()
    for s in (sa, sb):
        s.pop("seconds"), s.pop("resumed_from_epoch")
    return torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and sa == sb


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_assign_tables_largest_first_balanced():
    equal = assign_tables({f"t{i}": 100 for i in range(6)}, world_size=2)
    assert sorted(equal.values()) == [0, 0, 0, 1, 1, 1]
    rows = {"a": 90, "b": 50, "c": 40, "d": 30, "e": 20, "f": 10}
    owner = assign_tables(rows, world_size=3)
    load = [sum(n for t, n in rows.items() if owner[t] == r) for r in range(3)]
    assert max(load) - min(load) <= max(rows.values())
    assert owner == assign_tables(dict(reversed(list(rows.items()))), world_size=3)


def test_table_seed_depends_on_seed_and_name_only():
    assert table_seed(0, "ads") == table_seed(0, "ads")
    assert len({table_seed(0, "ads"), table_seed(1, "ads"), table_seed(0, "users")}) == 3


def test_small_tables_kept_full_and_results_match_quantize_table(tmp_path):
    tables = make_tables()
    out = quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)
    assert out["tiny"] is None
    assert sorted(os.listdir(tmp_path)) == ["ads.mec", "users.mec"]  # checkpoints removed
    for name in ("ads", "users"):
        direct = quantize_table(*tables[name], dataclasses.replace(CFG, seed=table_seed(0, name)),
                                progress=False)
        assert same_result(out[name], direct)
        _, meta = load_artifact(str(tmp_path / f"{name}.mec"), expect_kind="mec_quantized_table")
        assert meta["table"] == name and meta["stats"]["num_rows"] == tables[name][0].shape[0]


def test_rerun_skips_finished_tables_and_redoes_stale_ones(tmp_path, monkeypatch):
    tables = make_tables()
    first = quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)
    calls = []
    real = driver.quantize_table

    def counting(*args, **kwargs):
        calls.append(kwargs["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "quantize_table", counting)
    again = quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)
    assert calls == [] and all(same_result(first[t], again[t]) for t in ("ads", "users"))
    changed = dataclasses.replace(CFG, reg_weight=0.0)
    quantize_tables(tables, changed, str(tmp_path), min_rows=1000, progress=False)
    assert sorted(calls) == ["ads", "users"]
    quantize_tables(tables, changed, str(tmp_path), min_rows=1000, overwrite=True, progress=False)
    assert len(calls) == 4


def test_corrupted_artifact_is_reported_not_loaded(tmp_path):
    tables = make_tables()
    quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)
    path = tmp_path / "users.mec"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{path}.*checksum mismatch"):
        quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ArtifactError, match=f"{path}.*truncated"):
        quantize_tables(tables, CFG, str(tmp_path), min_rows=1000, progress=False)


# The child quantizes one table, then stalls after its epoch-3 checkpoint until it is killed.
_CHILD = """
import importlib, sys, time, torch
torch.set_num_threads(1)
qt = importlib.import_module("torchrec_mec.quantize.quantize_table")
save = qt._save_checkpoint
def stall_after_epoch_3(*args):
    save(*args)
    if args[5].epoch >= 3:
        print("stalled", flush=True)
        time.sleep(600)
qt._save_checkpoint = stall_after_epoch_3
from tests.test_quantize_driver import CFG, make_tables
from torchrec_mec.quantize import quantize_tables
quantize_tables(make_tables(), CFG, sys.argv[1], min_rows=2500, progress=False)
"""


def test_killed_run_resumes_from_last_epoch_checkpoint(tmp_path):
    out_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": REPO}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out_dir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # blocks until the stall (or the child dies)
        assert line.strip() == "stalled", child.stderr.read()
    finally:
        child.kill()
        child.wait()
    checkpoint = out_dir / "ads.mec.ckpt"
    assert not (out_dir / "ads.mec").exists()
    assert load_artifact(str(checkpoint))[1]["epoch"] == 3

    resumed = quantize_tables(make_tables(), CFG, str(out_dir), min_rows=2500, progress=False)
    assert resumed["ads"].stats.resumed_from_epoch == 3
    assert not checkpoint.exists()
    fresh = quantize_tables(make_tables(), CFG, str(tmp_path / "fresh"), min_rows=2500,
                            progress=False)
    assert fresh["ads"].stats.resumed_from_epoch == 0
    assert same_result(resumed["ads"], fresh["ads"])


def test_corrupted_checkpoint_is_reported(tmp_path):
    tables = make_tables()
    name = "ads"
    uri = str(tmp_path / "ads.mec.ckpt")
    cfg = dataclasses.replace(CFG, seed=table_seed(CFG.seed, name), epochs=2)
    quantize_table(*tables[name], cfg, checkpoint_uri=uri, progress=False)
    (tmp_path / "ads.mec.ckpt").write_bytes((tmp_path / "ads.mec.ckpt").read_bytes()[:-50])
    with pytest.raises(ArtifactError, match=f"{uri}.*truncated"):
        quantize_table(*tables[name], cfg, checkpoint_uri=uri, progress=False)


def test_bad_table_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'a/b'"):
        quantize_tables({"a/b": make_tables()["tiny"]}, CFG, str(tmp_path), progress=False)
