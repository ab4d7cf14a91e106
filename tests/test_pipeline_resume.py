"""A training stage killed with SIGKILL resumes from its last checkpoint and ends in the state of
an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.pipeline_testing import repo_env, tiny_flags, tiny_settings
from torchrec_mec.pipeline import DataSource, load_model, run_stages, stage_dir

EXTRA = {"pretrain__epochs": 2, "pretrain__checkpoint_every": 4}


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"mec exited ({proc.returncode}) before writing {path}:\n"
                                 f"{proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout}s")
        time.sleep(0.01)


def test_killed_pretrain_resumes_to_the_uninterrupted_state(tmp_path):
    settings = tiny_settings(**EXTRA)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run_stages(whole, "prepare", settings, source=DataSource("synthetic"), progress=False)
    shutil.copytree(whole, killed)  # the data set and its lineage record
    run_stages(whole, "pretrain", settings, progress=False)

    cmd = [sys.executable, "-m", "torchrec_mec.cli", "pretrain", "--out", killed, "--preset",
           "sample", "--no-progress", *tiny_flags(), "pretrain.epochs=2",
           "pretrain.checkpoint_every=4"]
    proc = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = os.path.join(stage_dir(killed, "pretrain"), "checkpoint", "manifest.json")
    _wait_for(checkpoint, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(stage_dir(killed, "pretrain"), "model.mec")), \
        "the run finished before it could be killed; nothing was resumed"

    outcome = run_stages(killed, "pretrain", settings, progress=False)  # the lock is free again
    assert outcome["pretrain"].ran and "no record of it finishing" in outcome["pretrain"].reason
    model_a, meta_a = load_model(stage_dir(whole, "pretrain"))
    model_b, meta_b = load_model(stage_dir(killed, "pretrain"))
    assert len(meta_b["history"]["step_loss"]) == len(meta_a["history"]["step_loss"])
    assert meta_b["history"]["step_loss"] == pytest.approx(meta_a["history"]["step_loss"],
                                                           abs=1e-6)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[key], value, atol=1e-6, rtol=1e-6,
                                   msg=key)
    leftovers = [f for f in os.listdir(stage_dir(killed, "pretrain")) if "checkpoint" in f]
    assert leftovers == [], "a finished stage removes its checkpoint files"
