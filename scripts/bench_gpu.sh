#!/usr/bin/env bash
# GPU numbers for the README's performance section (never needed for CI). One prepared run:
#   bash scripts/bench_gpu.sh                    # results in runs/bench_gpu/<date>/
# For each student (MobileNetV2, ResNet-18) with a random-weight RN50-architecture CLIP teacher at 224 px,
# batch 256 per GPU, bf16 autocast, channels_last, without and with torch.compile: the live teacher vs the
# teacher-embedding cache, alternating in one process (python -m lgd.bench --compare). With more than one
# GPU the same again under NCCL DDP on all of them. Then the LGKA hot path and the data loader, and a
# Markdown table (summary.md) to paste into the README next to the CPU figures.
# Environment: OUT (results folder), BATCH (per GPU, 256), STEPS (20), WARMUP (5; compile happens here),
# ARCHS ("mobilenet_v2 resnet18"), RUN_TIMEOUT (seconds per run, 420).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/bench_gpu/$(date -u +%Y%m%d-%H%M%S)}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
ARCHS=${ARCHS:-"mobilenet_v2 resnet18"}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
if ! NGPU=$(python -c "import torch; print(torch.cuda.device_count())"); then
  echo "error: python with torch is needed (pip install -e . from the repository)" >&2
  exit 2
fi
if [[ "$NGPU" -lt 1 ]]; then
  echo "error: no CUDA GPU visible; this script only measures GPUs (CPU: python -m lgd.bench --help)" >&2
  exit 2
fi
mkdir -p "$OUT"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/machine.txt"

FAILED=()
run() {  # run NAME CMD...: one bench run, its log kept; a failure does not stop the others
  local name=$1
  shift
  echo "== $name: $*"
  if ! timeout "$RUN_TIMEOUT" "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"; then
    FAILED+=("$name")
  fi
}

STEP=(--mode step --device cuda --teacher random:RN50 --image-size 224 --amp bf16 --channels-last
      --steps "$STEPS" --warmup "$WARMUP" --compare cached=false cached=true)
for arch in $ARCHS; do
  for compile in no-compile compile; do
    run "step-1gpu-$arch-$compile" python -m lgd.bench "${STEP[@]}" --arch "$arch" --"$compile" --batch-size "$BATCH"
  done
done
if [[ "$NGPU" -gt 1 ]]; then
  for arch in $ARCHS; do
    for compile in no-compile compile; do
      run "step-ddp${NGPU}-$arch-$compile" torchrun --standalone --nproc_per_node "$NGPU" -m lgd.bench "${STEP[@]}" \
        --arch "$arch" --"$compile" --batch-size $((BATCH * NGPU))
    done
  done
fi
run hot-cuda python -m lgd.bench --mode hot --device cuda
run loader python -m lgd.bench --mode loader --images 1024 --workers 1 4 8 --batch-size 64 --steps 40

if ! python -m lgd.bench --mode summary "$OUT"/step-*.json | tee "$OUT/summary.md"; then
  FAILED+=(summary)
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "failed runs (see their .log): ${FAILED[*]}" >&2
  exit 1
fi
echo "all results in $OUT"
