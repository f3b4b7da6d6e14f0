#!/usr/bin/env bash
# STORN on JSB Chorales: Bernoulli emission, backward encoder, the MLP emission of [h_t, z_t];
# for each seed the plain guide and each flow guide, each resumable (rerun this script to continue;
# a larger EPOCHS extends), evaluated at the best-validation checkpoint (-IWAE and k̂ with S = SAMPLES), then
# the page docs/storn_jsb_chorales.md (python -m pyro_storn.jsb_table) over every run in RUNS_DIR.
# Usage: examples/jsb_chorales.sh [DATA] [RUNS_DIR]; one process, one thread. Environment:
# EPOCHS (700), SEEDS ("0"), GUIDES ("none:0 iaf:2"), EMISSION_HIDDEN (256; 0 is STORN's linear
# emission), WEIGHT_DECAY (0.01), PRIOR (standard; learned is the VRNN's), DROPOUT (0),
# ENCODER (backward), OBJECTIVE (elbo; iwae trains on the IWAE bound of PARTICLES samples, 5),
# SAMPLES (100), LATENT_DIM (32), HIDDEN_DIM (128: the GRUs' width), PAGE (docs/storn_jsb_chorales.md; empty: no page), ARCHIVE (docs/storn_jsb_chorales_runs: each
# run's config, evaluation and metrics, copied for git so the page outlives the run directories).
set -euo pipefail
DATA=${1:-../shared/data/jsb_chorales/jsb_chorales.pickle}
RUNS=${2:-runs/jsb}
EPOCHS=${EPOCHS:-700}
SEEDS=${SEEDS:-0}
GUIDES=${GUIDES:-"none:0 iaf:2"}
EMISSION_HIDDEN=${EMISSION_HIDDEN:-256}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}
PRIOR=${PRIOR:-standard}
DROPOUT=${DROPOUT:-0}
ENCODER=${ENCODER:-backward}
OBJECTIVE=${OBJECTIVE:-elbo}
PARTICLES=${PARTICLES:-5}
LATENT_DIM=${LATENT_DIM:-32}
HIDDEN_DIM=${HIDDEN_DIM:-128}
SAMPLES=${SAMPLES:-100}
PAGE=${PAGE-docs/storn_jsb_chorales.md}
ARCHIVE=${ARCHIVE:-docs/storn_jsb_chorales_runs}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
COMMON=(--data "$DATA" --emission bernoulli --encoder "$ENCODER" --emission-hidden "$EMISSION_HIDDEN"
        --latent-dim "$LATENT_DIM" --hidden-dim "$HIDDEN_DIM" --batch-size 20 --lr 1e-3 --lr-decay 0.999
        --weight-decay "$WEIGHT_DECAY" --prior "$PRIOR" --dropout "$DROPOUT" --kl-anneal-epochs 100 --metrics-every 10
        --checkpoint-every 10 --epochs "$EPOCHS" --quiet)
[[ "$OBJECTIVE" == iwae ]] && COMMON+=(--objective iwae --num-particles "$PARTICLES")
for seed in $SEEDS; do
  for guide in $GUIDES; do
    flow=${guide%%:*} length=${guide##*:}
    # the defaults add nothing to the name, so earlier runs keep theirs
    extra=""; [[ "$PRIOR" != standard ]] && extra+="_prior${PRIOR}"
    [[ "$DROPOUT" != 0 ]] && extra+="_drop${DROPOUT}"
    [[ "$OBJECTIVE" == iwae ]] && extra+="_iwae${PARTICLES}"
    [[ "$ENCODER" != backward ]] && extra+="_enc${ENCODER}"
    [[ "$LATENT_DIM" != 32 || "$HIDDEN_DIM" != 128 ]] && extra+="_z${LATENT_DIM}_h${HIDDEN_DIM}"
    out="$RUNS/${flow}_K${length}_mlp${EMISSION_HIDDEN}_wd${WEIGHT_DECAY}${extra}_seed${seed}"
    resume=(); [[ -f "$out/checkpoint.pt" ]] && resume=(--resume)
    "$PY" -m pyro_storn.cli train --out "$out" --flow "$flow" --flow-length "$length" \
      --seed "$seed" "${COMMON[@]}" "${resume[@]}"
    "$PY" -m pyro_storn.cli evaluate "$out" --samples "$SAMPLES" --psis-samples "$SAMPLES"
  done
done
if [[ -n "$PAGE" ]]; then
  "$PY" -m pyro_storn.jsb_table "$RUNS"/*/ --out "$PAGE" --archive "$ARCHIVE" \
    --command "EPOCHS=$EPOCHS SEEDS='$SEEDS' GUIDES='$GUIDES' EMISSION_HIDDEN=$EMISSION_HIDDEN WEIGHT_DECAY=$WEIGHT_DECAY PRIOR=$PRIOR DROPOUT=$DROPOUT ENCODER=$ENCODER OBJECTIVE=$OBJECTIVE PARTICLES=$PARTICLES SAMPLES=$SAMPLES LATENT_DIM=$LATENT_DIM HIDDEN_DIM=$HIDDEN_DIM examples/jsb_chorales.sh $DATA $RUNS"
fi
