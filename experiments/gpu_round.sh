#!/usr/bin/env bash
# One GPU call for the measurements that are hours on 2 CPU cores (issues #25 and #24), prepared for the device
# tool's short leases: every step has its own time limit, every run resumes from its state files, and what the
# step left is packed into OUT (one tar of the state files, the tables), so the next call carries the states
# back (carry: experiments/results/cache, or $MEANSPARSE_EXPERIMENT_STATE) and goes on where this one stopped.
#   bash experiments/gpu_round.sh OUT            # on the GPU machine (DEVICE=cuda, the default)
#   DEVICE=cpu QUICK=1 bash experiments/gpu_round.sh /tmp/round   # dry run of the same commands on a CPU
# Steps (STEPS, default all, in this order):
#   strongest-relu  issue #25 item 4: experiments/strongest.py, ReLU PGD-AT, α 0.35, 0.2, 0 on N images
#   strongest-gelu  the same on the GELU PGD-AT checkpoint
#   ablations       the paper's ablations with the MeanSparse-aware honest columns (--attack-set aware)
#   arms            issue #24 item 4: experiments/arms_eval.py, the finished fine-tuning arms under ARMS_ROOT
#                   (default checkpoints/finetune-arms, the committed MeanSparse arms; the controls' 1,000-image
#                   records are committed; another OUT of finetune_arms.sh: carry it, only runs/<act>-<arm>/best.*
#                   are read, about 2.7 MB an arm)
#                   on the same N images as the strongest-* records (start and post evaluated there, as
#                   strongest.py's part A on its state files, where those records are missing)
# The lent machines have their own CUDA torch and no internet: put meansparse's src and the pure-Python
# dependencies on PYTHONPATH and point MEANSPARSE_CIFAR10_JPG at a copy of the CIFAR-10 archive, e.g.
#   export PYTHONPATH=$PWD/src:$PWD/.devdata/site MEANSPARSE_CIFAR10_JPG=$PWD/.devdata/cifar10-jpg.tar.gz
set -uo pipefail
OUT=${1:?usage: gpu_round.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
SCALE=${STEP_LIMIT_SCALE:-1}
STEPS=${STEPS:-strongest-relu strongest-gelu arms ablations}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
if [ -n "${QUICK:-}" ]; then  # tables into OUT, not over the committed ones
  N=${N:-4}; BS=4; ABL=(a1 --n 4 --steps 2 --queries 10 --out "$OUT/ablations"); SOUT=(--out "$OUT/strongest")
  AOUT=(--strongest "$OUT/strongest" --out "$OUT/arms")
else
  N=${N:-1000}; BS=500; ABL=(per-layer a10 a1 a3 a4 a5 a6 a7 a2 a8 a9 --n 1000 --steps 20); SOUT=(); AOUT=()
fi
step() {  # name, limit s, command...: output to OUT/name.txt; a failing or timed-out step does not stop the round
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  echo "== $name (limit $((limit * SCALE)) s): $*"
  local start=$SECONDS
  timeout "$((limit * SCALE))" "$@" > "$OUT/$name.txt" 2>&1 || echo "   failed or timed out (see $OUT/$name.txt)"
  echo "   $((SECONDS - start)) s"
  tail -n 12 "$OUT/$name.txt"
}
selected() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for key in relu gelu; do
  S=(experiments/strongest.py --models "$key-pgd" --alphas 0.35,0.2,0 --n "$N" "${SOUT[@]}")
  step "strongest-$key" "$([ $key = relu ] && echo 300 || echo 240)" "$PY" "${S[@]}" --batch-size "$BS" --device "$DEVICE"
  selected "strongest-$key" && "$PY" "${S[@]}" --partial > "$OUT/strongest-$key-partial.txt" 2>&1  # unfinished too
done
step arms 300 "$PY" experiments/arms_eval.py "${ARMS_ROOT:-checkpoints/finetune-arms}" --n "$N" --batch-size "$BS" \
  --device "$DEVICE" "${AOUT[@]}"
step ablations 300 "$PY" experiments/ablations.py "${ABL[@]}" --batch-size "$BS" --device "$DEVICE"
# what comes back (at most 8 files, 2 folders down): the resumable states and every table in two archives
tar -czf "$OUT/states.tar.gz" "${MEANSPARSE_EXPERIMENT_STATE:-experiments/results/cache/state}" 2>/dev/null
if [ -n "${QUICK:-}" ]; then tar -czf "$OUT/tables.tar.gz" -C "$OUT" strongest arms ablations 2>/dev/null
else tar -czf "$OUT/tables.tar.gz" experiments/results/strongest experiments/results/finetune-arms experiments/results/a*-* \
  experiments/results/per-layer-alpha 2>/dev/null; fi
ls -la "$OUT"
