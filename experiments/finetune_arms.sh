#!/usr/bin/env bash
# Issue #24 item 4: does MeanSparse in the training loop help, measured honestly?  For each reference PGD model
# (ReLU, GELU) fine-tuning arms from the same checkpoint with the same epochs, attack, LR schedule, seed and data
# order: the matched control (no operators), MeanSparse in the loop (straight-through inner attack), MeanSparse
# with the exact inner gradient (the masking arm) and, when asked, MeanSparse with the surrogate inner gradient
# (ms-surrogate: the inner attack back-propagates the soft threshold, as the evaluation's sg-* attacks).  Each arm
# is then evaluated with the default worst case on the test split (experiments/arms_eval.py: the same images as
# experiments/strongest.py's starting-checkpoint records, paired intervals against the control and the start);
# the MeanSparse arm also at α = 0 (the fine-tuned weights without the band), and the control gets post-training
# MeanSparse (sweep), the baseline the in-loop arm must beat.
#   bash experiments/finetune_arms.sh OUT                 # GPU: DEVICE=cuda (default when available)
#   EPOCHS=5 ALPHA=0.3 WARMUP=2 N=1000 ACTS="relu gelu" bash experiments/finetune_arms.sh OUT
#   STEP=train ARMS="control ms" ACTS=relu bash experiments/finetune_arms.sh OUT   # only train these arms (CPU)
#   STEP=eval bash experiments/finetune_arms.sh OUT                               # only evaluate them (GPU)
# ARMS: any of control ms ms-exact ms-surrogate (default: the first three); STEP: train, eval or all (default);
# THREADS: torch CPU threads of the fine-tuning runs (one per run when two run side by side on 2 cores).
# Every command resumes when rerun (run folders and evaluation states under OUT).
# python experiments/arms_curves.py OUT tabulates and plots the arms' held-out curves (finished or not).
set -euo pipefail
OUT=${1:?usage: finetune_arms.sh OUT_DIR}
EPOCHS=${EPOCHS:-5}; ALPHA=${ALPHA:-0.3}; WARMUP=${WARMUP:-2}; N=${N:-1000}; SEED=${SEED:-0}
ACTS=${ACTS:-relu gelu}; ARMS=${ARMS:-control ms ms-exact}; STEP=${STEP:-all}
case $STEP in train|eval|all) ;; *) echo "STEP must be train, eval or all, got '$STEP'" >&2; exit 2 ;; esac
for arm in $ARMS; do
  case $arm in control|ms|ms-exact|ms-surrogate) ;;
    *) echo "unknown arm '$arm': use control, ms, ms-exact or ms-surrogate" >&2; exit 2 ;; esac
done
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
cd "$(dirname "$0")/.."
ms() { "$PY" -m meansparse.cli "$@"; }
arm_args() {  # the fine-tuning options of one arm
  local band=(--meansparse "$ALPHA" --alpha-schedule "linear:$WARMUP")
  case $1 in
    control) ;;
    ms) echo "${band[@]}" ;;
    ms-exact) echo "${band[@]}" --inner-gradient exact ;;
    ms-surrogate) echo "${band[@]}" --inner-gradient surrogate ;;
  esac
}
for act in $ACTS; do
  ck=checkpoints/cifar10-resnet18-$act-pgd
  common=(--model "$ck" --data cifar10-jpg --epochs "$EPOCHS" --seed "$SEED")  # training uses cuda when there is one
  [ -n "${THREADS:-}" ] && common+=(--threads "$THREADS")
  for arm in $ARMS; do
    if [ "$STEP" != eval ]; then
      # shellcheck disable=SC2046  # arm_args is a list of plain words
      ms finetune "${common[@]}" $(arm_args "$arm") --out "$OUT/runs/$act-$arm"
    fi
  done
  [ "$STEP" = train ] && continue
  rows=$ARMS
  [[ " $ARMS " == *" ms "* ]] && rows="$rows ms-alpha0"
  # every arm on the same N test images as experiments/strongest.py's records of the starting checkpoint
  # (run strongest.py for the same N first), paired against the control and the start
  "$PY" experiments/arms_eval.py "$OUT" --acts "$act" --rows "${rows// /,}" --n "$N" --device "$DEVICE" \
    ${THREADS:+--threads "$THREADS"}
  if [[ " $ARMS " == *" control "* ]]; then
    ms sweep --model "$OUT/runs/$act-control/best" --data cifar10-jpg --device "$DEVICE" \
      --out "$OUT/sweep/$act-control"
  fi
done
