"""Detection transfer without OpenMMLab: ``python -m lgd.transfer.detect`` (or ``torchrun -m lgd.transfer.detect``).

Faster R-CNN or Mask R-CNN (torchvision's builders) with an FPN over the four stride-4..32 feature maps of an
LGD backbone, fine-tuned on COCO-format annotations and evaluated with pycocotools (box AP, and mask AP for
Mask R-CNN; in percent). Without pycocotools, Faster R-CNN still trains and ``metrics.json`` says why no AP
was computed; Mask R-CNN needs it to read the masks.

Data: ``DATA/<train_images>/`` + ``DATA/<train_ann>`` and the same for val (COCO 2017 names by default).
Defaults follow the authors' recipe (AdamW lr 2e-4, wd 1e-4, backbone lr x0.1, gradient clipping, 1x).
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import v2
from tqdm import tqdm

from .. import distributed as du
from ..config import parse_config
from ..data import ignore_stop_signals, loader_workers, own_generator, rgb_loader, sample_seed
from ..errors import LGDError, cli_entry
from .common import (NORMS, PYRAMID_STRIDES, SCHEDULES, Task, TransferConfig, apply_norm_and_freezing,
                     check_common, demo_root, find_stages, fit, image_stats, load_backbone, opt)
from .synthetic import make_detection_set

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six numbers of COCOeval.stats
DEMO_TRAIN, DEMO_VAL = 64, 16  # --data demo: enough images for a few minutes of CPU fine-tuning
NO_PYCOCOTOOLS = "pycocotools is not installed: no AP computed (pip install pycocotools)"


@dataclass
class DetectConfig(TransferConfig):
    """The authors' detection recipe (Mask R-CNN FPN 1x: 12 epochs, batch 16, AdamW)."""

    model: str = field(default="mask_rcnn", metadata=opt("detector", choices=["mask_rcnn", "faster_rcnn"]))
    train_ann: str = field(default="annotations/instances_train2017.json",
                           metadata=opt("COCO json (relative to --data)"))
    train_images: str = field(default="train2017", metadata=opt("folder of the training images (relative to --data)"))
    val_ann: str = field(default="annotations/instances_val2017.json", metadata=opt("COCO json (relative to --data)"))
    val_images: str = field(default="val2017", metadata=opt("folder of the validation images (relative to --data)"))
    min_size: int = field(default=800, metadata=opt(
        "resize so the short side is this (unless the long side passes max_size)"))
    max_size: int = field(default=1333, metadata=opt("longest side after resizing"))
    roi_batch_size: int = field(default=512, metadata=opt("RoIs sampled per image for the box head's training loss"))
    proposals_test: int = field(default=1000, metadata=opt("RPN proposals kept per image at evaluation"))
    detections_per_image: int = field(default=100, metadata=opt("detections kept per image (COCO: 100, LVIS: 300)"))
    val_batch_size: int = field(default=2, metadata=opt("images per rank per evaluation step"))
    norm: str = field(default="syncbn", metadata=opt("backbone BatchNorm (syncbn acts as bn in one process)",
                                                     choices=list(NORMS)))
    trainable_layers: int = field(default=5, metadata=opt("backbone stages trained, from the top (0-5)"))
    optimizer: str = field(default="adamw", metadata=opt("optimizer", choices=["sgd", "adamw"]))
    lr: float = field(default=2e-4, metadata=opt("peak learning rate (for the whole global batch)"))
    weight_decay: float = field(default=1e-4, metadata=opt("weight decay"))
    backbone_lr_mult: float = field(default=0.1, metadata=opt("learning-rate multiplier of the backbone"))
    clip_grad: float = field(default=35.0, metadata=opt("max gradient norm (0: no clipping)"))
    schedule: str = field(default="step", metadata=opt("lr decay after warm-up (step: x0.1 at 8/12 and 11/12 of it)",
                                                       choices=list(SCHEDULES)))
    warmup_iters: int = field(default=500, metadata=opt("linear warm-up steps"))
    epochs: int = field(default=12, metadata=opt("training epochs (12 = 1x)"))
    batch_size: int = field(default=16, metadata=opt("global batch size (split over all ranks)"))


def _pycocotools_mask() -> Any:
    try:
        from pycocotools import mask
    except ImportError:
        return None
    return mask


def _read_coco(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LGDError(f"annotation file not found: {path} (set --data to the dataset root, or --train-ann/--val-ann)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LGDError(f"{path} is not valid JSON: {err}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise LGDError(f"{path} is not a COCO instances file: no {', '.join(missing)}")
    if not doc["categories"]:
        raise LGDError(f"{path} lists no categories")
    return doc


class CocoInstances(Dataset):
    """COCO-format boxes (and masks) as torchvision detection targets; labels are 1..K in category-id order.

    Items are keyed like ``lgd.data.SeededImageFolder``: ``(index, epoch)`` seeds the augmentation, so a run
    is reproducible whatever the number of workers and a resumed run continues exactly.
    """

    def __init__(self, ann_file: Path, image_root: Path, train: bool, masks: bool, seed: int = 0) -> None:
        doc = _read_coco(ann_file)
        self.ann_file, self.train, self.masks, self.seed = ann_file, train, masks, seed
        categories = sorted(doc["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in doc["annotations"]:
            if ann.get("category_id") not in self.label_of:
                raise LGDError(f"{ann_file}: annotation {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                               f"which is not among the categories {self.category_ids}")
            self.anns[ann["image_id"]].append(ann)
        images = doc["images"]
        if train:  # images without a usable box teach nothing but cost a step (torchvision's reference drops them)
            images = [im for im in images if any(self._usable(a) for a in self.anns[im["id"]])]
        if not images:
            raise LGDError(f"{ann_file}: no images" + (" with a usable (non-crowd, non-empty) box" if train else ""))
        nameless = [im.get("id") for im in images if "file_name" not in im]
        if nameless:
            raise LGDError(f"{ann_file}: {len(nameless)} image entries have no file_name (e.g. id {nameless[0]}); "
                           "this reader takes COCO instances files (LVIS is covered by the mmdetection/ configs)")
        self.images = images
        self.paths = [image_root / im["file_name"] for im in images]
        absent = [p for p in self.paths if not p.is_file()]
        if absent:
            raise LGDError(f"{len(absent)} of {len(self.paths)} images listed in {ann_file} are missing under "
                           f"{image_root}, e.g. {absent[0]}; does the images folder match the annotation file?")
        flip = [v2.RandomHorizontalFlip(0.5)] if train else []
        self.transform = v2.Compose([*flip, v2.ToDtype(torch.float32, scale=True)])

    @staticmethod
    def _usable(ann: dict[str, Any]) -> bool:
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def __len__(self) -> int:
        return len(self.images)

    def _mask(self, ann: dict[str, Any], height: int, width: int, coco_mask: Any) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:
            raise LGDError(f"{self.ann_file}: annotation {ann.get('id')} has no segmentation, which Mask R-CNN "
                           "trains on; use --model faster_rcnn for box-only annotations")
        if isinstance(seg, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(seg, height, width)
        else:
            rle = seg
        mask = coco_mask.decode(rle)
        if mask.shape != (height, width):
            raise LGDError(f"{self.ann_file}: annotation {ann.get('id')} has a {mask.shape} mask on a "
                           f"{(height, width)} image")
        return mask

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, dict[str, Any]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        info = self.images[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(rgb_loader(str(self.paths[index]))))
        height, width = image.shape[-2:]
        target: dict[str, Any] = {"image_id": info["id"]}
        if self.train:
            boxes, labels, masks = [], [], []
            coco_mask = _pycocotools_mask() if self.masks else None
            for ann in self.anns[info["id"]]:
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = ann["bbox"]
                x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
                if x1 <= x0 or y1 <= y0:
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(self.label_of[ann["category_id"]])
                if coco_mask is not None:
                    masks.append(self._mask(ann, height, width, coco_mask))
            target["boxes"] = tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                       format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.tensor(labels, dtype=torch.int64)
            if self.masks:
                target["masks"] = tv_tensors.Mask(torch.from_numpy(np.stack(masks)) if masks
                                                  else torch.zeros(0, height, width, dtype=torch.uint8))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image, target = self.transform(image, target)
        # plain tensors from here on: the detectors do not need the tv_tensors wrappers
        return image.as_subclass(torch.Tensor), {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


class FP32BoxCoder(BoxCoder):
    """torchvision's box coder, decoding in fp32 whatever the head's autocast dtype: it casts the boxes to the
    regression output's dtype, and bf16 (8-bit mantissa) would put a 1000-px coordinate on a 4-px grid."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


def build_detector(cfg: DetectConfig, num_classes: int) -> tuple[str, nn.Module, nn.Module, list[str]]:
    """``(arch, detector, backbone body, report lines)``: the LGD backbone under an FPN and the chosen heads."""
    arch, backbone, report = load_backbone(cfg.backbone, cfg.arch)
    stages = find_stages(backbone)
    taps = {stages.tap(s): str(i) for i, s in enumerate(PYRAMID_STRIDES)}
    channels = [stages.channels(s) for s in PYRAMID_STRIDES]
    lines = [report, apply_norm_and_freezing(stages, cfg.norm, cfg.trainable_layers),
             f"FPN over {', '.join(f'{name} ({c} ch, /{s})' for name, c, s in zip(taps, channels, PYRAMID_STRIDES))}"]
    fpn = BackboneWithFPN(stages.body, taps, channels, out_channels=256, extra_blocks=LastLevelMaxPool())
    mean, std = image_stats(cfg.normalization)
    builder = MaskRCNN if cfg.model == "mask_rcnn" else FasterRCNN
    detector = builder(fpn, num_classes=num_classes + 1, min_size=cfg.min_size, max_size=cfg.max_size,
                       image_mean=mean, image_std=std, box_batch_size_per_image=cfg.roi_batch_size,
                       rpn_post_nms_top_n_test=cfg.proposals_test, box_detections_per_img=cfg.detections_per_image)
    for head in (detector.rpn, detector.roi_heads):
        head.box_coder = FP32BoxCoder(head.box_coder.weights, head.box_coder.bbox_xform_clip)
    return arch, detector, fpn.body, lines


def detection_loss(model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return model(images, targets)


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                    coco_mask: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's detections as COCO result records: (bbox results, segm results)."""
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    bbox = [{"image_id": image_id, "category_id": category_ids[label - 1], "bbox": [round(v, 2) for v in box],
             "score": score} for box, score, label in zip(boxes.tolist(), scores, labels)]
    segm = []
    if "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for mask, score, label in zip(binary, scores, labels):
            rle = coco_mask.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            segm.append({"image_id": image_id, "category_id": category_ids[label - 1], "segmentation": rle,
                         "score": score})
    return bbox, segm


def _no_detections(ground_truth: Any) -> Any:
    """An empty result set (``COCO.loadRes`` refuses an empty list), so that COCOeval scores 0 where there is ground
    truth and -1 (null) for an object size that has none, as it does for any other run."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": ground_truth.dataset["images"], "categories": ground_truth.dataset["categories"],
                     "annotations": []}
    empty.createIndex()
    return empty


def coco_ap(ann_file: Path, image_ids: list[int], results: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """COCOeval's summary numbers (percent) per IoU type; prints COCOeval's usual table."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # its loading chatter, not the result table
        ground_truth = COCO(str(ann_file))
    metrics: dict[str, float | None] = {}
    for iou_type, records in results.items():
        with contextlib.redirect_stdout(io.StringIO()):
            detections = ground_truth.loadRes(records) if records else _no_detections(ground_truth)
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.params.imgIds = image_ids
        print(f"COCO {iou_type} evaluation:")
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        evaluator.summarize()
        # COCOeval's -1 means "no ground truth in this area range", not a score.
        metrics.update({f"{iou_type}_{name}": round(100 * float(v), 3) if v >= 0 else None
                        for name, v in zip(AP_NAMES, evaluator.stats)})
    return metrics


def make_evaluate(cfg: DetectConfig, val_set: CocoInstances) -> Any:
    def evaluate(model: nn.Module, device: torch.device, autocast: torch.dtype | None) -> dict[str, Any]:
        """Each rank runs its share of the val images; rank 0 gathers the detections and runs COCOeval."""
        coco_mask = _pycocotools_mask()
        if coco_mask is None:
            return {}  # the run's notes say why
        loader = DataLoader(du.shard(val_set), batch_size=cfg.val_batch_size, num_workers=loader_workers(cfg.workers),
                            collate_fn=collate, worker_init_fn=ignore_stop_signals, generator=own_generator())
        results: dict[str, list[dict[str, Any]]] = {"bbox": [], **({"segm": []} if cfg.model == "mask_rcnn" else {})}
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                             enabled=autocast is not None):
            for images, targets in tqdm(loader, desc="evaluate", disable=not du.is_main(), dynamic_ncols=True):
                outputs = model([image.to(device, non_blocking=True) for image in images])
                for output, target in zip(outputs, targets):
                    bbox, segm = to_coco_results(output, target["image_id"], val_set.category_ids, coco_mask)
                    results["bbox"] += bbox
                    if "segm" in results:
                        results["segm"] += segm
        if du.is_dist():
            gathered: list[Any] = [None] * du.world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = {k: [r for part in gathered for r in part[k]] for k in results}
        if not du.is_main():
            return {}
        return coco_ap(val_set.ann_file, [im["id"] for im in val_set.images], results)

    return evaluate


def detect(cfg: DetectConfig) -> dict[str, Any]:
    """Fine-tune a detector over an LGD backbone; return the metrics written to ``metrics.json``."""
    device = du.init_distributed(cfg.device)
    check_common(cfg)
    if cfg.model not in ("mask_rcnn", "faster_rcnn"):
        raise LGDError(f"model must be mask_rcnn or faster_rcnn, got {cfg.model!r}")
    notes: list[str] = []
    if _pycocotools_mask() is None:
        if cfg.model == "mask_rcnn":
            raise LGDError("Mask R-CNN needs pycocotools to read the annotation masks: pip install pycocotools "
                           "(or use --model faster_rcnn)")
        notes.append(NO_PYCOCOTOOLS)
    root = demo_root(cfg, "detect", lambda path: make_detection_set(path, train=DEMO_TRAIN, val=DEMO_VAL))
    masks = cfg.model == "mask_rcnn"
    train_set = CocoInstances(root / cfg.train_ann, root / cfg.train_images, train=True, masks=masks, seed=cfg.seed)
    val_set = CocoInstances(root / cfg.val_ann, root / cfg.val_images, train=False, masks=False)
    if val_set.category_ids != train_set.category_ids:
        raise LGDError(f"{cfg.val_ann} and {cfg.train_ann} list different categories "
                       f"({val_set.category_ids} vs {train_set.category_ids})")
    torch.manual_seed(cfg.seed)
    arch, model, body, lines = build_detector(cfg, len(train_set.category_ids))
    if du.is_main():
        print("\n".join(lines))
        print(f"{cfg.model} over {arch}: {len(train_set.category_ids)} classes; "
              f"{len(train_set)} training / {len(val_set)} validation images")
    task = Task(name="detect", arch=arch, model=model, backbone=body, train_set=train_set, loss=detection_loss,
                evaluate=make_evaluate(cfg, val_set), collate=collate,
                meta={"model": cfg.model, "category_ids": train_set.category_ids, "classes": train_set.class_names},
                recipe_keys=("min_size", "max_size", "roi_batch_size"))
    try:
        return fit(cfg, task, device, notes)
    finally:
        du.cleanup()


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(DetectConfig, argv,
                       description="Detection transfer: Faster/Mask R-CNN + FPN over an LGD backbone")
    return detect(cfg)


if __name__ == "__main__":
    main()
