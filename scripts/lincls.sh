#!/usr/bin/env bash
# Linear-probe launcher (a thin torchrun wrapper around `python -m lgd.lincls`).
#   bash scripts/lincls.sh          # the built-in toy world: probes runs/toyworld/checkpoint_last.pth
#   CHECKPOINT=runs/lgd/checkpoint_last.pth DATA=/data/imagenet NPROC=8 bash scripts/lincls.sh --train-fraction 0.01
# Environment: CHECKPOINT, DATA, CONFIG (default configs/lincls_imagenet.yaml), OUTPUT, NPROC (processes,
# default: GPUs or 1), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29501).
# Extra arguments go to lgd.lincls (e.g. --cached-features, --resume auto).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -eq 0 && -z "${CHECKPOINT:-}${DATA:-}${CONFIG:-}" ]]; then
  CONFIG=configs/lincls_toyworld.yaml
  TOY=runs/toyworld/checkpoint_last.pth
  if [[ ! -f "$TOY" ]]; then
    echo "error: no arguments given, so this probes the toy-world run $TOY, which does not exist yet;" >&2
    echo "       train it first with \`bash scripts/train.sh\` (a few minutes on CPU)," >&2
    echo "       or set CHECKPOINT=... DATA=... for your own checkpoint and dataset" >&2
    exit 2
  fi
  echo "No arguments given: linear probe of the built-in toy-world run $TOY ($CONFIG)."
fi
ARGS=(--config "${CONFIG:-configs/lincls_imagenet.yaml}")
[[ -n "${CHECKPOINT:-}" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
[[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && ARGS+=(--output "$OUTPUT")

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NNODES=${NNODES:-1}
if [[ "$NPROC" == 1 && "$NNODES" == 1 ]]; then
  exec python -m lgd.lincls "${ARGS[@]}" "$@"
fi
exec torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29501}" \
  -m lgd.lincls "${ARGS[@]}" "$@"
