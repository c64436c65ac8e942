# Pieces shared by the LGD detection configs. They live under lgd_* names because mmengine forbids a
# key that two _base_ files both define, and this file is inherited next to an MMDetection base config.

# The converted backbone checkpoint. run.sh sets LGD_BACKBONE_CKPT; with the variable unset, parsing
# the config fails, so training can never start from random weights for lack of a path.
lgd_checkpoint = '{{$LGD_BACKBONE_CKPT:}}'

# The student was distilled on CLIP-normalised RGB images, so fine-tuning feeds it the same statistics
# (CLIP's mean/std x 255) instead of MMDetection's ImageNet defaults.
lgd_mean = [122.7709383, 116.7460125, 104.09373615]
lgd_std = [68.5005327, 66.6321579, 70.32316305]

# Authors' recipe: AdamW, lr 2e-4, weight decay 1e-4, backbone lr x 0.1, gradient clipping. The clip value
# is not in the paper; max_norm=35 is MMDetection's usual value (e.g. its SOLOv2, GHM and Objects365
# configs): loose enough to cut only the loss spikes of early training, when new heads meet a backbone
# pretrained for another objective.
lgd_optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}),
    clip_grad=dict(max_norm=35, norm_type=2))

# Backbones: all stages trained, SyncBN (one process per GPU), BN statistics updated (the pretraining
# statistics come from another data set and objective).
lgd_resnet18 = dict(
    _delete_=True,
    type='ResNet',
    depth=18,
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    norm_eval=False,
    style='pytorch',
    init_cfg=dict(type='Pretrained', checkpoint=lgd_checkpoint))

# out_indices count layer1 as 0 and the final 1x1 conv (conv2, 1280 channels) as 7: strides 4, 8, 16, 32.
lgd_mobilenet_v2 = dict(
    _delete_=True,
    type='MobileNetV2',
    widen_factor=1.0,
    out_indices=(1, 2, 4, 7),
    frozen_stages=-1,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    norm_eval=False,
    init_cfg=dict(type='Pretrained', checkpoint=lgd_checkpoint))
