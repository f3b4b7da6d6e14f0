#!/usr/bin/env bash
# STORN on JSB Chorales (Bernoulli emission, backward encoder, Pyro's DMM-style regularisation),
# plain guide then IAF x2, each resumable: rerun this script to continue (a larger EPOCHS extends).
# Usage: examples/jsb_chorales.sh [DATA] [RUNS_DIR]; one process, one thread.
set -euo pipefail
DATA=${1:-../shared/data/jsb_chorales/jsb_chorales.pickle}
RUNS=${2:-runs/jsb}
EPOCHS=${EPOCHS:-1500}
SEEDS=${SEEDS:-0}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
COMMON=(--data "$DATA" --emission bernoulli --encoder backward --latent-dim 32 --hidden-dim 128
        --batch-size 20 --lr 1e-3 --lr-decay 0.999 --weight-decay 0.1 --kl-anneal-epochs 100
        --metrics-every 10 --checkpoint-every 10 --epochs "$EPOCHS" --quiet)
for seed in $SEEDS; do
  for guide in "none 0" "iaf 2"; do
    set -- $guide
    out="$RUNS/${1}_K${2}_seed${seed}"
    resume=(); [[ -f "$out/checkpoint.pt" ]] && resume=(--resume)
    "$PY" -m pyro_storn.cli train --out "$out" --flow "$1" --flow-length "$2" --seed "$seed" \
      "${COMMON[@]}" "${resume[@]}"
    "$PY" -m pyro_storn.cli evaluate "$out" --samples 100
  done
done
