"""The TorchX component: what it launches, and a 2-process run by the local scheduler."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_testing import repo_env, tiny_flags
from torchrec_mec.pipeline import RUN_STAGE_NAMES, STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]


def _components():
    """launchers/components.py loaded by its path, as ``torchx run`` loads it."""
    spec = importlib.util.spec_from_file_location("mec_components",
                                                  REPO / "launchers" / "components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["run", *STAGE_NAMES])
def test_component_launches_the_stage_under_torchrun(stage):
    kwargs = {"format": "synthetic"} if stage in ("run", "prepare") else {}
    app = _components().mec("--model", "deepfm", stage=stage, out="runs/x", j="2x4", **kwargs)
    (role,) = app.roles
    command = " ".join(role.args)
    assert "torchrun" in command and "--nnodes 2" in command and "--nproc_per_node 4" in command
    assert f"-m torchrec_mec.cli {stage} --out runs/x" in command
    assert ("--preset published" in command) == (stage != "report")
    assert command.rstrip().endswith("--model deepfm")
    assert role.num_replicas == 2


def test_component_refuses_unknown_stages_and_misplaced_data():
    components = _components()
    with pytest.raises(ValueError, match="--stage must be run or one of prepare, pretrain"):
        components.mec(stage="train", out="runs/x")
    with pytest.raises(ValueError, match="--data/--format are for run, prepare, pretrain"):
        components.mec(stage="compress", out="runs/x", format="synthetic")


def test_launchers_is_not_an_installed_package():
    """torchx loads the component by path; pyproject installs torchrec_mec only."""
    assert not (REPO / "launchers" / "__init__.py").exists()
    assert 'include = ["torchrec_mec*"]' in (REPO / "pyproject.toml").read_text()


def _torchx(args, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    env = {**repo_env(), "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    cmd = [os.path.join(venv_bin, "torchx"), "run", "-s", "local_cwd", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_local_scheduler_runs_the_pipeline_on_two_processes(tmp_path):
    """``mec run`` as a 2-process TorchX job: every stage under torchrun, the lock and the report
    by rank 0."""
    out = str(tmp_path / "run")
    done = _torchx(["launchers/components.py:mec", "--stage", "run", "--out", out,
                    "--format", "synthetic", "--preset", "sample", "--j", "1x2",
                    "--env", f"PYTHONPATH={REPO}", "--", *tiny_flags(), "pretrain.epochs=1"],
                   tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((Path(out) / "report.json").read_text())
    assert report["training"]["pretrain"]["world_size"] == 2
    assert report["training"]["finetune"]["world_size"] == 2
    assert [e["epoch"] for e in report["training"]["pretrain"]["epochs"]] == [0, 1]
    assert sum(t["compressed"] for t in report["tables"].values()) == 2
    assert "tables compressed" in done.stdout + done.stderr
    for stage in RUN_STAGE_NAMES:
        record = json.loads((Path(out) / "lineage" / f"{stage}.json").read_text())
        assert record["world_size"] == 2
    assert (Path(out) / "mec.lock").read_text() == "", "the job released the lock"
