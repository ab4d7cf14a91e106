#!/usr/bin/env bash
# The CPU install of docs/install.md, checked in an empty virtual environment: the two documented
# pip commands, then no CUDA package in `pip list`, a QEBC forward against plain PyTorch, and
# `mec --help`. Not part of `bash dev.sh test` (it downloads and compiles for a few minutes):
#   bash .ci/fresh_install.sh            # PIP_EXTRA_INDEX_URL etc. are honoured as usual
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

python3.11 -m venv "$work/venv" 2>/dev/null || python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
# The documented commands (docs/install.md), run from a copy so that the checkout stays clean.
git -C "$repo" archive --format=tar HEAD | (mkdir "$work/src" && tar -x -C "$work/src")
"${pip[@]}" install -q "$work/src[cpu]"
"${pip[@]}" install -q --no-deps "torchrec>=1.8,<1.9"
echo "fresh_install: installed in $((SECONDS - start)) s"

"${pip[@]}" list --format=freeze > "$work/installed.txt"
if grep -i -E '^(nvidia[-_]|cuda[-_]|fbgemm[-_]gpu==|triton==)' "$work/installed.txt"; then
  echo "fresh_install: FAIL: CUDA packages above were installed" >&2
  exit 1
fi
grep -i -E '^(torch|fbgemm[-_]gpu[-_]cpu|torchrec|torchrec[-_]mec)==' "$work/installed.txt"
"$work/venv/bin/python" -c "import torch; assert torch.version.cuda is None, torch.version.cuda"

cd "$work"  # not the checkout: the installed package is what is imported
"$work/venv/bin/python" - <<'EOF'
import importlib.util

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.ops.fast_lookup import cpu_operator_available

assert importlib.util.find_spec("launchers") is None, "launchers/ must not be installed"
assert cpu_operator_available(), "the C++ lookup operator was not built by the install"
cfg = QuantizedEmbeddingBagConfig(name="t", num_embeddings=50, embedding_dim=8,
                                  feature_names=["f"], num_subspaces=2, codebook_size=4)
qebc = QuantizedEmbeddingBagCollection([cfg])
ids, lengths = torch.tensor([3, 7, 7, 49]), torch.tensor([2, 0, 2])
out = qebc(KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths))
rows = qebc.embedding_bags["t"].decode().double()  # reference: the decoded rows, summed per bag
want = torch.stack([rows[[3, 7]].sum(0), torch.zeros(8, dtype=torch.float64), rows[[7, 49]].sum(0)])
torch.testing.assert_close(out.values().double(), want, rtol=1e-5, atol=1e-5)
print("fresh_install: QEBC forward matches the decoded rows (C++ operator)")
EOF
"$work/venv/bin/mec" --help > /dev/null
echo "fresh_install: OK in $((SECONDS - start)) s (mec --help ran)"
