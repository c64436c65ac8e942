#!/usr/bin/env bash
# Linear-probe launcher (a thin torchrun wrapper around `python -m lgd.lincls`).
#   bash scripts/lincls.sh          # the built-in toy world: probes runs/toyworld/checkpoint_last.pth
#   CHECKPOINT=runs/lgd/checkpoint_last.pth DATA=/data/imagenet NPROC=8 bash scripts/lincls.sh --train-fraction 0.01
# Environment: CHECKPOINT, DATA, CONFIG (default configs/lincls_imagenet.yaml), OUTPUT, NPROC (processes,
# default: GPUs or 1), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29501).
# Extra arguments go to lgd.lincls (e.g. --cached-features, --resume auto).
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
source scripts/common.sh
from_caller CHECKPOINT DATA CONFIG OUTPUT

if [[ $# -eq 0 && -z "${CHECKPOINT:-}${DATA:-}${CONFIG:-}" ]]; then
  CONFIG=configs/lincls_toyworld.yaml
  require_toy_run probes
  echo "No arguments given: linear probe of the built-in toy-world run $TOY_RUN ($CONFIG)."
fi
ARGS=(--config "${CONFIG:-configs/lincls_imagenet.yaml}")
[[ -n "${CHECKPOINT:-}" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
[[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && ARGS+=(--output "$OUTPUT")

launch lgd.lincls 29501 "${ARGS[@]}" "$@"
