#!/usr/bin/env bash
# Fine-tune an LGD-pretrained backbone with MMDetection 3.x (Mask R-CNN on COCO or LVIS v1):
#
#   CKPT=runs/lgd_r18/checkpoint_last.pth [CONFIG=...] [GPUS=8] bash mmdetection/run.sh [train.py args]
#
# CKPT: LGD checkpoint or torchvision state_dict (required); CONFIG: default the ResNet-18 COCO config;
# GPUS: default 1; WORK_DIR: default work_dirs/<config name>.
# Runs under the `python` on PATH (the one `mim train` launches).
# The converted, verified backbone goes to WORK_DIR; see tools/mm-train.sh and README.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/../tools/mm-train.sh" mmdet "$HERE/configs/mask-rcnn_r18_fpn_1x_coco_lgd.py" "$@"
