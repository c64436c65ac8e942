"""Segmentation transfer without OpenMMLab: ``python -m lgd.transfer.segment`` (or ``torchrun -m ...``).

An FCN or DeepLabV3 head (torchvision's) on the last feature map of an LGD backbone, dilated to output
stride 8 by default, bilinear upsampling to the input, cross-entropy with an ignore index; evaluated as mIoU
(and pixel accuracy, in percent) at the original mask resolution.

Data: ``DATA/<images_dir>/<split>/`` images and ``DATA/<masks_dir>/<split>/`` single-channel PNG masks of
class indices (mode L or P), paired by name: ``a/b.jpg`` goes with ``a/b.png`` (or, with suffixes, e.g.
``x_leftImg8bit.png`` with ``x_gtFine_labelTrainIds.png``). ``DATA/classes.txt`` (one name per line), if
present, names the classes and sets ``--num-classes``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import ResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.transforms import v2
from tqdm import tqdm

from .. import distributed as du
from ..config import parse_config
from ..data import ignore_stop_signals, loader_workers, own_generator, rgb_loader, sample_seed
from ..errors import LGDError, cli_entry
from .common import (NORMS, SCHEDULES, Stages, Task, TransferConfig, apply_norm_and_freezing, check_common,
                     demo_root, find_stages, fit, image_stats, load_backbone, opt)
from .synthetic import make_segmentation_set

HEADS = ("fcn", "deeplabv3")
OUTPUT_STRIDES = (8, 16, 32)
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PNGs of class indices
DEMO_TRAIN, DEMO_VAL = 64, 16  # --data demo: enough images for a few minutes of CPU fine-tuning
PRESCAN = 4  # masks checked when the data set opens, so a wrong --num-classes fails before training starts


@dataclass
class SegmentConfig(TransferConfig):
    """mmseg-style defaults: FCN-D8, SGD lr 0.01, poly decay, 512 crops, scales 0.5-2 (ADE20K 80k ~ 64 epochs)."""

    num_classes: int = field(default=0, metadata=opt("number of classes (0: the lines of DATA/classes.txt)"))
    head: str = field(default="fcn", metadata=opt("segmentation head", choices=list(HEADS)))
    output_stride: int = field(default=8, metadata=opt("backbone output stride (strides past it become dilation)",
                                                       choices=list(OUTPUT_STRIDES)))
    aux_weight: float = field(default=0.0, metadata=opt(
        "weight of an auxiliary FCN head on the stride-16 stage (0: none)"))
    images_dir: str = field(default="images", metadata=opt("folder of images under --data (holds the split folders)"))
    masks_dir: str = field(default="masks", metadata=opt("folder of masks under --data (holds the split folders)"))
    train_split: str = field(default="train", metadata=opt("training split folder name"))
    val_split: str = field(default="val", metadata=opt("validation split folder name"))
    image_suffix: str = field(default="", metadata=opt("image file name ending ('' = any image extension)"))
    mask_suffix: str = field(default=".png", metadata=opt("mask file name ending that replaces the image's"))
    reduce_zero_label: bool = field(default=False, metadata=opt(
        "0 is 'unlabelled' (ADE20K): ignore it, shift classes down"))
    ignore_index: int = field(default=255, metadata=opt("mask value that is not scored"))
    crop_size: int = field(default=512, metadata=opt("square training crop (padded with the ignore index)"))
    base_size: int = field(default=512, metadata=opt("short side at scale 1 (training) and at evaluation"))
    min_scale: float = field(default=0.5, metadata=opt("smallest random scale of base_size in training"))
    max_scale: float = field(default=2.0, metadata=opt("largest random scale of base_size in training"))
    norm: str = field(default="syncbn", metadata=opt("backbone BatchNorm (syncbn acts as bn in one process)",
                                                     choices=list(NORMS)))
    trainable_layers: int = field(default=5, metadata=opt("backbone stages trained, from the top (0-5)"))
    optimizer: str = field(default="sgd", metadata=opt("optimizer", choices=["sgd", "adamw"]))
    lr: float = field(default=0.01, metadata=opt("peak learning rate (for the whole global batch)"))
    weight_decay: float = field(default=5e-4, metadata=opt("weight decay"))
    backbone_lr_mult: float = field(default=1.0, metadata=opt("learning-rate multiplier of the backbone"))
    clip_grad: float = field(default=0.0, metadata=opt("max gradient norm (0: no clipping)"))
    schedule: str = field(default="poly", metadata=opt("lr decay after warm-up (poly: power 0.9)",
                                                       choices=list(SCHEDULES)))
    min_lr: float = field(default=1e-4, metadata=opt("learning rate the poly/cosine decay ends at (mmseg's eta_min)"))
    warmup_iters: int = field(default=0, metadata=opt("linear warm-up steps"))
    epochs: int = field(default=64, metadata=opt("training epochs"))
    batch_size: int = field(default=16, metadata=opt("global batch size (split over all ranks)"))


def check_config(cfg: SegmentConfig) -> None:
    if cfg.head not in HEADS:
        raise LGDError(f"head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.output_stride not in OUTPUT_STRIDES:
        raise LGDError(f"output_stride must be one of {OUTPUT_STRIDES}, got {cfg.output_stride}")
    if cfg.crop_size <= 0 or cfg.base_size <= 0:
        raise LGDError(f"crop_size and base_size must be positive, got {cfg.crop_size} and {cfg.base_size}")
    if not 0 < cfg.min_scale <= cfg.max_scale:
        raise LGDError(f"need 0 < min_scale <= max_scale, got {cfg.min_scale} and {cfg.max_scale}")


# ------------------------------------------------------------------------------------------------ model
def dilate(stages: Stages, output_stride: int, contract_first: bool) -> None:
    """Trade every stride that would pass ``output_stride`` for dilation of the convolutions after it.

    The unit that loses its stride keeps the previous dilation when ``contract_first`` (ResNet's convention,
    as torchvision's ``replace_stride_with_dilation`` and mmseg's ``contract_dilation``) and takes the new one
    otherwise (MobileNet's, as torchvision's dilated MobileNetV3 and mmseg's MobileNetV2). Every later conv
    wider than 1x1 takes the full dilation (DeepLab's scheme, as torchvision's dilated ResNet and MobileNetV3);
    mmseg dilates fewer (in a MobileNetV2 layer only its first block, in a ResNet BasicBlock only ``conv1``), so
    its receptive fields at the same output stride are somewhat smaller.
    """
    stride, dilation, previous = 1, 1, 1
    for unit in stages.units:
        factor, previous = unit.stride // previous, unit.stride
        convs = [m for m in unit.module.modules() if isinstance(m, nn.Conv2d)]
        if stride * factor > output_stride:
            strided = [m for m in convs if m.stride != (1, 1)]
            if not strided:
                raise LGDError(f"internal error: no strided conv in {unit.child} ({type(unit.module).__name__})")
            for conv in strided:
                conv.stride = (1, 1)
            dilation *= factor
            own = dilation // factor if contract_first else dilation
        else:
            stride *= factor
            own = dilation
        if own > 1:
            for conv in convs:
                if conv.kernel_size[0] > 1:
                    conv.dilation = (own, own)
                    conv.padding = (own * (conv.kernel_size[0] - 1) // 2, own * (conv.kernel_size[1] - 1) // 2)


def build_segmenter(cfg: SegmentConfig, num_classes: int) -> tuple[str, nn.Module, nn.Module, list[str]]:
    """``(arch, model, backbone, report lines)``: the dilated LGD backbone under an FCN/DeepLabV3 head."""
    arch, backbone, report = load_backbone(cfg.backbone, cfg.arch)
    stages = find_stages(backbone)
    out_name, out_channels = stages.tap(32), stages.channels(32)
    aux_name, aux_channels = stages.tap(16), stages.channels(16)
    dilate(stages, cfg.output_stride, contract_first=isinstance(backbone, ResNet))
    lines = [report, apply_norm_and_freezing(stages, cfg.norm, cfg.trainable_layers)]
    return_layers = {out_name: "out", **({aux_name: "aux"} if cfg.aux_weight > 0 else {})}
    body = IntermediateLayerGetter(stages.body, return_layers)
    if cfg.head == "fcn":
        model: nn.Module = FCN(body, FCNHead(out_channels, num_classes),
                               FCNHead(aux_channels, num_classes) if cfg.aux_weight > 0 else None)
    else:
        rates = tuple(r * 8 // cfg.output_stride for r in (12, 24, 36))  # DeepLabV3's rates at output stride 8
        model = DeepLabV3(body, DeepLabHead(out_channels, num_classes, rates),
                          FCNHead(aux_channels, num_classes) if cfg.aux_weight > 0 else None)
    lines.append(f"{cfg.head} head on {out_name} ({out_channels} ch) at output stride {cfg.output_stride}"
                 + (f", auxiliary FCN head on {aux_name} (weight {cfg.aux_weight})" if cfg.aux_weight > 0 else ""))
    return arch, model, body, lines


# ------------------------------------------------------------------------------------------------ data
def _pairs(image_dir: Path, mask_dir: Path, image_suffix: str, mask_suffix: str) -> list[tuple[Path, Path]]:
    """(image, mask) files matched by their path relative to the split folder, minus the suffixes."""
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise LGDError(f"{what} folder not found: {folder}")

    def stem(path: Path, root: Path, suffix: str) -> str:
        rel = path.relative_to(root).as_posix()
        return rel[: -len(suffix)] if suffix else rel[: -len(path.suffix)]

    def is_image(path: Path) -> bool:
        return path.name.endswith(image_suffix) if image_suffix else path.suffix.lower() in IMG_EXTENSIONS

    images = {stem(p, image_dir, image_suffix): p for p in image_dir.rglob("*") if p.is_file() and is_image(p)}
    masks = {stem(p, mask_dir, mask_suffix): p
             for p in mask_dir.rglob("*") if p.is_file() and p.name.endswith(mask_suffix)}
    if not images:
        raise LGDError(f"no images in {image_dir}" + (f" ending in {image_suffix!r}" if image_suffix else ""))
    lonely_images, lonely_masks = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        problems = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                    for names, what in ((lonely_images, f"images without a mask in {mask_dir}"),
                                        (lonely_masks, f"masks without an image in {image_dir}")) if names]
        raise LGDError("images and masks do not pair up by name: " + "; ".join(problems)
                       + f". A mask is the image's relative path with its ending replaced by {mask_suffix!r} "
                       "(see --image-suffix / --mask-suffix)")
    return [(images[k], masks[k]) for k in sorted(images)]


def read_mask(path: Path, num_classes: int, ignore_index: int, reduce_zero_label: bool) -> torch.Tensor:
    """A mask file as an ``int64`` [H, W] tensor of class indices, checked against ``num_classes``."""
    with Image.open(path) as image:
        if image.mode not in MASK_MODES:
            raise LGDError(f"{path}: masks must be single-channel class indices (mode L, P, I or I;16), not mode "
                           f"{image.mode}; convert colour-coded masks to index masks first")
        mask = torch.from_numpy(np.array(image).astype(np.int64))
    if reduce_zero_label:  # 0 = unlabelled -> ignore; 1..K -> 0..K-1
        mask = torch.where(mask == 0, ignore_index, torch.where(mask == ignore_index, ignore_index, mask - 1))
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        raise LGDError(f"{path} has class {int(mask[bad].max())} but num_classes is {num_classes} (labels must be "
                       f"0..{num_classes - 1} or {ignore_index} = ignore); check --num-classes, and for masks "
                       "where 0 means 'unlabelled' (ADE20K) add --reduce-zero-label")
    return mask


class SegmentationFolder(Dataset):
    """Image/mask pairs of one split; training items are random scale-crop-flip views keyed like
    ``lgd.data.SeededImageFolder`` (``(index, epoch)`` seeds them), validation items are the image resized
    to ``base_size`` with the mask untouched (scored at its own resolution)."""

    def __init__(self, cfg: SegmentConfig, root: Path, split: str, num_classes: int, train: bool) -> None:
        self.pairs = _pairs(root / cfg.images_dir / split, root / cfg.masks_dir / split, cfg.image_suffix,
                            cfg.mask_suffix)
        self.num_classes, self.ignore_index = num_classes, cfg.ignore_index
        self.reduce_zero_label = cfg.reduce_zero_label
        self.train, self.seed = train, cfg.seed
        for _, mask in self.pairs[:PRESCAN]:
            read_mask(mask, num_classes, cfg.ignore_index, cfg.reduce_zero_label)
        mean, std = image_stats(cfg.normalization)
        if train:
            low, high = round(cfg.base_size * cfg.min_scale), round(cfg.base_size * cfg.max_scale)
            self.transform = v2.Compose([
                v2.RandomResize(low, high + 1),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
                v2.RandomCrop(cfg.crop_size, pad_if_needed=True,  # pad: mean colour, ignored labels
                              fill={tv_tensors.Image: 0.0, tv_tensors.Mask: cfg.ignore_index}),
                v2.RandomHorizontalFlip(),
            ])
        else:
            self.transform = v2.Compose([v2.Resize(cfg.base_size), v2.ToDtype(torch.float32, scale=True),
                                         v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_path, mask_path = self.pairs[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(rgb_loader(str(image_path))))
        mask = read_mask(mask_path, self.num_classes, self.ignore_index, self.reduce_zero_label)
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise LGDError(f"{image_path} is {tuple(image.shape[-2:])} but its mask {mask_path} is {tuple(mask.shape)}")
        if not self.train:
            return self.transform(image).as_subclass(torch.Tensor), mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image, mask = self.transform(image, tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def class_names(cfg: SegmentConfig, root: Path) -> list[str]:
    """Class names from ``DATA/classes.txt``, or numbers; their count must agree with ``--num-classes``."""
    listing = root / "classes.txt"
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()] if listing.is_file() else []
    if names and cfg.num_classes and len(names) != cfg.num_classes:
        raise LGDError(f"{listing} lists {len(names)} classes but --num-classes is {cfg.num_classes}")
    count = cfg.num_classes or len(names)
    if count < 2:
        raise LGDError(f"set --num-classes (at least 2, background included), or list the classes in {listing}")
    if 0 <= cfg.ignore_index < count:
        raise LGDError(f"ignore_index {cfg.ignore_index} is one of the {count} class indices; pick a value >= {count}")
    return names or [str(i) for i in range(count)]


# ------------------------------------------------------------------------------------------------ metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[K, K] counts, rows = true class, columns = predicted class; ignored pixels are not counted."""
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_metrics(conf: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """mIoU, mean class accuracy and pixel accuracy (percent); classes absent from both truth and
    prediction have no IoU and are left out of the means (per-class value ``None``)."""
    conf = conf.double()
    tp, truth, predicted = conf.diag(), conf.sum(1), conf.sum(0)
    iou = tp / (truth + predicted - tp)
    acc = tp / truth
    per_class = {name: None if math.isnan(v) else round(100 * v, 3) for name, v in zip(names, iou.tolist())}
    return {"mIoU": round(100 * float(iou.nanmean()), 3), "mAcc": round(100 * float(acc.nanmean()), 3),
            "aAcc": round(100 * float(tp.sum() / conf.sum()), 3), "IoU_per_class": per_class}


def make_evaluate(cfg: SegmentConfig, val_set: SegmentationFolder, names: list[str]) -> Any:
    num_classes = len(names)

    def evaluate(model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> dict[str, Any]:
        """Each rank scores its share of the val images; the confusion matrices are summed over ranks."""
        loader = DataLoader(du.shard(val_set), batch_size=1, num_workers=loader_workers(cfg.workers),
                            worker_init_fn=ignore_stop_signals, generator=own_generator())
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        with torch.no_grad():
            for image, mask in tqdm(loader, desc="evaluate", disable=not du.is_main(), dynamic_ncols=True):
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    logits = model(image.to(device, non_blocking=True))["out"]
                mask = mask.to(device)
                logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
                conf += confusion_matrix(logits.argmax(1), mask, num_classes, cfg.ignore_index)
        du.all_reduce_sum(conf)
        return iou_metrics(conf.cpu(), names)

    return evaluate


def segmentation_loss(cfg: SegmentConfig) -> Any:
    def loss(model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, masks = (t.to(device, non_blocking=True) for t in batch)
        out = model(images)
        losses = {"loss_seg": F.cross_entropy(out["out"], masks, ignore_index=cfg.ignore_index)}
        if "aux" in out:
            losses["loss_aux"] = cfg.aux_weight * F.cross_entropy(out["aux"], masks, ignore_index=cfg.ignore_index)
        return losses

    return loss


def segment(cfg: SegmentConfig) -> dict[str, Any]:
    """Fine-tune a segmentation model over an LGD backbone; return the metrics written to ``metrics.json``."""
    device = du.init_distributed(cfg.device)
    check_common(cfg)
    check_config(cfg)
    root = demo_root(cfg, "segment", lambda path: make_segmentation_set(path, train=DEMO_TRAIN, val=DEMO_VAL))
    names = class_names(cfg, root)
    train_set = SegmentationFolder(cfg, root, cfg.train_split, len(names), train=True)
    val_set = SegmentationFolder(cfg, root, cfg.val_split, len(names), train=False)
    torch.manual_seed(cfg.seed)
    arch, model, body, lines = build_segmenter(cfg, len(names))
    if du.is_main():
        print("\n".join(lines))
        print(f"{cfg.head} over {arch}: {len(names)} classes; "
              f"{len(train_set)} training / {len(val_set)} validation images")
    task = Task(name="segment", arch=arch, model=model, backbone=body, train_set=train_set,
                loss=segmentation_loss(cfg), evaluate=make_evaluate(cfg, val_set, names),
                meta={"head": cfg.head, "classes": names},
                recipe_keys=("num_classes", "output_stride", "aux_weight", "reduce_zero_label", "ignore_index",
                             "crop_size", "base_size", "min_scale", "max_scale"))
    try:
        return fit(cfg, task, device, [])
    finally:
        du.cleanup()


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(SegmentConfig, argv, description="Segmentation transfer: FCN/DeepLabV3 over an LGD backbone")
    return segment(cfg)


if __name__ == "__main__":
    main()
