"""Images for LGD: MoCo-v2 views shared by teacher and student, deterministic per (seed, epoch, index).

Augmentation randomness is derived from the sample's identity rather than from worker RNG state, so a run
gives the same views whatever the number of workers, and a resumed run continues exactly.
"""
from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision import datasets, transforms

from clip.clip import CLIP_MEAN, CLIP_STD

from .errors import LGDError, UnreadableImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def loader_workers(requested: int) -> int:
    """Cap DataLoader processes at the CPUs this process may use: more only add memory and contention
    (and PyTorch warns), so config defaults written for GPU servers also run well on a laptop."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(0, min(requested, available))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of runs that save on SIGTERM/SIGINT. torchrun and SLURM signal the whole
    process group on pre-emption; a worker that died of it would make the main process raise before it can
    save, so workers ignore both signals and the main process shuts them down after saving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def normalization(name: str) -> transforms.Normalize:
    """LGD students are trained on CLIP-normalised inputs; evaluation must use the same constants."""
    if name not in NORMALIZATIONS:
        raise LGDError(f"unknown normalisation {name!r}; choose from {sorted(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[name]
    return transforms.Normalize(mean, std)


# Training crops resize bilinearly, torchvision's default that MoCo v2, SEED and the LGD authors' code use (and
# so does the MoCo linear-probe protocol, for its crops and its val resize); zero-shot and kNN evaluation resize
# bicubically, as CLIP's own preprocessing does for the teacher's zero-shot numbers.
VIEW_INTERPOLATION = transforms.InterpolationMode.BILINEAR


def moco_v2_transform(size: int, norm: str = "clip", min_scale: float = 0.2) -> transforms.Compose:
    """The view LGD feeds to both networks: MoCo-v2 augmentation with CLIP mean/std."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the side, odd, as in MoCo v2
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=VIEW_INTERPOLATION),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalization(norm),
        ]
    )


def eval_transform(size: int, norm: str = "clip",
                   interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC) -> transforms.Compose:
    """Resize to size*256/224 then center-crop (the standard 256/224 protocol at any resolution)."""
    return transforms.Compose(
        [
            transforms.Resize(int(round(size * 256 / 224)), interpolation=interpolation),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalization(norm),
        ]
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, sample) with no structure shared between runs."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file it cannot decode


def own_generator(seed: int = 0) -> torch.Generator:
    """A DataLoader's own RNG. Without one, every new loader iterator draws its workers' base seed from the global
    RNG, a draw that a resumed run makes where an uninterrupted one does not: it would shift the model's own random
    ops (dropout, stochastic depth) and break bit-exact resume."""
    return torch.Generator().manual_seed(seed)


def rgb_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def strict_rgb_loader(path: str) -> Image.Image:
    """The loader of evaluation splits: they are scored image by image, so an unreadable file is an error that
    names it (training instead skips and counts them)."""
    try:
        return rgb_loader(path)
    except UNREADABLE as err:
        raise UnreadableImage(f"unreadable image {path} ({err}); evaluation scores every image of its split: "
                              "repair or remove the file") from None


def image_folder(root: str | os.PathLike) -> datasets.ImageFolder:
    """torchvision's ImageFolder (no transform, :func:`strict_rgb_loader`) with one clear error for a missing
    or empty folder."""
    root = Path(root)
    if not root.is_dir():
        raise LGDError(f"image folder not found: {root}")
    try:
        return datasets.ImageFolder(str(root), loader=strict_rgb_loader)
    except (FileNotFoundError, RuntimeError) as err:
        raise LGDError(f"{root} is not an ImageFolder (class sub-folders holding images): {err}") from None


def train_val_folders(root: Path) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """``root/train`` and ``root/val``, which must have the same class folders (labels are folder positions)."""
    train, val = image_folder(root / "train"), image_folder(root / "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        differ = [f"only in train/: {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}"] if only_train else []
        differ += [f"only in val/: {', '.join(only_val[:5])}{' ...' if len(only_val) > 5 else ''}"] if only_val else []
        raise LGDError(f"{root / 'train'} and {root / 'val'} must have the same class folders "
                       f"({len(train.classes)} vs {len(val.classes)} classes; {'; '.join(differ)})")
    return train, val


class SkippingFolder(Dataset):
    """Evaluation-transformed items of a *training* folder (the kNN monitor's bank): an unreadable file, which
    training skips and counts, becomes a blank image labelled -1 that the bank leaves out, instead of an error
    that would stop the run at its first kNN epoch."""

    def __init__(self, folder: datasets.ImageFolder, transform: Callable) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[index]
        try:
            return self.transform(rgb_loader(path)), label
        except UNREADABLE:
            return self.transform(Image.new("RGB", (8, 8))), -1


class SeededImageFolder(Dataset):
    """An ImageFolder indexed by ``(index, epoch)`` whose transform is seeded from that key.

    An unreadable image is replaced by the next readable one so batch shapes stay equal on every rank;
    each item reports how many files it had to skip, and the training loop counts them. With
    ``skip_unreadable=False`` (evaluation splits) it is an error instead.
    """

    def __init__(self, folder: datasets.ImageFolder, transform: Callable, seed: int, skip_unreadable: bool = True) -> None:
        self.folder, self.transform, self.seed = folder, transform, seed
        self.skip_unreadable = skip_unreadable
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = 0
        while True:
            path, label = self.folder.samples[index]
            if not self.skip_unreadable:
                image = strict_rgb_loader(path)
                break
            try:
                image = rgb_loader(path)
                break
            except UNREADABLE as err:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                skipped += 1
                if skipped >= len(self):
                    raise LGDError(f"no readable image in {self.folder.root}") from None
                index = (index + 1) % len(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label, skipped


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` keys, able to skip a resumed epoch's done part."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
