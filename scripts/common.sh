# Shared by the launchers in scripts/ (sourced, not run). The launchers stay in the directory they were started
# from, so every relative path (environment, arguments, config values) counts from there; only the built-in
# toy-world defaults and CONFIG=configs/... are found in this repository ($REPO) wherever you are.

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lgd, installed or not
TOY_RUN="$REPO/runs/toyworld/checkpoint_last.pth"

# require_toy_run WHAT: the no-argument default evaluates the toy-world run; say how to make it if missing.
require_toy_run() {
  if [[ ! -f "$TOY_RUN" ]]; then
    echo "error: no arguments given, so this $1 the toy-world run $TOY_RUN, which does not exist yet;" >&2
    echo "       train it first with \`bash scripts/train.sh\` (a few minutes on CPU)," >&2
    echo "       or set CHECKPOINT=... DATA=... for your own checkpoint and dataset" >&2
    exit 2
  fi
}

# has_flag FLAG... -- ARGS...: whether ARGS hold one of the FLAGs (as `--flag value` or `--flag=value`).
has_flag() {
  local flags=() arg flag
  while [[ $# -gt 0 && "$1" != -- ]]; do flags+=("$1"); shift; done
  shift
  for arg in "$@"; do
    for flag in "${flags[@]}"; do
      [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0
    done
  done
  return 1
}

# config_path PATH: PATH as given if it exists here (or is absolute), else the repository's (configs/...).
config_path() {
  if [[ "$1" != /* && ! -e "$1" && -e "$REPO/$1" ]]; then
    printf '%s\n' "$REPO/$1"
  else
    printf '%s\n' "$1"
  fi
}

# launch MODULE ARGS...: plain python for one process, torchrun otherwise.
# Reads NPROC (default: the GPUs present, or 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
launch() {
  local module=$1
  shift
  if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
  fi
  local nnodes=${NNODES:-1}
  if [[ "$NPROC" == 1 && "$nnodes" == 1 ]]; then
    exec python -m "$module" "$@"
  fi
  if [[ "$nnodes" == 1 && -z "${MASTER_PORT:-}" ]]; then
    exec torchrun --standalone --nproc_per_node "$NPROC" -m "$module" "$@"  # a free port: jobs can share a node
  fi
  if [[ "$nnodes" != 1 && ( -z "${MASTER_ADDR:-}" || -z "${NODE_RANK:-}" ) ]]; then
    echo "error: NNODES=$nnodes needs MASTER_ADDR (the address of node 0) and NODE_RANK (0..$((nnodes - 1))) on every node" >&2
    exit 2
  fi
  exec torchrun --nproc_per_node "$NPROC" --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m "$module" "$@"
}
