#!/usr/bin/env bash
# Linear-probe launcher (a thin torchrun wrapper around `python -m lgd.lincls`).
#   bash scripts/lincls.sh          # the built-in toy world: probes runs/toyworld/checkpoint_last.pth
#   CHECKPOINT=runs/lgd/checkpoint_last.pth DATA=/data/imagenet NPROC=8 bash scripts/lincls.sh --train-fraction 0.01
# Environment: CHECKPOINT, DATA, CONFIG (default configs/lincls_imagenet.yaml), OUTPUT, NPROC (processes,
# default: GPUs or 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (as for train.sh).
# Extra arguments go to lgd.lincls (e.g. --cached-features, --resume auto). Relative paths count from the
# current directory.
set -euo pipefail
REPO=$(CDPATH= cd -- "$(dirname -- "$0")/.." >/dev/null && pwd)
source "$REPO/scripts/common.sh"

ARGS=()
if [[ $# -eq 0 && -z "${CHECKPOINT:-}${DATA:-}${CONFIG:-}" ]]; then
  CONFIG=configs/lincls_toyworld.yaml
  require_toy_run probes
  echo "No arguments given: linear probe of the built-in toy-world run $TOY_RUN ($CONFIG)."
  CHECKPOINT=$TOY_RUN
  OUTPUT=${OUTPUT:-$REPO/runs/toyworld/lincls}
fi
ARGS+=(--config "$(config_path "${CONFIG:-configs/lincls_imagenet.yaml}")")
[[ -n "${CHECKPOINT:-}" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
[[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && ARGS+=(--output "$OUTPUT")

launch lgd.lincls "${ARGS[@]}" "$@"
