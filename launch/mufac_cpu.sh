#!/usr/bin/env bash
# The study on real MUFAC faces on CPU (README "MUFAC on CPU"): a small ViT from scratch at
# reduced resolution (configs/mufac.py:profile=cpu), pretrain, retrain and every row of the paper's
# table (meta_unlearn, support_ascent, ssd, lipschitz, pgu, scrub, bad_teacher) for N = 5 and 10
# and seeds 0-2, then one table: mean ± std [95% interval] over seeds, and every method paired with
# the pretrained model of its own split.
#
#   ./launch/mufac_cpu.sh                     # data in ../shared/data (the MUFAC layout)
#   DATA_DIR=/path/to/data NS="5" SEEDS="0" ./launch/mufac_cpu.sh --config.train.epochs=5
#
# Extra arguments go to every oneshui_jax.main call. Finished stages are reused on a rerun.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA_DIR="${DATA_DIR:-../shared/data}"
OUT="${OUT:-workdir/mufac_cpu}"
results=()
for n in ${NS:-5 10}; do
  for seed in ${SEEDS:-0 1 2}; do
    run="$OUT/N${n}_seed${seed}"
    python -m oneshui_jax.main --config="configs/mufac.py:N=${n},profile=cpu" \
      --config.seed="$seed" --config.data.data_dir="$DATA_DIR" --config.workdir="$run" "$@"
    results+=("$run/results.json")
  done
done
python -m oneshui_jax.report --out "$OUT" "${results[@]}"
