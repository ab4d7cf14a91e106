"""Each bad-input probe of the QEBC lookup raises a ValueError naming the feature or table, on
every CPU path. The probes run in one subprocess (tests/lookup_probes.py): if one of them read
out of bounds and crashed, this test would fail instead of pytest."""
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from torchrec_mec.ops.fast_lookup import cpu_operator_available

from tests.lookup_probes import PATHS, PROBES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def outcomes() -> Dict[str, str]:
    run = subprocess.run([sys.executable, "-m", "tests.lookup_probes"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-4000:]}"
    lines = [line.split(" ", 2) for line in run.stdout.splitlines() if line.strip()]
    return {f"{name} {path}": error for name, path, error in lines}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_raises_the_named_value_error(outcomes, probe, path):
    if path == "fused" and not cpu_operator_available():
        pytest.skip("torchrec_mec._C is not built (pip install --no-build-isolation -e .)")
    if path == "device" and probe == "code_past_the_codebook":
        pytest.skip("the device path reads a code >= K as codeword 0 (Triton kernel); codes are "
                    "checked when loaded (load_codes, load_state_dict), not per lookup")
    error = outcomes[f"{probe} {path}"]
    assert error.startswith("ValueError: "), error
    assert re.search(PROBES[probe][1], error), error
