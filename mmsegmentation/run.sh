#!/usr/bin/env bash
# Fine-tune an LGD-pretrained backbone with MMSegmentation 1.x (FCN on Cityscapes or ADE20K):
#
#   CKPT=runs/lgd_r18/checkpoint_last.pth [CONFIG=...] [GPUS=4] bash mmsegmentation/run.sh [train.py args]
#
# CKPT: LGD checkpoint or torchvision state_dict (required); CONFIG: default the ResNet-18 Cityscapes
# config; GPUS: default 1; WORK_DIR: default work_dirs/<config name>.
# Runs under the `python` on PATH (the one `mim train` launches).
# The converted, verified backbone goes to WORK_DIR; see tools/mm-train.sh and README.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/../tools/mm-train.sh" mmseg "$HERE/configs/fcn_r18-d8_4xb2-80k_cityscapes-512x1024_lgd.py" "$@"
