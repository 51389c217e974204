#!/usr/bin/env bash
# Every GPU check of issue 18 in ONE device call (README "Benchmarks"). The device tool allows 10
# minutes a command; the timeouts below (jax check 30 s, the sections of "all", the summary) sum
# to 560 s (9.3 min), leaving the rest for nvidia-smi, the shell and the transfers.
#
#   bash bench/gpu_check.sh                  # all: anchor train meta request profile, summary
#   bash bench/gpu_check.sh train meta       # a subset (the summary always runs last)
#   GPU_CHECK_SMALL=1 bash bench/gpu_check.sh   # tiny model and shapes: a CPU dry run of the
#                                               # flow (summary: $OUT/gpu_dry_run.json only)
#
# Sections (timeout; what they write under $OUT, default bench_out/):
#   anchor   (90 s)  the PyTorch reference-style anchor: train images/s at batch 128, bf16; one
#                    MetaUnlearn meta-step (s, peak GiB)                         -> anchor.json
#   train    (100 s) ours: ViT-B/16 train step, bf16, batch 128, xla and cudnn attention
#                    (bench/attention_variants.py)                             -> attention_variants.json
#   meta     (150 s) ours: the streamed meta-step at the anchor's shapes (bench/meta_step.py
#                    --variants streamed; the naive variant, ~140 s of compilation on an H100, is
#                    left out: run it alone)                                   -> meta_step.json
#   request  (70 s)  ours: a served 20-portrait MetaUnlearn request, p50/p95 after compilation,
#                    the host-to-device copy and the device digest apart
#                    (bench/request_latency.py)                                -> request_latency.json
#   profile  (100 s) top XLA ops by self time of the train step (cudnn, batch 128) and of the
#                    meta-step (bench/profile_ops.py; traces in /tmp)          -> profile.md, profile.json
#   parity   (150 s) timm fixture + parity, not in "all" (it checks numbers, not speed): float32
#                    parity, timm's init statistics beside ours, and timm under bf16 autocast
#                    (its dtypes, our bf16 forward's differences)              -> timm_parity.json
#   ties     (60 s)  torch.mode's rule for a tied boolean vote (RMIA) on CPU and CUDA, not in
#                    "all" (tools/check_torch_mode_ties.py)                    -> torch_mode_ties.json
#   ensemble (120 s) K = 1, 4, 8, 16 members of the SynthFaces demo ViT trained in one compiled
#                    program (bench/ensemble.py; target: K = 16 at >= 8x one model's images/s),
#                    not in "all"                                              -> ensemble.json
#   summary  (20 s)  bench/gpu_summary.py: ratios vs targets -> bench/results/gpu_<date>.json and
#                    $OUT/gpu_<date>.json
# The whole output also goes to $OUT/gpu_check.log. At most 8 files come back from $OUT: "all"
# writes 8 (parity is then left out: run it in a call of its own).
#
# The anchor is found at $ANCHOR, else .device/torch_reference_style.py, else
# ../shared/anchors/torch_reference_style.py. ../shared does not travel to the device machine: copy
# the anchor into .device/ (ignored by git) and carry it:
#   mkdir -p .device && cp ../shared/anchors/torch_reference_style.py .device/
#   device run: command "bash bench/gpu_check.sh", carry [".device"], timeout_s 600
# A persistent compilation cache, fresh for each run (JAX_COMPILATION_CACHE_DIR), lets the profile
# reuse the train and meta steps the earlier sections compiled; their compile_s are first compiles.
set -uo pipefail
OUT="${OUT:-bench_out}"
export OUT
mkdir -p "$OUT"
SECTIONS=("$@")
if [ ${#SECTIONS[@]} -eq 0 ] || [ "${SECTIONS[*]}" = "all" ]; then
  SECTIONS=(anchor train meta request profile)
fi
for section in "${SECTIONS[@]}"; do
  case "$section" in
    anchor|train|meta|request|profile|parity|ties|ensemble) ;;
    *) echo "unknown section $section (expected anchor, train, meta, request, profile, parity," \
            "ties, ensemble or all)"
       exit 2 ;;
  esac
done
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d /tmp/oneshui_jax_cache.XXXXXX)}"
if [ -z "${ANCHOR:-}" ]; then
  ANCHOR=.device/torch_reference_style.py
  [ -f "$ANCHOR" ] || ANCHOR=../shared/anchors/torch_reference_style.py
fi
if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then  # tiny shapes: the anchor's ANCHOR_SMALL ones
  export ANCHOR_SMALL=1
  MODEL=vit_tiny_test DTYPE=float32 TRAIN_BATCH=8 TRAIN_STEPS=2
  META=(--support 4 --outer_batches 2 --batch 8 --steps 1 --requests 3)
  REQUEST=(--portraits 4 --requests 20 --sha_requests 0)
  PROFILE=(--support 4 --outer_batches 2 --meta_batch 8 --batch 8)
  ENSEMBLE=(--model vit_tiny_test --members 1,2 --batch 8 --steps 1)
  SUMMARY=(--out "$OUT/gpu_dry_run.json" --no_copy)  # not a GPU result: not in bench/results
else
  MODEL=vit_base_patch16_224 DTYPE=bfloat16 TRAIN_BATCH=128 TRAIN_STEPS=20
  META=(--steps 3 --requests 50)
  REQUEST=(--portraits 20 --requests 50)
  PROFILE=(--batch 128)
  ENSEMBLE=(--model vit_small_demo --members 1,4,8,16 --batch 64 --steps 10)
  SUMMARY=()
fi
echo "== $(date -u +%FT%TZ) sections: ${SECTIONS[*]}; model $MODEL, $DTYPE; out $OUT; anchor $ANCHOR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "(no nvidia-smi)"
timeout 30 python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
anchor() {
  echo "== anchor (PyTorch reference style, $ANCHOR)"
  if [ ! -f "$ANCHOR" ]; then
    echo "no anchor at $ANCHOR: skipped (copy ../shared/anchors/torch_reference_style.py to .device/)"
    return 1
  fi
  timeout 90 python3 "$ANCHOR" > "$OUT/anchor.json"
  local rc=$?
  cat "$OUT/anchor.json"
  return $rc
}
train() {
  echo "== ours: $MODEL train step, $DTYPE, batch $TRAIN_BATCH (xla and cudnn attention)"
  timeout 100 python3 bench/attention_variants.py --model "$MODEL" --dtype "$DTYPE" \
    --batches "$TRAIN_BATCH" --steps "$TRAIN_STEPS" --out "$OUT/attention_variants.json"
}
meta() {
  echo "== ours: MetaUnlearn meta-step (streamed)"
  timeout 150 python3 bench/meta_step.py --model "$MODEL" --dtype "$DTYPE" \
    --variants streamed --timeout 140 "${META[@]}" --out "$OUT/meta_step.json"
}
request() {
  echo "== ours: a served MetaUnlearn request (p50/p95, copy, digest)"
  timeout 70 python3 bench/request_latency.py --model "$MODEL" "${REQUEST[@]}" \
    --out "$OUT/request_latency.json"
}
profile() {
  echo "== profile: top XLA ops of the train step (cudnn attention on GPUs) and the meta-step"
  timeout 100 python3 bench/profile_ops.py --steps train,meta --model "$MODEL" \
    --dtype "$DTYPE" --attention auto "${PROFILE[@]}" --iters 3 \
    --trace_dir "$(mktemp -d /tmp/oneshui_profile.XXXXXX)" --out "$OUT/profile"
}
parity() {
  echo "== timm fixture and parity"
  local fixtures
  fixtures="$(mktemp -d /tmp/oneshui_timm.XXXXXX)"
  timeout 150 bash -c "python3 tools/make_timm_fixture.py --out '$fixtures' && \
    python3 tools/check_timm_parity.py --fixture_dir '$fixtures' --init --autocast \
      > '$OUT/timm_parity.json'"
  local rc=$?
  cat "$OUT/timm_parity.json" 2>/dev/null
  return $rc
}
ties() {
  echo "== torch.mode on a tied boolean vote (CPU and CUDA)"
  timeout 60 python3 tools/check_torch_mode_ties.py > "$OUT/torch_mode_ties.json"
  local rc=$?
  cat "$OUT/torch_mode_ties.json"
  return $rc
}
ensemble() {
  echo "== ensembles: K members in one compiled program vs one model"
  timeout 120 python3 bench/ensemble.py "${ENSEMBLE[@]}" --out "$OUT/ensemble.json"
}
for section in "${SECTIONS[@]}"; do
  start=$SECONDS
  "$section"
  echo "== $section: exit status $? (124 = timed out), $((SECONDS - start)) s"
done
echo "== summary"
timeout 20 python3 bench/gpu_summary.py --dir "$OUT" ${SUMMARY[@]+"${SUMMARY[@]}"}
exec 1>&- 2>&-
wait "$TEE_PID"
