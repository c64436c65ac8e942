#!/usr/bin/env bash
# Shared body of mmdetection/run.sh and mmsegmentation/run.sh: convert an LGD checkpoint for an
# OpenMMLab backbone, verify it, then train with OpenMMLab's own launcher.
#
#   bash tools/mm-train.sh {mmdet|mmseg} DEFAULT_CONFIG [extra args for the package's tools/train.py]
#
# Environment: CKPT (required: LGD checkpoint or torchvision state_dict), CONFIG (default DEFAULT_CONFIG),
# GPUS (default 1), WORK_DIR (default work_dirs/<config name>). Everything runs under the `python` on PATH,
# the interpreter `mim train` launches training with.
#
# OpenMMLab's `Pretrained` init loads non-strictly: a checkpoint in the wrong layout would silently train
# from random weights. So the backbone arch is read from the config, CKPT is converted into the layout
# that backbone loads, and `python -m lgd.convert check` must pass before anything is launched: every tensor of
# the backbone that the installed OpenMMLab builds from the config present with its shape, nothing unexpected.
# The converted checkpoints stay in WORK_DIR (backbone_torchvision.pth, backbone_<layout>.pth).
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

[[ $# -ge 2 ]] || die "usage: bash tools/mm-train.sh {mmdet|mmseg} DEFAULT_CONFIG [train.py args]"
LAYOUT="$1"
DEFAULT_CONFIG="$2"
shift 2
case "$LAYOUT" in
    mmdet) DIST="mmdet>=3.0.0" ;;
    mmseg) DIST="mmsegmentation>=1.0.0" ;;
    *) die "layout must be mmdet or mmseg, got '$LAYOUT'" ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${CKPT:-}"
CONFIG="${CONFIG:-$DEFAULT_CONFIG}"
GPUS="${GPUS:-1}"
WORK_DIR="${WORK_DIR:-work_dirs/$(basename "$CONFIG" .py)}"

[[ -n "$CKPT" ]] || die "set CKPT to an LGD checkpoint or a torchvision state_dict (e.g. CKPT=runs/lgd/checkpoint_last.pth)"
[[ -f "$CKPT" ]] || die "CKPT not found: $CKPT"
[[ -f "$CONFIG" ]] || die "CONFIG not found: $CONFIG"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "GPUS must be a positive integer, got '$GPUS'"

# pkg_resources: mmengine needs it to find the `mmdet::`/`mmseg::` base configs of our configs.
if ! command -v mim >/dev/null 2>&1 || ! python -c "import $LAYOUT, mmcv, mmengine, pkg_resources" >/dev/null 2>&1; then
    cat >&2 <<EOF
error: OpenMMLab ($LAYOUT) is not usable from this environment: need the \`mim\` command and, in the \`python\` on PATH
(the one mim trains with), importable $LAYOUT, mmcv, mmengine and pkg_resources. Install them with:
    pip install -U openmim "setuptools<81"
    mim install mmengine "mmcv>=2.0.0,<2.2.0" "$DIST"
and this repository into the same environment (from its root): pip install -e .
EOF
    exit 2
fi

# Run the lgd package of this checkout, also when it is not installed into the OpenMMLab environment
# (only for our steps: the training process keeps its own import path).
lgd_convert() {
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m lgd.convert "$@"
}

mkdir -p "$WORK_DIR"
WORK_DIR="$(cd "$WORK_DIR" && pwd)"
# mmengine pastes LGD_BACKBONE_CKPT into the config's Python source: refuse characters that would break it.
case "$WORK_DIR" in
    *\'* | *\"* | *\\* | *$'\n'*) die "the work dir path must not contain quotes, backslashes or newlines: $WORK_DIR" ;;
esac

# 1. Read the backbone arch from CONFIG and convert CKPT into the layout that backbone loads
#    (LGD -> torchvision; MobileNetV2 also -> $LAYOUT). Prints "<arch><TAB><converted checkpoint>".
PREPARED="$(lgd_convert prepare --layout "$LAYOUT" --config "$CONFIG" --out-dir "$WORK_DIR" "$CKPT")"
ARCH="${PREPARED%%$'\t'*}"
BACKBONE="${PREPARED#*$'\t'}"
# 2. Pre-flight against the backbone OpenMMLab builds from CONFIG: every tensor present with its shape, nothing else.
lgd_convert check --layout "$LAYOUT" --arch "$ARCH" --config "$CONFIG" "$BACKBONE"

# 3. Train with OpenMMLab's launcher; the config reads the checkpoint path from LGD_BACKBONE_CKPT.
export LGD_BACKBONE_CKPT="$BACKBONE"
echo "training $CONFIG from $BACKBONE on $GPUS GPU(s); logs in $WORK_DIR"
exec mim train "$LAYOUT" "$CONFIG" --gpus "$GPUS" --launcher pytorch --work-dir "$WORK_DIR" "$@"
