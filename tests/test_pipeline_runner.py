"""The stage graph and its runner: lineage recorded and checked, every artifact verified in full
before a stage is skipped, and no report that pairs outputs of two runs (issue 11's probes)."""
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from tests.pipeline_testing import repo_env, tiny_flags, tiny_settings
from torchrec_mec.cli import build_parser, main
from torchrec_mec.pipeline import (
    RUN_STAGE_NAMES,
    STAGE_NAMES,
    STAGES,
    DataSource,
    StageError,
    read_report,
    run,
    run_stages,
)
from torchrec_mec.pipeline.graph import producer, upstream
from torchrec_mec.pipeline.outputs import load_exported_model, load_model
from torchrec_mec.pipeline.lineage import Digests, combined_digest, read_record

SYNTHETIC = DataSource("synthetic")
# The module, not the function the package exports under the same name.
graph_module = importlib.import_module("torchrec_mec.pipeline.graph")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run; tests that change it work on a copy (:func:`_copy`)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    run(None, "synthetic", out, tiny_settings(), progress=False)
    return out


def _copy(finished_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out)
    return out


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _folder(run_dir, rel):
    """{file: sha256} of every file under run_dir/rel, computed here."""
    files = sorted(os.path.relpath(os.path.join(root, f), run_dir)
                   for root, _, names in os.walk(os.path.join(run_dir, rel)) for f in names)
    return {f: _sha256(os.path.join(run_dir, f)) for f in files}


def _mtimes(out):
    return {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in
            ("pretrain/model.mec", "compress/compressed.mec", "finetune/model.mec",
             "evaluate/metrics.mec", "report.json")}


def test_graph_orders_stages_by_what_they_read():
    assert STAGE_NAMES == ("prepare", "pretrain", "compress", "finetune", "evaluate", "compare",
                           "report", "update")
    # mec run does not compare: report reads compare's outputs only when present.
    assert RUN_STAGE_NAMES == (*STAGE_NAMES[:5], "report")
    for i, stage in enumerate(STAGES):
        for path in (*stage.inputs, *stage.optional_inputs):  # written by an earlier stage
            assert STAGE_NAMES.index(producer(path).name) < i, (stage.name, path)
    assert [s.name for s in upstream("evaluate")] == list(STAGE_NAMES[:5])
    # The CLI's sub-commands are the graph's stages (plus run), not a list of their own.
    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == ["run", *STAGE_NAMES, "export"]


def test_lineage_records_the_exact_inputs_and_settings(finished_run):
    """Checked against sha256 of the files computed here, and the settings object itself."""
    record, _ = read_record(finished_run, "compress")
    tables = _folder(finished_run, "pretrain/tables")
    assert set(tables) == {"pretrain/tables/.metadata", "pretrain/tables/__0_0.distcp",
                           "pretrain/tables/manifest.json"}  # a DCP directory, one writer
    assert record.inputs == {
        "pretrain/tables/": combined_digest(tables),
        "pretrain/counts.mec": _sha256(os.path.join(finished_run, "pretrain/counts.mec"))}
    assert record.outputs == {
        "compress/compressed.mec": {"compress/compressed.mec": _sha256(
            os.path.join(finished_run, "compress", "compressed.mec"))},
        "compress/codes/": _folder(finished_run, "compress/codes")}
    assert record.settings == json.loads(json.dumps(asdict(tiny_settings().compress)))
    data, _ = read_record(finished_run, "prepare")
    assert data.outputs["data/"] == _folder(finished_run, "data")
    report, _ = read_record(finished_run, "report")
    assert report.inputs["evaluate/metrics.mec"] == _sha256(
        os.path.join(finished_run, "evaluate", "metrics.mec"))


def test_export_writes_one_file_of_the_model_saved_in_shards(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    target = str(tmp_path / "model.mec")
    assert main(["export", "--out", out, "--to", target]) == 0
    assert capsys.readouterr().out.strip() == target
    exported, meta = load_exported_model(target)
    saved, saved_meta = load_model(os.path.join(out, "finetune"))
    assert meta == saved_meta
    assert exported.state_dict().keys() == saved.state_dict().keys()
    for key, value in saved.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    assert main(["export", "--out", out, "--stage", "update"]) == 1  # no update ran
    assert "update/model.mec: file not found" in capsys.readouterr().err


def test_rerun_of_a_finished_run_skips_every_stage(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    before = _mtimes(out)
    done = run_stages(out, "report", tiny_settings(), source=SYNTHETIC, redo=STAGE_NAMES,
                      progress=False)
    assert [s for s, o in done.items() if o.ran] == []
    assert _mtimes(out) == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_artifact_is_redone_by_run_and_named_by_report(finished_run, tmp_path, damage,
                                                               capsys):
    """Truncating a shard file of pretrain/tables/ to half, or flipping one byte, is found."""
    out = _copy(finished_run, tmp_path)
    path = os.path.join(out, "pretrain", "tables", "__0_0.distcp")
    good = open(path, "rb").read()
    bad = good[: len(good) // 2] if damage == "truncate" else (
        good[:-100] + bytes([good[-100] ^ 0x01]) + good[-99:])
    open(path, "wb").write(bad)
    assert main(["report", "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"report needs pretrain, which has damaged outputs: {path} does not match" in err
    assert f"`mec pretrain --out {out}`" in err and "redoes a damaged stage" in err
    assert main(["evaluate", "--out", out, "--preset", "sample", *tiny_flags()]) == 1
    assert "evaluate needs pretrain, which has damaged outputs" in capsys.readouterr().err

    done = run_stages(out, "report", tiny_settings(), source=SYNTHETIC, redo=STAGE_NAMES,
                      progress=False)
    assert done["pretrain"].ran and "does not match" in done["pretrain"].reason
    # Retrained from scratch. If it gave the same bytes, what read them is still valid and is
    # kept; if not, all of it is redone.
    same = open(path, "rb").read() == good
    assert [done[s].ran for s in ("compress", "finetune", "evaluate", "report")] == [not same] * 4


def test_damaged_data_set_is_prepared_again(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    path = os.path.join(out, "data", "train", "dense.npy")
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(StageError, match=r"pretrain needs prepare, which has damaged outputs: "
                                         r".*data/train/dense\.npy does not match"):
        run_stages(out, "pretrain", tiny_settings(), progress=False)
    done = run_stages(out, "report", tiny_settings(), source=SYNTHETIC, redo=STAGE_NAMES,
                      progress=False)
    assert done["prepare"].ran and not done["pretrain"].ran  # the same data set again
    assert _sha256(path) == read_record(out, "prepare")[0].outputs["data/"]["data/train/dense.npy"]


def test_pretrain_with_another_seed_then_report_refuses(finished_run, tmp_path, capsys):
    """Issue 11: `mec pretrain --seed 5` in a finished run, then `mec report`, exited 0 with a
    report pairing the new pre-training with the old test metrics."""
    out = _copy(finished_run, tmp_path)
    report_before = open(os.path.join(out, "report.json")).read()
    assert main(["pretrain", "--out", out, "--preset", "sample", "--no-progress",
                 *tiny_flags(), "pretrain.seed=5"]) == 0
    assert read_record(out, "pretrain")[0].settings["pretrain"]["seed"] == 5
    capsys.readouterr()
    assert main(["report", "--out", out]) == 1
    err = capsys.readouterr().err
    # counts.mec changed too: it holds the new model's table sensitivity.
    assert ("report needs compress, which is out of date: pretrain/tables/, "
            "pretrain/counts.mec changed since it ran") in err
    assert (f"Run `mec compress --out {out}`, then `mec finetune --out {out}`, then "
            f"`mec evaluate --out {out}`") in err
    assert open(os.path.join(out, "report.json")).read() == report_before  # left alone
    assert main(["evaluate", "--out", out, "--preset", "sample", *tiny_flags()]) == 1
    assert "evaluate needs compress, which is out of date" in capsys.readouterr().err
    # `mec run` with the new seed redoes what read the new pre-training, and only that.
    done = run_stages(out, "report", tiny_settings(pretrain__seed=5), source=SYNTHETIC,
                      redo=STAGE_NAMES, progress=False)
    assert [s for s, o in done.items() if o.ran] == ["compress", "finetune", "evaluate", "report"]
    report = read_report(out)
    assert report["settings"]["pretrain"]["seed"] == 5


def test_a_rerun_killed_part_way_resumes_rather_than_redoing_from_scratch(finished_run, tmp_path,
                                                                         monkeypatch):
    """A finished stage reruns (a setting changed) and dies after rewriting part of its
    outputs: the next run reads "has not finished" and resumes, instead of "damaged outputs"
    and a redo from scratch (which deleted a killed ``mec compare``'s finished cells). A
    failed run that changed nothing leaves the stage up to date
    (``test_data_reprepare.py::test_failed_reprepare_keeps_the_old_data_set``)."""
    out = _copy(finished_run, tmp_path)
    metrics = os.path.join(out, "evaluate", "metrics.mec")
    changed = tiny_settings(evaluate__batch_size=7)

    def killed(*args, **kwargs):
        with open(metrics, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(graph_module, "evaluate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_stages(out, "evaluate", changed, progress=False)
    monkeypatch.undo()
    done = run_stages(out, "evaluate", changed, progress=False)
    assert done["evaluate"].ran
    assert done["evaluate"].reason.startswith(f"its last run did not finish ({metrics} does not")
    assert read_record(out, "evaluate")[0].settings["batch_size"] == 7
    assert _sha256(metrics) == read_record(out, "evaluate")[0].outputs["evaluate/metrics.mec"][
        "evaluate/metrics.mec"]


def test_changed_setting_reruns_the_stage_and_names_it(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    done = run_stages(out, "finetune", tiny_settings(finetune__dense_lr=3e-4), progress=False)
    assert done["finetune"].reason == ("its settings changed: finetune.dense_lr 0.0001 -> "
                                       "0.0003")
    assert not done["pretrain"].ran and not done["compress"].ran


def test_two_runs_into_one_directory_at_once(tmp_path):
    """Issue 11: two `mec run` into one --out at once (seeds 0 and 1) gave a report pairing
    pre-training seed 0 with fine-tuning seed 1. The first holds the lock (it is stopped while
    holding it, so the second surely meets it), the second is refused naming it, the report is
    the first's alone."""
    out = str(tmp_path / "run")

    def mec_run(seed):
        cmd = [sys.executable, "-m", "torchrec_mec.cli", "run", "--format", "synthetic", "--out",
               out, "--preset", "sample", "--no-progress", "--seed", str(seed), *tiny_flags()]
        return subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = mec_run(0)
    lock = os.path.join(out, "mec.lock")
    deadline = time.monotonic() + 300
    while not (os.path.exists(lock) and f'"pid": {first.pid}' in open(lock).read()):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        second = mec_run(1)
        _, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert f"{out} is in use by pid {first.pid} on " in err
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    report = read_report(out)
    seeds = {report["settings"]["pretrain"]["seed"], report["settings"]["finetune"]["seed"],
             report["settings"]["compress"]["quantizer"]["seed"]}
    assert seeds == {0}
    for stage in RUN_STAGE_NAMES:  # every stage's lineage is the first run's, and it verifies
        record, _ = read_record(out, stage)
        for files in record.outputs.values():
            assert files == {f: _sha256(os.path.join(out, f)) for f in files}


def test_digests_of_a_folder_name_missing_and_extra_files(tmp_path):
    from torchrec_mec.pipeline.lineage import StageRecord, damaged_outputs

    root = tmp_path / "run"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "a").write_bytes(b"1")
    (root / "ckpt" / "b").write_bytes(b"2")
    digests = Digests(str(root))
    record = StageRecord("x", "t", 1, None, {}, {"ckpt/": digests.files("ckpt/")})
    assert damaged_outputs(record, digests, ["ckpt/"]) is None
    (root / "ckpt" / "b").unlink()
    (root / "ckpt" / "c").write_bytes(b"3")
    problem = damaged_outputs(record, digests, ["ckpt/"])
    assert f"{root}/ckpt/b is missing" in problem and f"{root}/ckpt/c was not written" in problem
    assert "another version" in damaged_outputs(record, digests, ["ckpt/", "more.mec"])
