# Mask R-CNN + FPN on LVIS v1 (repeat-factor sampling 1e-3, multi-scale training, 1x schedule),
# LGD-pretrained MobileNetV2. Evaluation needs the LVIS API (see README.md).
_base_ = [
    'mmdet::lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py',
    './_base_/lgd_detection.py',
]
model = dict(
    data_preprocessor=dict(mean={{_base_.lgd_mean}}, std={{_base_.lgd_std}}),
    backbone={{_base_.lgd_mobilenet_v2}},
    neck=dict(in_channels=[24, 32, 96, 1280]))
optim_wrapper = {{_base_.lgd_optim_wrapper}}
