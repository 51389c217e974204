#!/usr/bin/env bash
# Every GPU check, in sections that fit the 10-minute limit of one device call (README
# "Benchmarks"). On the GPU machine, with .device/torch_reference_style.py copied from
# ../shared/anchors and carried:
#   bash bench/gpu_check.sh train     # timm fixture + parity, anchor, train-step throughput (~3 min)
#   bash bench/gpu_check.sh meta      # MetaUnlearn meta-step vs the anchor, request latency (~5 min)
#   bash bench/gpu_check.sh train meta
# Writes JSON under $OUT (or bench_out/) and prints short tables.
set -uo pipefail
OUT="${OUT:-bench_out}"
SECTIONS=("${@:-train}")
mkdir -p "$OUT/fixtures"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ANCHOR=.device/torch_reference_style.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, timm, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'timm', timm.__version__, 'torch', torch.__version__)"
for section in "${SECTIONS[@]}"; do
  case "$section" in
    train)
      echo "== timm fixture"; python3 tools/make_timm_fixture.py --out "$OUT/fixtures"
      echo "== timm parity"
      python3 tools/check_timm_parity.py --fixture_dir "$OUT/fixtures" | tee "$OUT/timm_parity.json"
      echo "== anchor (PyTorch reference style)"
      if [ -f "$ANCHOR" ]; then timeout 240 python3 "$ANCHOR" | tee "$OUT/anchor.json"; fi
      echo "== ours: ViT-B/16 train step (xla and cudnn attention)"
      timeout 300 python3 bench/attention_variants.py --batches 128 \
        --out "$OUT/attention_variants.json"
      ;;
    meta)
      echo "== ours: MetaUnlearn meta-step (streamed vs naive) and request latency, vs the anchor"
      ANCHOR_ARGS=()
      if [ -f "$ANCHOR" ]; then ANCHOR_ARGS=(--anchor "$ANCHOR"); fi
      timeout 480 python3 bench/meta_step.py --model vit_base_patch16_224 --timeout 460 \
        ${ANCHOR_ARGS[@]+"${ANCHOR_ARGS[@]}"} --out "$OUT/meta_step.json"
      ;;
    *) echo "unknown section $section (expected train, meta)"; exit 2 ;;
  esac
done
