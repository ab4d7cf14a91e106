"""An incomplete install (TorchRec or FBGEMM missing) is named with the command that completes it."""
import subprocess
import sys

import pytest

from tests.pipeline_testing import repo_env


@pytest.mark.parametrize("missing, command", [
    ("torchrec", 'pip install --no-deps "torchrec>=1.8,<1.9"'),
    ("fbgemm_gpu", 'pip install "torchrec-mec[cpu]" (or [cuda])'),
])
def test_missing_torchrec_or_fbgemm_names_the_install_command(missing, command):
    # Hides the module from the import system in a fresh interpreter, as if it were not installed.
    code = ("import importlib.abc, sys\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {missing!r}:\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "import torchrec_mec\n")
    done = subprocess.run([sys.executable, "-c", code], env=repo_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert f"torchrec-mec needs {missing}, which is not installed: {command}" in done.stderr


def test_another_torchrec_minor_version_names_the_install_command():
    # A fresh interpreter where torchrec reports another minor version than the tested one.
    code = ("import torchrec\n"
            "torchrec.__version__ = '1.9.0'\n"
            "import torchrec_mec\n")
    done = subprocess.run([sys.executable, "-c", code], env=repo_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert ("torchrec-mec is tested with torchrec 1.8.*, found 1.9.0: "
            'pip install --no-deps "torchrec>=1.8,<1.9"') in done.stderr
