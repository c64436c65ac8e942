"""Linear probe of a pre-trained student: ``python -m lgd.lincls`` (one process) or ``torchrun -m lgd.lincls``.

The backbone (from an LGD checkpoint, or a torchvision state_dict written by ``lgd.convert``) is frozen with
BatchNorm in eval mode, and one linear layer is trained on its pooled features with the MoCo protocol the
LGD authors use: SGD momentum 0.9, wd 0, lr 30 x batch/256, 100 epochs, 5 warm-up, x0.1 at 60 and 80.

Two modes: the standard one runs the backbone on freshly augmented images every epoch (paper numbers); with
``--cached-features`` the features are extracted once (center crop, or N fixed augmented views) into a
memory-mapped ``.npy`` in the run folder, and the epochs only train the linear layer (sweeps in minutes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from . import distributed as du
from .cache import dataset_fingerprint
from .checkpoint import atomic_torch_save, atomic_write_json, backbone_state_dict, is_lgd_checkpoint, resume_path, safe_load
from .config import opt, parse_config, save_config
from .convert import split_classifier, verify_torchvision_load
from .data import (NORMALIZATIONS, VIEW_INTERPOLATION, EpochSampler, SeededImageFolder, eval_transform, ignore_stop_signals,
                   loader_workers, normalization, own_generator, sample_seed, train_val_folders)
from .errors import LGDError, cli_entry
from .evaluate import accuracy_from_hits, topk_hits
from .models import build_backbone
from .toyworld import ensure_toy_world
from .train import RunLog, StopRequested, amp_dtype, stop_after_reached

TOY_HINT = "train the toy-world student first with `bash scripts/train.sh`"


@dataclass
class LinclsConfig:
    """Defaults are the authors' linear-probe protocol on ImageNet (MoCo's ``main_lincls``)."""

    checkpoint: str = field(default="", metadata=opt("LGD checkpoint, or a torchvision backbone state_dict (lgd.convert)"))
    arch: str = field(default="", metadata=opt("student architecture; read from an LGD checkpoint, required for a plain state_dict"))
    data: str = field(default="", metadata=opt("ImageFolder root with train/ and val/, or 'toy'"))
    norm: str = field(default="clip", metadata=opt("input normalisation the backbone was trained with (LGD: clip)",
                                                    choices=sorted(NORMALIZATIONS)))
    image_size: int = field(default=0, metadata=opt("crop size (val: resize size*256/224, center crop); 0 = the LGD "
                                                     "checkpoint's training resolution, 224 for a torchvision state_dict"))
    augment: bool = field(default=True, metadata=opt("RandomResizedCrop + flip for training (--no-augment: center crop)"))
    train_fraction: float = field(default=1.0, metadata=opt("class-balanced seeded fraction of train/ (paper: 0.01, 0.1, 1.0)"))
    cached_features: bool = field(default=False, metadata=opt("extract backbone features once to a memory-mapped file"))
    cached_views: int = field(default=0, metadata=opt("with --cached-features: 0 = one center crop per image, "
                                                       "N = N fixed augmented views (N x images x width x 4 bytes on disk)"))
    feature_cache: str = field(default="", metadata=opt("folder of the cached features ('' = OUTPUT/features); probes "
                                                         "sharing one extract each backbone's features once"))
    epochs: int = field(default=100, metadata=opt("training epochs"))
    batch_size: int = field(default=256, metadata=opt("global batch size (split over all ranks)"))
    base_lr: float = field(default=30.0, metadata=opt("learning rate per 256 images (lr = base_lr * batch/256)"))
    momentum: float = field(default=0.9, metadata=opt("SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=opt("weight decay"))
    warmup_epochs: int = field(default=5, metadata=opt("linear warm-up epochs"))
    lr_steps: str = field(default="60,80", metadata=opt("epochs at which the lr is multiplied by lr_decay (comma-separated)"))
    lr_decay: float = field(default=0.1, metadata=opt("lr factor at each of lr_steps"))
    workers: int = field(default=8, metadata=opt("data-loading processes per rank"))
    output: str = field(default="runs/lincls", metadata=opt("run folder (probe checkpoint, features, logs, metrics)"))
    resume: str = field(default="", metadata=opt("'auto' (the run folder's last probe checkpoint, if any) or a path"))
    seed: int = field(default=0, metadata=opt("seed of the subset, the fc init, data order and augmentation"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    amp: str = field(default="auto", metadata=opt("autocast of the backbone: auto (bf16 on GPU, fp16 before Ampere; off on CPU), "
                                                   "bf16, fp16, off",
                                                   choices=["auto", "bf16", "fp16", "off"]))
    eval_interval: int = field(default=10, metadata=opt("evaluate on val/ every N epochs (and at the end)"))
    log_interval: int = field(default=20, metadata=opt("steps between log lines"))
    stop_after: int = field(default=0, metadata=opt("exit cleanly after N epochs of this run (time-limited jobs)"))


def milestones(cfg: LinclsConfig) -> list[int]:
    try:
        return sorted(int(s) for s in cfg.lr_steps.split(",") if s.strip())
    except ValueError:
        raise LGDError(f"lr_steps must be comma-separated epochs like '60,80', got {cfg.lr_steps!r}") from None


def check_config(cfg: LinclsConfig) -> None:
    if not cfg.checkpoint:
        raise LGDError("no --checkpoint given: pass an LGD checkpoint or a torchvision state_dict "
                       "(`bash scripts/lincls.sh` with no arguments probes the toy-world run)")
    if not cfg.data:
        raise LGDError("no --data given: pass an ImageFolder root with train/ and val/, or 'toy'")
    for key in ("epochs", "batch_size", "eval_interval", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise LGDError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.image_size < 0:
        raise LGDError(f"image_size must be positive (or 0: the checkpoint's), got {cfg.image_size}")
    if not 0.0 < cfg.train_fraction <= 1.0:
        raise LGDError(f"train_fraction must be in (0, 1], got {cfg.train_fraction}")
    if cfg.cached_views < 0:
        raise LGDError(f"cached_views must be >= 0, got {cfg.cached_views}")
    if cfg.cached_views and not (cfg.cached_features and cfg.augment):
        raise LGDError("--cached-views N stores N augmented views for --cached-features; it needs --cached-features "
                       "and augmentation (drop --no-augment)")
    if cfg.batch_size % du.world_size():
        raise LGDError(f"batch_size {cfg.batch_size} is not divisible by the world size {du.world_size()}")
    milestones(cfg)


# ------------------------------------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    """A loaded backbone and what the checkpoint says about it."""

    arch: str
    module: nn.Module
    feature_dim: int
    image_size: int | None  # the pre-training resolution, when the checkpoint records it
    source: str  # one line for the log: what was loaded


def load_backbone(path: str | os.PathLike, arch: str = "", data: str = "") -> Backbone:
    """The student backbone of an LGD checkpoint or a torchvision state_dict, without any head.

    A torchvision state_dict must hold every backbone tensor and nothing but them (its classifier may be
    absent or present; it is dropped); an LGD checkpoint of another architecture than ``arch`` is refused.
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; {TOY_HINT}" if data == "toy" else ""
        raise LGDError(f"checkpoint not found: {path}{hint}")
    obj = safe_load(path)
    found, sd = backbone_state_dict(obj if is_lgd_checkpoint(obj) else path)
    if found and arch and found != arch:
        raise LGDError(f"{path} holds a {found} student, not {arch}; drop --arch or pass the {found} config")
    arch = found or arch
    if not arch:
        raise LGDError(f"{path} is a plain state_dict that does not name its architecture; pass --arch")
    report = verify_torchvision_load(arch, sd, str(path))
    module, feature_dim = build_backbone(arch)
    module.load_state_dict(split_classifier(arch, sd)[0])
    image_size = obj.get("config", {}).get("image_size") if found else None
    kind = "LGD checkpoint" if found else "torchvision state_dict"
    return Backbone(arch, module, feature_dim, image_size, f"{kind} {path} ({arch}): {report}")


class FrozenBackbone(nn.Module):
    """A backbone that never trains: no gradients, BatchNorm statistics fixed (eval mode even in ``train()``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(images).flatten(1).float()


def linear_classifier(feature_dim: int, num_classes: int) -> nn.Linear:
    """The probe's fc, initialised N(0, 0.01) with zero bias (MoCo's ``main_lincls``)."""
    fc = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------------------------------------------- data
def balanced_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded subset that keeps ``fraction`` of every class (at least one image each).

    Sampling per class keeps the class histogram of the full set (1% of ImageNet: 7-13 images of every
    class) instead of a random draw that misses some classes.
    """
    if fraction >= 1.0:
        return list(range(len(targets)))
    labels = torch.as_tensor(list(targets))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return sorted(torch.cat(chosen).tolist())


def restrict(folder: datasets.ImageFolder, indices: Sequence[int]) -> datasets.ImageFolder:
    """Keep only ``indices`` of an ImageFolder (in place, order kept); classes stay the same."""
    folder.samples = [folder.samples[i] for i in indices]
    folder.imgs = folder.samples
    folder.targets = [label for _, label in folder.samples]
    return folder


def train_transform(size: int, norm: str) -> transforms.Compose:
    """The probe's augmentation: RandomResizedCrop (default scale) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=VIEW_INTERPOLATION),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalization(norm),
    ])


class CachedFeatures(Dataset):
    """Pre-extracted features [V, N, d] (memory-mapped); a batch of ``(index, epoch)`` keys picks one view each.

    The view of a sample is a seeded function of (seed, epoch, index), like the augmentation of the
    standard mode, so a resumed run sees the same views.
    """

    def __init__(self, features: np.ndarray, targets: np.ndarray, seed: int) -> None:
        self.features, self.seed = features, seed
        self.targets = torch.as_tensor(targets)

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.array([i for i, _ in keys])
        views = self.features.shape[0]
        view = np.array([sample_seed(self.seed, e, i) % views for i, e in keys]) if views > 1 else np.zeros_like(index)
        return torch.from_numpy(np.ascontiguousarray(self.features[view, index])), self.targets[index]


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def feature_cache_path(folder: Path, split: str, identity: dict[str, Any]) -> Path:
    """``<folder>/<split>-<key>.npy``; the key changes with anything that changes the features (and nothing
    else: probes of one backbone with other learning rates or seeds of a center-crop run share the file)."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{split}-{key}.npy"


@torch.no_grad()
def extract_features(backbone: FrozenBackbone, feature_dim: int, dataset: SeededImageFolder, views: int, path: Path,
                     batch_size: int, workers: int, device: torch.device, autocast: torch.dtype | None,
                     desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Write the features of every view of every image to ``path`` (once); return them memory-mapped, with
    the label of each row.

    View ``v`` of image ``i`` is ``dataset[(i, v)]``: the dataset's transform seeded as in epoch ``v``. A row
    of an unreadable image holds the next readable image, so its label is stored with it (``*.labels.npy``)
    rather than taken from the folder's list.

    Every rank fills its own rows of temporary files named by this run's token; rank 0 renames them when all
    are done (labels first), so a features file under the final name is always complete, a later run reuses
    it, and two runs extracting into one shared folder at once do not write into each other's files.
    """
    labels_path = path.with_name(f"{path.stem}.labels.npy")
    if not path.is_file():
        token = int(du.broadcast(torch.tensor([int.from_bytes(os.urandom(4), "little")], device=device)))
        tmp = path.with_name(f".{path.stem}.tmp-{token}.npy")
        labels_tmp = path.with_name(f".{path.stem}.labels.tmp-{token}.npy")
        if du.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            open_memmap(tmp, mode="w+", dtype=np.float32, shape=(max(1, views), len(dataset), feature_dim))
            open_memmap(labels_tmp, mode="w+", dtype=np.int64, shape=(len(dataset),))
        du.barrier()
        store, labels = open_memmap(tmp, mode="r+"), open_memmap(labels_tmp, mode="r+")
        shard = du.shard_indices(len(dataset))
        skipped = 0
        for view in range(max(1, views)):
            keys = [(i, view) for i in shard]
            loader = DataLoader(Subset(dataset, keys), batch_size=batch_size, num_workers=loader_workers(workers),
                                pin_memory=device.type == "cuda")
            rows = iter(shard)
            for images, target, skips in tqdm(loader, desc=f"{desc} (view {view + 1}/{max(1, views)})",
                                              disable=not du.is_main(), leave=False, dynamic_ncols=True):
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    feats = backbone(images.to(device, non_blocking=True)).cpu().numpy()
                index = [next(rows) for _ in range(len(feats))]
                store[view, index] = feats
                labels[index] = target.numpy()
                skipped += int(skips.sum())
        store.flush()
        labels.flush()
        del store, labels
        skipped = int(du.all_reduce_sum(torch.tensor(skipped, device=device)).item())
        if skipped and du.is_main():
            print(f"note: {desc}: {skipped} unreadable image(s) were replaced by the next readable one (see the warnings)")
        du.barrier()
        if du.is_main():
            os.replace(labels_tmp, labels_path)
            os.replace(tmp, path)
        du.barrier()
    return np.load(path, mmap_mode="r"), np.load(labels_path)


# ------------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, per_epoch: int, cfg: LinclsConfig) -> float:
    """Linear warm-up (per step) to ``base_lr * batch/256``, then x``lr_decay`` at each milestone epoch."""
    peak = cfg.base_lr * cfg.batch_size / 256
    warmup = cfg.warmup_epochs * per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    epoch = step // per_epoch
    return peak * cfg.lr_decay ** sum(epoch >= m for m in milestones(cfg))


# ------------------------------------------------------------------------------------------------ training
@dataclass
class ProbeState:
    """Everything the probe checkpoint restores."""

    fc: nn.Linear
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def train_one_epoch(cfg: LinclsConfig, state: ProbeState, backbone: FrozenBackbone | None, fc: nn.Module,
                    loader: DataLoader, per_epoch: int, device: torch.device, autocast: torch.dtype | None,
                    stop: StopRequested | None, log: RunLog | None) -> tuple[bool, int]:
    """One pass; ``backbone`` is None when the loader yields cached features.

    Returns whether a signal stopped it, and how many unreadable images this rank's loader replaced.
    """
    fc.train()
    running = torch.zeros(2, device=device)
    window, skipped = 0, 0
    bar = tqdm(total=per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not du.is_main(), dynamic_ncols=True, leave=False)
    for batch in loader:
        inputs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if len(batch) > 2:  # image batches report the unreadable files they replaced
            skipped += int(batch[2].sum())
        lr = lr_at(state.step, per_epoch, cfg)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        if backbone is not None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                inputs = backbone(inputs)
        logits = fc(inputs.float())
        loss = F.cross_entropy(logits, target)
        if not torch.isfinite(loss):
            raise LGDError(f"loss is {loss.item()} at step {state.step}; lower base_lr")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        running += torch.stack([loss.detach(), (logits.argmax(1) == target).float().mean().detach() * 100])
        window += 1
        bar.update()
        if window == cfg.log_interval or state.batch_in_epoch == per_epoch:
            loss_avg, acc = (running / window).tolist()
            if log is not None:
                log.write({"type": "train", "epoch": state.epoch, "step": state.step, "loss": loss_avg,
                           "train_top1": acc, "lr": lr}, state.step)
            bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc:.1f}", lr=f"{lr:.3g}")
            running.zero_()
            window = 0
        if stop is not None and stop.agreed(device, state.step):
            bar.close()
            return True, skipped
    bar.close()
    return False, skipped


@torch.no_grad()
def evaluate(backbone: FrozenBackbone | None, fc: nn.Module, loader: DataLoader, device: torch.device,
             autocast: torch.dtype | None) -> dict[str, float]:
    """Top-1/top-5 (%) over this rank's shard, summed over all ranks (no padded duplicates)."""
    fc.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # topk_hits' layout: top-1 hits, top-5 hits, images
    for batch in tqdm(loader, desc="evaluating", disable=not du.is_main(), leave=False, dynamic_ncols=True):
        inputs, target = batch[0].to(device, non_blocking=True), batch[1]
        if backbone is not None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                inputs = backbone(inputs)
        counts += topk_hits(fc(inputs.float()), target)
    acc = accuracy_from_hits(du.all_reduce_sum(counts.to(device)).cpu())
    return {"top1": acc[1], "top5": acc[5]}


PROTOCOL_KEYS = ("batch_size", "base_lr", "momentum", "weight_decay", "warmup_epochs", "lr_steps", "lr_decay",
                 "image_size", "norm", "augment", "cached_features", "cached_views")


def probe_identity(cfg: LinclsConfig, arch: str, classes: Sequence[str]) -> dict[str, Any]:
    """What a probe checkpoint belongs to: resuming onto another backbone file or label subset is refused."""
    return {"checkpoint": _file_identity(Path(cfg.checkpoint)), "arch": arch, "classes": list(classes),
            "train_fraction": cfg.train_fraction, "seed": cfg.seed,
            # the schedule is a function of (step, steps per epoch): changing these mid-run would bend it
            **{key: getattr(cfg, key) for key in PROTOCOL_KEYS}}


def save_probe(state: ProbeState, path: Path, cfg: LinclsConfig, identity: dict[str, Any]) -> None:
    atomic_torch_save(
        {
            "format": "lgd-lincls",
            "identity": identity,
            "fc": state.fc.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "step": state.step,
            "config": dataclasses.asdict(cfg),
            "metrics": dict(state.metrics),
        },
        path,
    )


def resume_probe(state: ProbeState, cfg: LinclsConfig, out: Path, identity: dict[str, Any]) -> None:
    """Load ``--resume`` into ``state``; refuse a probe of another backbone, class set or label subset."""
    path = resume_path(cfg.resume, out, "lincls_last.pth")
    if path is None:
        return
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "lgd-lincls":
        raise LGDError(f"cannot resume: {path} is not a linear-probe checkpoint (lincls_last.pth)")
    differ = sorted(k for k in identity if ckpt["identity"].get(k) != identity[k])
    if differ:
        raise LGDError(f"cannot resume from {path}: it probes another {', '.join(differ)} than this run "
                       f"(checkpoint {cfg.checkpoint}); use another --output or drop --resume")
    state.fc.load_state_dict(ckpt["fc"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.epoch, state.batch_in_epoch, state.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
    state.metrics = dict(ckpt.get("metrics", {}))
    if du.is_main():
        print(f"resumed from {path}: epoch {state.epoch}, step {state.step}")


def resolve_data(data: str) -> Path:
    """``'toy'`` is the built-in toy world's image folder; anything else is a path."""
    if data == "toy":
        with du.local_main_first():
            return ensure_toy_world(verbose=du.is_main()).data
    return Path(data)


@dataclass
class ProbeData:
    """Loaders of one probe run. ``images`` is False when they yield cached features instead of images."""

    train_set: Dataset
    train_loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    images: bool
    mode: str


def build_data(cfg: LinclsConfig, root: Path, train_folder: datasets.ImageFolder, val_folder: datasets.ImageFolder,
               backbone: FrozenBackbone, loaded: Backbone, subset: list[int], out: Path, device: torch.device,
               autocast: torch.dtype | None) -> ProbeData:
    """Image loaders (standard mode) or loaders over features extracted once (``--cached-features``)."""
    local_batch = cfg.batch_size // du.world_size()
    val_shard = du.shard_indices(len(val_folder))
    val_transform = eval_transform(cfg.image_size, cfg.norm, VIEW_INTERPOLATION)  # MoCo's protocol: bilinear
    augment = train_transform(cfg.image_size, cfg.norm)
    views = cfg.cached_views if cfg.augment else 0
    if cfg.cached_features:
        common = {"checkpoint": _file_identity(Path(cfg.checkpoint)), "image_size": cfg.image_size, "norm": cfg.norm,
                  "autocast": str(autocast), "interpolation": VIEW_INTERPOLATION.value}
        train_images = SeededImageFolder(train_folder, augment if views else val_transform, cfg.seed)
        folder = Path(cfg.feature_cache) if cfg.feature_cache else out / "features"
        # The images (the seeded label subset) are in the fingerprint; the seed also draws augmented views.
        identity = {**common, "split": str((root / "train").resolve()), "views": views,
                    **({"seed": cfg.seed} if views else {}), "images": dataset_fingerprint(train_folder)}
        train_feats = extract_features(backbone, loaded.feature_dim, train_images, views,
                                       feature_cache_path(folder, "train", identity), local_batch, cfg.workers, device,
                                       autocast, "train features")
        identity = {**common, "split": str((root / "val").resolve()), "views": 0, "images": dataset_fingerprint(val_folder)}
        val_images = SeededImageFolder(val_folder, val_transform, cfg.seed, skip_unreadable=False)
        val_feats = extract_features(backbone, loaded.feature_dim, val_images, 0,
                                     feature_cache_path(folder, "val", identity), local_batch, cfg.workers, device,
                                     autocast, "val features")
        train_set: Dataset = CachedFeatures(*train_feats, cfg.seed)
        sampler = EpochSampler(train_set, du.world_size(), du.rank(), seed=cfg.seed)
        # batch_size=None: the dataset takes a whole batch of keys and slices the memory map once per batch.
        train_loader = DataLoader(train_set, sampler=BatchSampler(sampler, local_batch, drop_last=False),
                                  batch_size=None)
        val_keys = BatchSampler([(i, 0) for i in val_shard], 4096, drop_last=False)
        val_loader = DataLoader(CachedFeatures(*val_feats, cfg.seed), sampler=val_keys,
                                batch_size=None)
        mode = f"cached features ({views} augmented views)" if views else "cached features (center crop)"
        return ProbeData(train_set, train_loader, sampler, val_loader, images=False, mode=mode)
    train_set = SeededImageFolder(train_folder, augment if cfg.augment else val_transform, cfg.seed)
    sampler = EpochSampler(train_set, du.world_size(), du.rank(), seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=loader_workers(cfg.workers),
                              pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                              worker_init_fn=ignore_stop_signals, generator=own_generator(cfg.seed))
    val_folder.transform = val_transform
    val_loader = DataLoader(du.shard(val_folder), batch_size=local_batch, num_workers=loader_workers(cfg.workers),
                            pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                            generator=own_generator())
    mode = "standard" if cfg.augment else "standard (no augmentation)"
    return ProbeData(train_set, train_loader, sampler, val_loader, images=True, mode=mode)


def lincls(cfg: LinclsConfig) -> dict[str, Any]:
    """Run (or resume) one linear probe; return the metrics written to ``lincls_metrics.json``."""
    start_time = time.time()
    device = du.init_distributed(cfg.device)
    check_config(cfg)
    loaded = load_backbone(cfg.checkpoint, cfg.arch, cfg.data)
    cfg = dataclasses.replace(cfg, image_size=cfg.image_size or loaded.image_size or 224)
    root = resolve_data(cfg.data)
    train_folder, val_folder = train_val_folders(root)
    out = Path(cfg.output)
    if du.is_main():
        out.mkdir(parents=True, exist_ok=True)
    autocast = amp_dtype(cfg, device)
    backbone = FrozenBackbone(loaded.module).to(device)
    subset = balanced_subset(train_folder.targets, cfg.train_fraction, cfg.seed)
    restrict(train_folder, subset)
    classes = train_folder.classes

    torch.manual_seed(cfg.seed)
    fc = linear_classifier(loaded.feature_dim, len(classes)).to(device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state = ProbeState(fc, optimizer)
    identity = probe_identity(cfg, loaded.arch, classes)
    resume_probe(state, cfg, out, identity)
    du.require_resumed_alike((state.epoch, state.batch_in_epoch, state.step), cfg.resume, device)
    if du.is_main():  # only now: a refused resume must not overwrite the config of the run it refused
        save_config(cfg, out / "config.yaml")
    model: nn.Module = fc
    if du.is_dist():
        model = DistributedDataParallel(fc, device_ids=[device.index] if device.type == "cuda" else None)

    data = build_data(cfg, root, train_folder, val_folder, backbone, loaded, subset, out, device, autocast)
    local_batch = cfg.batch_size // du.world_size()
    per_epoch = -(-data.sampler.num_samples // local_batch)
    if du.is_main():
        print(f"linear probe: {loaded.source}\n  {len(train_folder)} training images ({cfg.train_fraction:g} of "
              f"{root / 'train'}), {len(val_folder)} val images, {len(classes)} classes; {data.mode} mode; "
              f"{per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} on {du.world_size()} "
              f"process(es), {device}")

    train_backbone = backbone if data.images else None
    log = RunLog(out, du.is_main(), state.step)
    stop = StopRequested()
    last = out / "lincls_last.pth"
    first_epoch = state.epoch
    try:
        while state.epoch < cfg.epochs:
            data.sampler.set_epoch(state.epoch, skip=state.batch_in_epoch * local_batch)
            stopped, skipped = train_one_epoch(cfg, state, train_backbone, model, data.train_loader, per_epoch, device,
                                               autocast, stop, log)
            if stopped:
                stop.save_and_exit(lambda: save_probe(state, last, cfg, identity), state.epoch, state.step, last)
            skipped = int(du.all_reduce_sum(torch.tensor(skipped, device=device)).item())
            if skipped and du.is_main():
                print(f"note: epoch {state.epoch + 1}: {skipped} unreadable training image(s) were replaced by the next "
                      "readable one (see the warnings)")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            done = state.epoch == cfg.epochs
            if done or state.epoch % cfg.eval_interval == 0:
                state.metrics = evaluate(train_backbone, fc, data.val_loader, device, autocast)
                log.write({"type": "val", "epoch": state.epoch, "step": state.step, **state.metrics}, state.step)
                state.metrics["metrics_epoch"] = state.epoch
                if du.is_main():
                    print(f"epoch {state.epoch}: linear probe top-1 {state.metrics['top1']:.2f}%, "
                          f"top-5 {state.metrics['top5']:.2f}%")
            if du.is_main():
                save_probe(state, last, cfg, identity)
            if stop_after_reached(cfg.stop_after, state.epoch - first_epoch, done):
                break
    finally:
        stop.restore()
        log.close()

    # A run ended by --stop-after is not a result yet: say so, and which epoch the numbers (if any) are from.
    result = {**state.metrics, "epochs": state.epoch, "complete": state.epoch == cfg.epochs,
              "train_fraction": cfg.train_fraction,
              "checkpoint": str(Path(cfg.checkpoint).resolve()), "dataset": str(root.resolve()), "arch": loaded.arch,
              "num_classes": len(classes), "num_train_images": len(train_folder), "num_val_images": len(val_folder),
              "mode": data.mode, "seconds": round(time.time() - start_time, 1)}
    if du.is_main():
        atomic_write_json(out / "lincls_metrics.json", result)
        print("\n== linear probe summary ==")
        if "top1" in state.metrics:
            print(f"top-1: {state.metrics['top1']:.2f}%  top-5: {state.metrics['top5']:.2f}%")
        print(f"epochs: {state.epoch}/{cfg.epochs}, labels: {cfg.train_fraction:g} ({len(train_folder)} images), "
              f"time: {result['seconds']}s")
        if not result["complete"]:
            measured = f"top-1 above is from epoch {state.metrics['metrics_epoch']}; " if "top1" in state.metrics else ""
            print(f"incomplete: {measured}continue with --resume auto for the final numbers")
        print(f"metrics: {out / 'lincls_metrics.json'}")
    du.cleanup()
    return result


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(LinclsConfig, argv, description="Linear probe of a frozen student backbone "
                       "(configs/lincls_imagenet.yaml: the authors' protocol)")
    return lincls(cfg)


if __name__ == "__main__":
    main()
