# Mask R-CNN + FPN, 1x schedule (12 epochs, 8 GPUs x 2 images), COCO, LGD-pretrained ResNet-18.
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    './_base_/lgd_detection.py',
]
model = dict(
    data_preprocessor=dict(mean={{_base_.lgd_mean}}, std={{_base_.lgd_std}}),
    backbone={{_base_.lgd_resnet18}},
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = {{_base_.lgd_optim_wrapper}}
