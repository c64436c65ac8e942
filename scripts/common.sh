# Shared by the launchers in scripts/ (sourced, not run).

TOY_RUN=runs/toyworld/checkpoint_last.pth

# require_toy_run WHAT: the no-argument default evaluates the toy-world run; say how to make it if missing.
require_toy_run() {
  if [[ ! -f "$TOY_RUN" ]]; then
    echo "error: no arguments given, so this $1 the toy-world run $TOY_RUN, which does not exist yet;" >&2
    echo "       train it first with \`bash scripts/train.sh\` (a few minutes on CPU)," >&2
    echo "       or set CHECKPOINT=... DATA=... for your own checkpoint and dataset" >&2
    exit 2
  fi
}

# from_caller VAR...: the launchers cd to the repository root, so a relative path in VAR is made absolute from
# the directory the command was typed in ($CALLER_DIR) when it exists there (OUTPUT: always); otherwise it stays
# relative to the repository (CONFIG=configs/... works from anywhere). 'toy' is a keyword, not a path.
from_caller() {
  local var value
  for var in "$@"; do
    value="${!var:-}"
    [[ -z "$value" || "$value" == /* || "$value" == toy ]] && continue
    if [[ -e "$CALLER_DIR/$value" || "$var" == OUTPUT ]]; then
      printf -v "$var" '%s' "$CALLER_DIR/$value"
    fi
  done
  return 0
}

# launch MODULE DEFAULT_PORT ARGS...: plain python for one process, torchrun otherwise.
# Reads NPROC (default: the GPUs present, or 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
launch() {
  local module=$1 port=$2
  shift 2
  if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
  fi
  local nnodes=${NNODES:-1}
  if [[ "$NPROC" == 1 && "$nnodes" == 1 ]]; then
    exec python -m "$module" "$@"
  fi
  exec torchrun --nproc_per_node "$NPROC" --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-$port}" -m "$module" "$@"
}
