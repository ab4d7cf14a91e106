"""The TorchX components: what they launch, and a 2-process stage run by the local scheduler."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import components
from tests.pipeline_testing import repo_env, tiny_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["run", "pretrain", "compress", "finetune", "evaluate"])
def test_component_launches_the_stage_under_torchrun(name):
    kwargs = {"format": "synthetic"} if name == "run" else {}
    app = getattr(components, name)("--model", "deepfm", out="runs/x", j="2x4", **kwargs)
    (role,) = app.roles
    command = " ".join(role.args)
    assert "torchrun" in command and "--nnodes 2" in command and "--nproc_per_node 4" in command
    assert f"-m torchrec_mec.cli {name} --out runs/x" in command
    assert command.rstrip().endswith("--model deepfm")
    assert role.num_replicas == 2


def test_local_scheduler_runs_the_pipeline_on_two_processes(tmp_path):
    """``mec run`` as a 2-process TorchX job: every stage under torchrun, report by rank 0."""
    out = str(tmp_path / "run")
    venv_bin = str(Path(sys.executable).parent)
    env = {**repo_env(), "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    cmd = [os.path.join(venv_bin, "torchx"), "run", "-s", "local_cwd",
           "launchers/components.py:run", "--out", out, "--format", "synthetic",
           "--preset", "sample", "--j", "1x2", "--env", f"PYTHONPATH={REPO}", "--",
           *tiny_flags(), "pretrain.epochs=1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((Path(out) / "report.json").read_text())
    assert report["training"]["pretrain"]["world_size"] == 2
    assert report["training"]["finetune"]["world_size"] == 2
    assert [e["epoch"] for e in report["training"]["pretrain"]["epochs"]] == [0, 1]
    assert sum(t["compressed"] for t in report["tables"].values()) == 2
    assert "tables compressed" in done.stdout + done.stderr
