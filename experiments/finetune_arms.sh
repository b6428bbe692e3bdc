#!/usr/bin/env bash
# Issue #24 item 4: does MeanSparse in the training loop help, measured honestly?  For each reference PGD model
# (ReLU, GELU) three fine-tuning arms from the same checkpoint with the same epochs, attack, LR schedule, seed
# and data order: the matched control (no operators), MeanSparse in the loop (straight-through inner attack),
# and MeanSparse with the exact inner gradient (the masking arm).  Each arm is then evaluated with the default
# worst case on the test split; the MeanSparse arm also at α = 0 (the fine-tuned weights without the band),
# and the control gets post-training MeanSparse (sweep), the baseline the in-loop arm must beat.
#   bash experiments/finetune_arms.sh OUT                 # GPU: DEVICE=cuda (default when available)
#   EPOCHS=5 ALPHA=0.3 WARMUP=2 N=1000 ACTS="relu gelu" bash experiments/finetune_arms.sh OUT
# Every command resumes when rerun (run folders and evaluation states under OUT).
set -euo pipefail
OUT=${1:?usage: finetune_arms.sh OUT_DIR}
EPOCHS=${EPOCHS:-5}; ALPHA=${ALPHA:-0.3}; WARMUP=${WARMUP:-2}; N=${N:-1000}; SEED=${SEED:-0}
ACTS=${ACTS:-relu gelu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
cd "$(dirname "$0")/.."
ms() { "$PY" -m meansparse.cli "$@"; }
for act in $ACTS; do
  ck=checkpoints/cifar10-resnet18-$act-pgd
  common=(--model "$ck" --data cifar10-jpg --epochs "$EPOCHS" --seed "$SEED")
  ms finetune "${common[@]}" --out "$OUT/runs/$act-control"
  ms finetune "${common[@]}" --meansparse "$ALPHA" --alpha-schedule "linear:$WARMUP" --out "$OUT/runs/$act-ms"
  ms finetune "${common[@]}" --meansparse "$ALPHA" --alpha-schedule "linear:$WARMUP" --inner-gradient exact \
    --out "$OUT/runs/$act-ms-exact"
  for arm in control ms ms-exact; do
    ms evaluate --checkpoint "$OUT/runs/$act-$arm/best" --data cifar10-jpg --n-examples "$N" --seed "$SEED" \
      --device "$DEVICE" --out "$OUT/eval/$act-$arm"
  done
  ms evaluate --checkpoint "$OUT/runs/$act-ms/best" --alpha 0 --data cifar10-jpg --n-examples "$N" \
    --seed "$SEED" --device "$DEVICE" --out "$OUT/eval/$act-ms-alpha0"
  ms sweep --model "$OUT/runs/$act-control/best" --data cifar10-jpg --device "$DEVICE" \
    --out "$OUT/sweep/$act-control"
done
