"""Transfer of LGD backbones without OpenMMLab: ``python -m lgd.transfer.detect`` (Faster/Mask R-CNN + FPN on
COCO-format data) and ``python -m lgd.transfer.segment`` (FCN/DeepLabV3 on image + mask folders)."""
