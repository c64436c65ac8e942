"""The built-in toy world: LGD end to end, offline, in minutes on a laptop CPU.

A generated ImageFolder of coloured shapes ("red circle", "cyan cross", ...) and a tiny CLIP trained
contrastively on it with prompt captions, saved as an OpenAI-format state_dict and loaded through
``clip.load(path)`` like any real teacher. Both are deterministic from a seed and cached on disk.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

import clip
from clip.model import CLIP

from .checkpoint import atomic_torch_save, atomic_write_json
from .data import CLIP_MEAN, CLIP_STD, eval_transform, image_folder

VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 225),
    "magenta": (200, 50, 200),
}
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
    "a small {}.",
    "a large {}.",
    "a rendering of the {}.",
)
IMAGE_SIZE = 64  # stored size; the toy runs train and evaluate at 32 px crops
MODEL_RESOLUTION = 32
TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 25
_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a generated toy world."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root

    @property
    def teacher(self) -> Path:
        return self.root / "teacher.pt"

    @property
    def classnames(self) -> Path:
        return self.root / "classnames.txt"

    @property
    def templates(self) -> Path:
        return self.root / "templates.txt"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def default_home() -> Path:
    return Path(os.environ.get("LGD_HOME", Path.home() / ".cache" / "lgd"))


def class_names() -> list[str]:
    """Class names in ImageFolder order (sorted folder names ``<colour>_<shape>``)."""
    return sorted((f"{colour} {shape}" for shape in SHAPES for colour in COLOURS), key=lambda n: n.replace(" ", "_"))


def _shape_mask(shape: str, rng: random.Random) -> Image.Image:
    """A white-on-black mask of one shape with random size, position and rotation."""
    size = IMAGE_SIZE
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = (rng.uniform(0.38, 0.62) * size for _ in range(2))
    angle = rng.uniform(-0.25, 0.25) + {"triangle": -math.pi / 2, "square": math.pi / 4}.get(shape, 0.0)

    def polygon(radii: list[float]) -> list[tuple[float, float]]:
        n = len(radii)
        return [
            (cx + rad * math.cos(angle + 2 * math.pi * k / n), cy + rad * math.sin(angle + 2 * math.pi * k / n))
            for k, rad in enumerate(radii)
        ]

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.polygon(polygon([r * 1.15] * 4), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([r * 1.25] * 3), fill=255)
    elif shape == "star":
        draw.polygon(polygon([r * 1.2, r * 0.5] * 5), fill=255)
    elif shape == "cross":
        w = r * 0.38
        arms = [(-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w)]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arms], fill=255)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
        draw.ellipse([ox - 0.9 * r, oy - 0.9 * r, ox + 0.9 * r, oy + 0.9 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def render(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """One image: a grey-ish textured background and a coloured shape with jittered tint."""
    base = rng.randint(70, 190)
    tint = [max(0, min(255, base + rng.randint(-25, 25))) for _ in range(3)]
    noise = Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), rng.randbytes(IMAGE_SIZE * IMAGE_SIZE)).convert("RGB")
    background = Image.blend(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(tint)), noise, rng.uniform(0.05, 0.2))
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    mask = _shape_mask(shape, rng).filter(ImageFilter.GaussianBlur(0.6))
    return Image.composite(Image.new("RGB", background.size, fill), background, mask)


def generate_images(root: Path, seed: int = 0) -> None:
    """Write ``root/{train,val}/<colour>_<shape>/NNNN.png`` deterministically from ``seed``."""
    rng = random.Random(seed)
    names = class_names()
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in tqdm(names, desc=f"toy world: {split} images", leave=False):
            colour, shape = name.split(" ")
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                render(shape, colour, rng).save(folder / f"{i:04d}.png")


def tiny_clip() -> CLIP:
    """A ModifiedResNet (width 16, one block per stage) / 2-layer text transformer CLIP for 32 px images."""
    model = CLIP(
        embed_dim=64,
        image_resolution=MODEL_RESOLUTION,
        vision_layers=(1, 1, 1, 1),
        vision_width=16,
        vision_patch_size=None,
        context_length=16,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    # CLIP zero-initialises the last BN of every residual branch; with one block per stage that leaves
    # the tiny tower almost linear at the start and it learns shapes very slowly.
    for name, param in model.named_parameters():
        if name.endswith("bn3.weight"):
            nn.init.ones_(param)
    return model


def _load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as one uint8 tensor [N, 3, 64, 64] and their labels (a few MB)."""
    folder = image_folder(root)
    images = torch.stack([pil_to_tensor(folder.loader(path)) for path, _ in folder.samples])
    return images, torch.tensor([label for _, label in folder.samples])


def _random_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop-and-resize (side 55-100%), flip and brightness/contrast, CLIP-normalised."""
    x = images.float() / 255
    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.55, 1.0, generator=generator)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
    grid = F.affine_grid(theta, [n, 3, MODEL_RESOLUTION, MODEL_RESOLUTION], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    brightness, contrast = (torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator) for _ in range(2))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (((x - mean) * contrast + mean) * brightness).clamp(0, 1)
    return (x - _MEAN) / _STD


def train_teacher(root: Path, seed: int = 0, steps: int = 300, batch_size: int = 128) -> float:
    """Train the tiny CLIP contrastively on prompt captions; return its zero-shot top-1 on ``val/`` (%).

    Each step contrasts the batch's images with one randomly templated caption per class (the
    text-to-image direction treats every image of a class as a positive of its caption). The text tower
    learns 20x slower: otherwise it merges captions that differ only in shape before the image tower
    has learned to see shapes, and training stalls at colour-only accuracy.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    names = class_names()
    images, labels = _load_split(root / "train")
    model = tiny_clip().train()
    captions = clip.tokenize([t.format(n) for n in names for t in TEMPLATES], context_length=16)
    captions = captions.view(len(names), len(TEMPLATES), -1)
    visual = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    text = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    lrs = [2e-3, 1e-4]
    optimizer = torch.optim.AdamW([{"params": visual}, {"params": text}], lr=lrs[0], weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="toy world: training the tiny CLIP teacher", leave=False):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch, target = _random_views(images[index], generator), labels[index]
        choice = torch.randint(0, len(TEMPLATES), (len(names),), generator=generator)
        img = F.normalize(model.encode_image(batch), dim=-1)
        txt = F.normalize(model.encode_text(captions[torch.arange(len(names)), choice]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        positives = F.one_hot(target, len(names)).float().T
        present = positives.sum(1) > 0
        targets_txt = positives[present] / positives[present].sum(1, keepdim=True)
        loss_txt = -(targets_txt * F.log_softmax(logits.T[present], dim=1)).sum(1).mean()
        loss = (F.cross_entropy(logits, target) + loss_txt) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    atomic_torch_save(model.state_dict(), root / "teacher.pt")
    return teacher_zero_shot(root)


@torch.no_grad()
def teacher_zero_shot(root: Path) -> float:
    """Zero-shot top-1 (%) of the saved teacher on ``val/``, loaded the way users load CLIP."""
    from .banks import build_tsb

    model, _ = clip.load(str(root / "teacher.pt"), device="cpu")
    tsb = build_tsb(model, class_names(), list(TEMPLATES))
    val = image_folder(root / "val")
    val.transform = eval_transform(MODEL_RESOLUTION)
    correct = 0
    for images, labels in DataLoader(val, batch_size=256):
        pred = (F.normalize(model.encode_image(images), dim=-1) @ tsb.T).argmax(1)
        correct += int((pred == labels).sum())
    return 100.0 * correct / len(val)


def ensure_toy_world(home: Path | None = None, seed: int = 0, verbose: bool = True) -> ToyWorld:
    """Generate (once) and return the toy world; a half-built one is rebuilt from scratch."""
    world = ToyWorld((home or default_home()) / f"toyworld-v{VERSION}-seed{seed}")
    if world.manifest.is_file():
        return world
    if world.root.exists():
        shutil.rmtree(world.root)
    world.root.mkdir(parents=True)
    start = time.time()
    if verbose:
        print(f"Building the toy world in {world.root} (once; cached for later runs)", flush=True)
    generate_images(world.root, seed)
    world.classnames.write_text("\n".join(class_names()) + "\n")
    world.templates.write_text("\n".join(TEMPLATES) + "\n")
    top1 = train_teacher(world.root, seed)
    manifest = {"version": VERSION, "seed": seed, "classes": len(class_names()), "teacher_top1": top1}
    atomic_write_json(world.manifest, manifest)
    if verbose:
        print(f"Toy world ready in {time.time() - start:.0f}s: tiny CLIP teacher zero-shot top-1 {top1:.1f}%", flush=True)
    return world
