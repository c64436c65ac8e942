#!/usr/bin/env bash
# Zero-shot launcher (`python -m lgd.zscls`, one process).
#   bash scripts/zscls.sh           # the built-in toy world: evaluates runs/toyworld/checkpoint_last.pth on its val/
#   CHECKPOINT=runs/lgd/checkpoint_last.pth DATA=/data/imagenet bash scripts/zscls.sh --text imagenet
#   CHECKPOINT=runs/lgd/checkpoint_last.pth DATA=/data/caltech256 bash scripts/zscls.sh --text caltech256
# Environment: CHECKPOINT, DATA (a root holding val/; add --split '' to evaluate the folder itself), OUTPUT.
# Extra arguments go to lgd.zscls (e.g. --text, --templates, --no-teacher). Relative paths count from the
# current directory.
set -euo pipefail
REPO=$(CDPATH= cd -- "$(dirname -- "$0")/.." >/dev/null && pwd)
source "$REPO/scripts/common.sh"

ARGS=()
if [[ $# -eq 0 && -z "${CHECKPOINT:-}${DATA:-}" ]]; then
  require_toy_run evaluates
  echo "No arguments given: zero-shot evaluation of the built-in toy-world run $TOY_RUN on the toy world's val/."
  ARGS+=(--checkpoint "$TOY_RUN" --data toy --output "${OUTPUT:-$REPO/runs/toyworld/zscls}")
else
  [[ -n "${CHECKPOINT:-}" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
  [[ -n "${DATA:-}" ]] && ARGS+=(--data "$DATA")
  [[ -n "${OUTPUT:-}" ]] && ARGS+=(--output "$OUTPUT")
fi
exec python -m lgd.zscls "${ARGS[@]}" "$@"
