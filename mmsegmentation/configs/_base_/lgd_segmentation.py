# Pieces shared by the LGD segmentation configs. They live under lgd_* names because mmengine forbids a
# key that two _base_ files both define, and this file is inherited next to an MMSegmentation base config.

# The converted backbone checkpoint. run.sh sets LGD_BACKBONE_CKPT; with the variable unset, parsing
# the config fails, so training can never start from random weights for lack of a path.
lgd_checkpoint = '{{$LGD_BACKBONE_CKPT:}}'

# The student was distilled on CLIP-normalised RGB images, so fine-tuning feeds it the same statistics
# (CLIP's mean/std x 255) instead of MMSegmentation's ImageNet defaults.
lgd_mean = [122.7709383, 116.7460125, 104.09373615]
lgd_std = [68.5005327, 66.6321579, 70.32316305]

# ResNet-18 as mmseg's own `ResNet` (v1b: 7x7 stem, like torchvision), not its default ResNetV1c whose
# three-conv stem these weights do not fit; dilated to output stride 8 like mmseg's FCN-D8 configs.
lgd_resnet18 = dict(
    _delete_=True,
    type='ResNet',
    depth=18,
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    strides=(1, 2, 1, 1),
    dilations=(1, 1, 2, 4),
    contract_dilation=True,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    norm_eval=False,
    style='pytorch',
    init_cfg=dict(type='Pretrained', checkpoint=lgd_checkpoint))

# MobileNetV2 with output stride 8 as in mmseg's own mobilenet_v2 configs. out_indices count layer1 as 0;
# mmseg's MobileNetV2 has no final 1x1 conv, so the last stage has 320 channels.
lgd_mobilenet_v2 = dict(
    _delete_=True,
    type='MobileNetV2',
    widen_factor=1.0,
    strides=(1, 2, 2, 1, 1, 1, 1),
    dilations=(1, 1, 1, 2, 2, 4, 4),
    out_indices=(1, 2, 4, 6),
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    norm_eval=False,
    init_cfg=dict(type='Pretrained', checkpoint=lgd_checkpoint))
