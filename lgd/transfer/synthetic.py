"""Tiny generated data sets with exact labels, for tests and ``--data demo``: toy-world shapes on textured
backgrounds, one shape per 64 px grid cell so that instances never overlap and every box is exact.

* detection: COCO layout (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``),
  boxes from the drawn masks, masks as uncompressed RLE, category ids non-contiguous like COCO's;
* segmentation: ``images/{train,val}/NNNN.png`` + palette PNG ``masks/{train,val}/NNNN.png``
  (0 = background, 1.. = shapes) and ``classes.txt``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..toyworld import COLOURS, IMAGE_SIZE, SHAPES, _shape_mask

CELL = IMAGE_SIZE  # toyworld draws one shape inside a CELL x CELL canvas
CATEGORY_IDS = tuple(2 * i + 1 for i in range(len(SHAPES)))  # 1, 3, 5, 7: gaps, as in COCO's ids
SEGMENTATION_CLASSES = ("background", *SHAPES)
# A VOC-like palette for the mask PNGs: class i gets a distinct colour, so masks are viewable.
PALETTE = [0, 0, 0, 220, 40, 40, 40, 170, 60, 235, 205, 40, 40, 80, 225] + [255, 255, 255] * 251


def scene(rng: random.Random, size: int) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """An RGB image and its instances as ``(shape index, boolean HxW mask)``; ``size`` is a multiple of 64."""
    if size % CELL:
        raise ValueError(f"size must be a multiple of {CELL}, got {size}")
    base = rng.randint(70, 190)
    tint = tuple(max(0, min(255, base + rng.randint(-25, 25))) for _ in range(3))
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    image = Image.blend(Image.new("RGB", (size, size), tint), noise, rng.uniform(0.05, 0.2))
    cells = [(row, col) for row in range(size // CELL) for col in range(size // CELL)]
    chosen = [cell for cell in cells if rng.random() < 0.6] or [rng.choice(cells)]
    instances = []
    for row, col in chosen:
        shape = rng.randrange(len(SHAPES))
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        full = Image.new("L", (size, size), 0)
        full.paste(_shape_mask(SHAPES[shape], rng), (col * CELL, row * CELL))  # hard 0/255 edges
        image = Image.composite(Image.new("RGB", (size, size), colour), image, full)
        instances.append((shape, np.asarray(full) > 127))
    return image, instances


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def make_detection_set(root: str | Path, train: int = 8, val: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Write a COCO-format instance segmentation set under ``root``; return ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, SHAPES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in (("train2017", train), ("val2017", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, instances = scene(rng, size)
            name = f"{index:06d}.png"
            image.save(root / split / name)
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            for shape, mask in instances:
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[shape], "bbox": box,
                    "area": int(mask.sum()), "iscrowd": 0,
                    "segmentation": {"counts": rle_counts(mask), "size": [size, size]},
                })
                ann_id += 1
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def make_segmentation_set(root: str | Path, train: int = 8, val: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Write an images + palette-masks semantic segmentation set under ``root``; return ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, instances = scene(rng, size)
            labels = np.zeros((size, size), dtype=np.uint8)
            for shape, mask in instances:
                labels[mask] = shape + 1
            image.save(root / "images" / split / f"{index:04d}.png")
            target = Image.frombytes("P", (size, size), labels.tobytes())
            target.putpalette(PALETTE)
            target.save(root / "masks" / split / f"{index:04d}.png")
    (root / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")
    return root
