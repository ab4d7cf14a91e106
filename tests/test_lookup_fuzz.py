"""The compiled lookup under 10,000 random, often malformed KeyedJaggedTensors (tests/fuzz_lookups.py),
in a subprocess: an out-of-bounds read that crashes the process fails this test, not pytest."""
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_mec.ops.fast_lookup import cpu_operator_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not cpu_operator_available(),
                    reason="torchrec_mec._C is not built (pip install --no-build-isolation -e .)")
def test_fuzzed_kjts_match_float64_or_raise_the_named_error():
    run = subprocess.run([sys.executable, "-m", "tests.fuzz_lookups", "--cases", "10000",
                          "--seed", "0"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-4000:]}"
    assert "fuzz: 10000 cases" in run.stdout and "all as expected" in run.stdout, run.stdout
    outcomes = {tuple(line.split()[:2]): int(line.split()[2]) for line in run.stdout.splitlines()
                if line.startswith(("matched", "raised"))}
    # Every kind of fault was drawn and raised, and valid inputs were compared.
    for fault in ("negative_length", "huge_length", "lengths_over", "lengths_under", "bad_id",
                  "extreme_id", "bad_code", "raw_offsets", "corrupt_saved_codes"):
        assert outcomes.get(("raised", fault), 0) > 100, (fault, run.stdout)
    assert outcomes[("matched", "none")] > 500, run.stdout
