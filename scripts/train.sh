#!/usr/bin/env bash
# LGD pre-training launcher (a thin torchrun wrapper).
#   bash scripts/train.sh                                   # the built-in toy world, CPU, minutes
#   DATA=/data/imagenet CONFIG=configs/lgd_r18_in-img_in-text_200ep.yaml NPROC=8 bash scripts/train.sh
# Environment: NPROC (processes per node, default: GPUs or 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), CONFIG, DATA, OUTPUT. Extra args go to lgd.train.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
source scripts/common.sh
from_caller DATA CONFIG OUTPUT

if [[ -z "${DATA:-}" && -z "${CONFIG:-}" ]]; then
  CONFIG=configs/toyworld.yaml
  echo "No DATA given: running the built-in toy world ($CONFIG). Set DATA=/path/to/imagenet for real runs."
fi
ARGS=()
[[ -n "${CONFIG:-}" ]] && ARGS+=(--config "$CONFIG")
[[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")
[[ -n "${OUTPUT:-}" ]] && ARGS+=(--output "$OUTPUT")

launch lgd.train 29500 "${ARGS[@]}" "$@"
