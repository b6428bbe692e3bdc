#!/usr/bin/env bash
# One call that re-measures the GPU goals (docs/benchmarks.md, "Results (GPU)"; issues #6 and #14) and leaves
# every table and JSON under OUT: the lent GPU machines are held for minutes, so the round is one command.
#   bash benchmarks/gpu_round.sh OUT            # on the GPU machine (DEVICE=cuda, the default)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_round.sh /tmp/round   # dry run of the same commands on a CPU
# The lent machines have their own CUDA torch and no internet: put meansparse's src and the pure-Python
# dependencies on PYTHONPATH and point MEANSPARSE_CIFAR10_JPG at a copy of the CIFAR-10 archive, e.g.
#   export PYTHONPATH=$PWD/src:$PWD/.devdata/site MEANSPARSE_CIFAR10_JPG=$PWD/.devdata/cifar10-jpg.tar.gz
# Each step has its own time limit (STEP_LIMIT_SCALE multiplies them): one slow step cannot eat the lease.
# Each model runs three ways: eager operator, fused (meansparse's compiled per-site kernels) and the whole
# model under torch.compile(mode="reduce-overhead") (CUDA graphs), each against the base model.
set -uo pipefail
OUT=${1:?usage: gpu_round.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
CKPT=${CKPT:-checkpoints/cifar10-resnet18-gelu-pgd}
SCALE=${STEP_LIMIT_SCALE:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
WC=(--whole-compile reduce-overhead)
if [ -n "${QUICK:-}" ]; then
  WRN=(--depth 16 --widths 4 --batch 32 --repeats 2); R18=(--widths 16 --batch 32 --repeats 2)
  CAL=(--arch dm_wrn --widths 4 --batch 64 --batches 2 --repeats 2)
  EV=(--n 32 --batch-size 16 --steps 5 --repeats 1)
else
  WRN=(--depth 28 --widths 10 --batch 256 --repeats 10); R18=(--widths 16 --batch 256 --repeats 10)
  CAL=(--arch dm_wrn --depth 16 --widths 4 --batch 512 --batches 8 --repeats 5)
  EV=(--n 1000 --batch-size 500 --steps 100 --repeats 1)
fi
run() {  # name, limit s, command...: stdout to OUT/name.txt, JSON to OUT/name.json; a failing step does not stop the round
  local name=$1 limit=$2; shift 2
  echo "== $name (limit $((limit * SCALE)) s): $*"
  local start=$SECONDS
  if ! timeout "$((limit * SCALE))" "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1; then
    echo "   failed or timed out (see $OUT/$name.txt)"
  fi
  echo "   $((SECONDS - start)) s"
  tail -n 16 "$OUT/$name.txt"
}
run operator_dm_wrn 170 "$PY" benchmarks/bench_operator.py --device "$DEVICE" --glibc default --arch dm_wrn "${WRN[@]}" "${WC[@]}"
run operator_resnet18 110 "$PY" benchmarks/bench_operator.py --device "$DEVICE" --glibc default --activations gelu "${R18[@]}" "${WC[@]}"
run apgd_paths 200 "$PY" benchmarks/bench_evaluate.py --device "$DEVICE" --checkpoint "$CKPT" --attack apgd-ce \
  --fused-vs-eager "${EV[@]}" "${WC[@]}"
run check_paths 170 "$PY" benchmarks/check_paths.py --device "$DEVICE" --n 500 --batch-size 250
run calibration_dm_wrn 120 "$PY" benchmarks/bench_calibration.py --device "$DEVICE" "${CAL[@]}"
