#!/usr/bin/env bash
# One call that re-measures issue #6's GPU goals (docs/benchmarks.md, "Results (GPU)") and leaves every
# table and JSON under OUT: the lent GPU machines are held for minutes, so the round is one command.
#   bash benchmarks/gpu_round.sh OUT            # on the GPU machine (DEVICE=cuda, the default)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_round.sh /tmp/round   # dry run of the same commands on a CPU
# The lent machines have their own CUDA torch and no internet: put meansparse's src and the pure-Python
# dependencies on PYTHONPATH and point MEANSPARSE_CIFAR10_JPG at a copy of the CIFAR-10 archive, e.g.
#   export PYTHONPATH=$PWD/src:$PWD/.devdata/site MEANSPARSE_CIFAR10_JPG=$PWD/.devdata/cifar10-jpg.tar.gz
set -euo pipefail
OUT=${1:?usage: gpu_round.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
CKPT=${CKPT:-checkpoints/cifar10-resnet18-gelu-pgd}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -n "${QUICK:-}" ]; then
  OP=(--widths 16 --batch 64 --repeats 2); CAL=(--widths 16 --batch 128 --batches 2 --repeats 2)
  EV=(--n 32 --batch-size 32 --steps 5 --repeats 1); AA=(--n 16 --batch-size 16 --steps 5 --queries 50 --repeats 1)
else
  OP=(--widths 16 64 --batch 256 1024 --repeats 10); CAL=(--widths 16 64 --batch 1024 --batches 8 --repeats 5)
  EV=(--n 1000 --batch-size 500 --steps 100 --repeats 3); AA=(--n 200 --batch-size 200 --repeats 1)
fi
run() {  # name, command...: stdout to OUT/name.txt, JSON to OUT/name.json; a failing step does not stop the round
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1; then echo "   failed (see $OUT/$name.txt)"; fi
  tail -n 14 "$OUT/$name.txt"
}
run operator python benchmarks/bench_operator.py --device "$DEVICE" --glibc default "${OP[@]}"
run calibration python benchmarks/bench_calibration.py --device "$DEVICE" "${CAL[@]}"
run apgd python benchmarks/bench_evaluate.py --device "$DEVICE" --checkpoint "$CKPT" --attack apgd-ce "${EV[@]}"
run fused_vs_eager python benchmarks/bench_evaluate.py --device "$DEVICE" --checkpoint "$CKPT" --attack apgd-ce \
  --fused-vs-eager "${EV[@]}"
run autoattack python benchmarks/bench_evaluate.py --device "$DEVICE" --checkpoint "$CKPT" "${AA[@]}"
