"""docs/serving.md runs as written: the packaging block here, the scoring block in a fresh process
that imports neither torchrec_mec nor torchrec; its scores match the eager model's."""
import ast
import subprocess
import sys

import pytest
import torch

from torchrec_mec.ops.fast_lookup import cpu_operator_available
from torchrec_mec.serving import ServingModule

from tests.test_docs_examples import python_blocks


@pytest.mark.skipif(not cpu_operator_available(),
                    reason="torchrec_mec._C is not built (pip install --no-build-isolation -e .)")
def test_serving_doc_packages_and_scores_without_the_training_code(tmp_path, monkeypatch):
    package, score = python_blocks("serving.md")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(package, "docs/serving.md", "exec"), namespace)
    assert (tmp_path / "ctr_model.pt2").is_file()

    run = subprocess.run([sys.executable, "-c", score], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    served = torch.tensor(ast.literal_eval(run.stdout.strip().splitlines()[-1]))

    # The same batch as the doc's scoring block, through the eager model.
    eager = ServingModule(namespace["model"], ["user", "site"]).eval()
    with torch.no_grad():
        expected = torch.sigmoid(eager(
            torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.5, 0.25, -0.75, 0.0]]),
            torch.tensor([5, 95_000, 1, 2]), torch.tensor([1, 1, 2, 0])))
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)

    # A bad id fails the served call with the operator's message, naming feature and table.
    bad = score.replace("values = torch.tensor([5, 95_000, 1, 2])",
                        "values = torch.tensor([5, 100_000, 1, 2])")
    assert bad != score
    run = subprocess.run([sys.executable, "-c", bad], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0
    assert "feature 'user': id 100000 is out of range for table 't_user'" in run.stderr, run.stderr
