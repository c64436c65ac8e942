#!/usr/bin/env bash
# LGD pre-training launcher (a thin torchrun wrapper).
#   bash scripts/train.sh                                   # the built-in toy world, CPU, minutes
#   DATA=/data/imagenet CONFIG=configs/lgd_r18_in-img_in-text_200ep.yaml NPROC=8 bash scripts/train.sh
# Environment: NPROC (processes per node, default: GPUs or 1), NNODES (1), NODE_RANK and MASTER_ADDR (needed
# with NNODES > 1), MASTER_PORT (default: a free port on one node, 29500 across nodes), CONFIG, DATA, OUTPUT.
# Extra args go to lgd.train. Relative paths count from the current directory.
set -euo pipefail
REPO=$(CDPATH= cd -- "$(dirname -- "$0")/.." >/dev/null && pwd)
source "$REPO/scripts/common.sh"

ARGS=()
if [[ -z "${DATA:-}" && -z "${CONFIG:-}" ]] && ! has_flag --data --config -- "$@"; then
  CONFIG=$REPO/configs/toyworld.yaml
  echo "No DATA given: running the built-in toy world ($CONFIG). Set DATA=/path/to/imagenet for real runs."
  ARGS+=(--output "${OUTPUT:-$REPO/runs/toyworld}")
elif [[ -n "${OUTPUT:-}" ]]; then
  ARGS+=(--output "$OUTPUT")
fi
[[ -n "${CONFIG:-}" ]] && ARGS+=(--config "$(config_path "$CONFIG")")
[[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")

launch lgd.train "${ARGS[@]}" "$@"
