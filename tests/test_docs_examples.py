"""The python blocks of the user docs run as written."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str):
    text = (DOCS / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("doc", ["qebc.md", "new_ids.md"])
def test_doc_examples_run(doc):
    blocks = python_blocks(doc)
    assert blocks, f"{doc} has no python example"
    for code in blocks:
        exec(compile(code, f"docs/{doc}", "exec"), {})
