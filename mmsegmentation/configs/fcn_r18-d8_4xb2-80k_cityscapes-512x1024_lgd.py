# FCN (output stride 8) on Cityscapes (80k iterations, 4 GPUs x 2 crops of 512x1024), LGD-pretrained ResNet-18.
_base_ = [
    'mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py',
    './_base_/lgd_segmentation.py',
]
model = dict(
    pretrained=None,  # the base's ImageNet ResNetV1c weights; ours come from backbone.init_cfg
    data_preprocessor=dict(mean={{_base_.lgd_mean}}, std={{_base_.lgd_std}}),
    backbone={{_base_.lgd_resnet18}},
    decode_head=dict(in_channels=512, channels=128),
    auxiliary_head=dict(in_channels=256, channels=64))
