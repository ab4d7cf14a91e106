#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (once, and again when the pins or the C++
# operator's sources change), then runs what was asked.
#   bash dev.sh demo [mec run flags]   MEC end to end on the real Criteo sample (or generated data)
#   bash dev.sh test [pytest args]     lint, then the test suite (heavy benchmark runs are excluded)
#   bash dev.sh lint                   ruff, then mypy (configured in pyproject.toml)
#   bash dev.sh setup                  only the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
  local stamp="$VENV/.mec-stamp" want
  # The C++ operator's sources count too, so that a changed csrc/ is rebuilt into an existing .venv.
  want=$(cat requirements/*.txt pyproject.toml setup.py torchrec_mec/ops/csrc/* | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "dev.sh: setting up $VENV (python3.11, torch CPU, fbgemm-gpu-cpu, torchrec --no-deps)" >&2
  [ -x "$PY" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip setuptools wheel ninja
  "$PY" -m pip install -q -r requirements/cpu.txt -r requirements/dev.txt
  "$PY" -m pip install -q --no-deps torchrec==1.8.0
  # --no-build-isolation: the C++ fast path compiles against the torch installed above.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
}

# ruff over the repository, then mypy over torchrec_mec; a finding fails the command.
lint() {
  "$VENV/bin/ruff" check --quiet .
  "$VENV/bin/mypy"
}

cmd=${1:-demo}; shift || true
setup
export PATH="$PWD/$VENV/bin:$PATH"
case "$cmd" in
  setup) ;;
  demo)
    data=../shared/data/criteo_sample_8k.tsv
    if [ -f "$data" ]; then
      exec mec run --data "$data" --format criteo --out runs/demo --preset sample "$@"
    fi
    echo "dev.sh: $data not found (the shared samples sit beside the repo); using generated data" >&2
    exec mec run --format synthetic --out runs/demo --preset sample "$@"
    ;;
  lint) lint ;;
  test)
    lint
    set +e
    "$PY" -m pytest -q "$@"
    rc=$?
    # pytest's 5 means no test ran: a failure here, never a pass.
    [ $rc -eq 5 ] && echo "dev.sh: pytest collected no tests" >&2
    exit $rc
    ;;
  *) echo "usage: bash dev.sh demo|test|lint|setup [args]" >&2; exit 2 ;;
esac
