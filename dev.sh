#!/usr/bin/env bash
# One entry point on a fresh machine: builds .venv (CPU torch first), then runs a task.
#   ./dev.sh demo [args]   the main job on the embedded default (offline digits)
#   ./dev.sh test          ruff + the default test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MEANSPARSE_VENV:-.venv}
if [ ! -x "$VENV/bin/meansparse" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The local CPU build: an unpinned torch would pull gigabytes of CUDA wheels.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$VENV/.installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"
task=${1:-test}; shift || true
case "$task" in
  test)
    ruff check src tests benchmarks experiments
    python -m pytest "$@"
    ;;
  demo)
    meansparse demo --out "${MEANSPARSE_DEMO_OUT:-demo-out}" "$@"
    ;;
  *)
    echo "usage: ./dev.sh {demo|test} [args]" >&2; exit 2 ;;
esac
