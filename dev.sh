#!/usr/bin/env bash
# One entry point on a fresh machine: builds .venv (CPU torch first), then runs a task.
#   ./dev.sh demo [args]   the main job on the embedded default (offline digits)
#   ./dev.sh test          ruff + the default test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MEANSPARSE_VENV:-.venv}
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0  # the torchvision release built against TORCH_VERSION (its wheel pins torch==2.13.0)
if [ ! -x "$VENV/bin/meansparse" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The local CPU build: an unpinned torch would pull gigabytes of CUDA wheels.
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  # [zoo] (timm, robustbench) comes with the dev install so the zoo tests run.  robustbench asks for any
  # torchvision: naming torch and the torchvision built for it in the same command keeps pip from replacing
  # torch.  (That torchvision wheel is a CUDA build whose C++ ops cannot load with the CPU torch; meansparse's
  # torchvision shim lets its pure-Python parts import anyway, see docs/zoo.md.)
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" -e ".[dev,zoo]"
  "$VENV/bin/python" -c "import sys, torch; v = torch.__version__; sys.exit(None if v.split('+')[0] == '$TORCH_VERSION' else f'torch was replaced by {v}')"
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
