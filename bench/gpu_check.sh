#!/usr/bin/env bash
# One prepared run of every GPU check (see README "Benchmarks"). On the GPU machine:
#   bash bench/gpu_check.sh   (with .device/torch_reference_style.py copied from ../shared/anchors)
# Writes JSON under $OUT (or bench_out/) and prints a short table.
set -uo pipefail
OUT="${OUT:-bench_out}"
mkdir -p "$OUT/fixtures"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, timm, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'timm', timm.__version__, 'torch', torch.__version__)"
echo "== timm fixture"; python3 tools/make_timm_fixture.py --out "$OUT/fixtures"
echo "== timm parity"; python3 tools/check_timm_parity.py --fixture_dir "$OUT/fixtures" | tee "$OUT/timm_parity.json"
echo "== anchor (PyTorch reference style)"
if [ -f .device/torch_reference_style.py ]; then
  timeout 240 python3 .device/torch_reference_style.py | tee "$OUT/anchor.json"
fi
echo "== ours: ViT-B/16 train step (xla and cudnn attention)"
timeout 300 python3 bench/attention_variants.py --batches 128 --out "$OUT/attention_variants.json"
echo "== ours: MetaUnlearn meta-step (naive vs streamed meta-gradient) and request latency, vs the anchor"
ANCHOR_ARGS=()
if [ -f .device/torch_reference_style.py ]; then ANCHOR_ARGS=(--anchor .device/torch_reference_style.py); fi
timeout 300 python3 bench/meta_step.py --model vit_base_patch16_224 --timeout 280 \
  ${ANCHOR_ARGS[@]+"${ANCHOR_ARGS[@]}"} --out "$OUT/meta_step.json"
