"""What detection and segmentation transfer share: backbone loading, stage discovery, freezing, the
fine-tuning loop (DDP, AMP, resumable checkpoints, logs) and the run's ``metrics.json``.

A task (``detect`` or ``segment``) hands :func:`fit` a :class:`Task`: its model, training set, a loss
function and an evaluation function. Everything else (optimizer, schedule, checkpoints, signals) lives here,
so both entry points behave the same way.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import ResNet
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from .. import distributed as du
from ..checkpoint import atomic_torch_save, atomic_write_json, backbone_state_dict, resume_path, safe_load
from ..config import opt, save_config
from ..convert import split_classifier, verify_torchvision_load
from ..data import NORMALIZATIONS, EpochSampler, ignore_stop_signals, loader_workers, normalization, own_generator
from ..errors import LGDError
from ..models import build_backbone
from ..toyworld import default_home
from ..train import RunLog, StopRequested, amp_dtype, stop_after_reached

TRANSFER_ARCHES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
STAGE_STRIDES = (2, 4, 8, 16, 32)  # ``trainable_layers`` counts these stages from the top
PYRAMID_STRIDES = (4, 8, 16, 32)  # the feature maps FPN and the segmentation heads read
CHECKPOINT_FORMAT = "lgd-transfer"
CHECKPOINT_VERSION = 1
NORMS = ("frozen", "bn", "syncbn")
SCHEDULES = ("step", "cosine", "poly")
STEP_MILESTONES = (8 / 12, 11 / 12)  # the 1x/2x/3x convention: x0.1 at epochs 8 and 11 of 12 (16, 22 of 24)
# Keys a resumed run must share with its checkpoint: they shape the model, the data order or the schedule, or
# live in the optimizer state that a resume restores (a new value would be silently ignored). Paths, intervals,
# workers, precision, lr, backbone_lr_mult and clip_grad (applied afresh every step) may change.
RECIPE_KEYS = ("normalization", "momentum", "warmup_ratio", "seed", "norm", "trainable_layers", "optimizer",
               "weight_decay", "schedule", "min_lr", "warmup_iters", "epochs", "batch_size")




@dataclass
class TransferConfig:
    """Keys shared by ``lgd.transfer.detect`` and ``lgd.transfer.segment`` (each adds its own recipe)."""

    data: str = field(default="", metadata=opt("dataset root, or 'demo' for a generated one (cached)"))
    backbone: str = field(default="", metadata=opt(
        "LGD checkpoint, torchvision state_dict (with --arch), or 'none' (random init, a baseline)"))
    arch: str = field(default="", metadata=opt("backbone architecture ('' = the one the LGD checkpoint names)"))
    normalization: str = field(default="clip", metadata=opt(
        "input mean/std: clip (what LGD students were distilled with) or imagenet (torchvision weights)",
        choices=sorted(NORMALIZATIONS)))
    momentum: float = field(default=0.9, metadata=opt("SGD momentum"))
    warmup_ratio: float = field(default=0.001, metadata=opt("learning-rate factor at step 0 of the linear warm-up"))
    workers: int = field(default=4, metadata=opt("data-loading processes per rank"))
    output: str = field(default="", metadata=opt("run folder (checkpoints, logs, config, metrics.json)"))
    resume: str = field(default="", metadata=opt(
        "'auto' (the run folder's last checkpoint, if any) or a checkpoint path"))
    seed: int = field(default=0, metadata=opt("seed of head initialisation, data order and augmentation"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    amp: str = field(default="auto", metadata=opt("autocast: auto (bf16 on GPU, fp16 before Ampere; off on CPU), "
                                                  "bf16, fp16, off",
                                                  choices=["auto", "bf16", "fp16", "off"]))
    val_interval: int = field(default=1, metadata=opt("evaluate every N epochs (and after the last)"))
    save_interval: int = field(default=0, metadata=opt(
        "also keep checkpoint_epNNNN.pth every N epochs (0: only the last)"))
    log_interval: int = field(default=20, metadata=opt("steps between log lines"))
    stop_after: int = field(default=0, metadata=opt("exit cleanly after N epochs of this run (time-limited jobs)"))
    cache_dir: str = field(default="", metadata=opt(
        "where --data demo is generated (default $LGD_HOME or ~/.cache/lgd)"))
    # Recipe keys: every task re-declares them with its own defaults.
    norm: str = field(default="syncbn", metadata=opt("backbone BatchNorm", choices=list(NORMS)))
    trainable_layers: int = field(default=5, metadata=opt("backbone stages trained, from the top (0-5)"))
    optimizer: str = field(default="sgd", metadata=opt("optimizer", choices=["sgd", "adamw"]))
    lr: float = field(default=0.01, metadata=opt("peak learning rate (for the whole global batch)"))
    weight_decay: float = field(default=1e-4, metadata=opt("weight decay"))
    backbone_lr_mult: float = field(default=1.0, metadata=opt("learning-rate multiplier of the backbone"))
    clip_grad: float = field(default=0.0, metadata=opt("max gradient norm (0: no clipping)"))
    schedule: str = field(default="step", metadata=opt("lr decay after warm-up", choices=list(SCHEDULES)))
    min_lr: float = field(default=0.0, metadata=opt("learning rate the poly/cosine decay ends at"))
    warmup_iters: int = field(default=0, metadata=opt("linear warm-up steps"))
    epochs: int = field(default=12, metadata=opt("training epochs"))
    batch_size: int = field(default=16, metadata=opt("global batch size (split over all ranks)"))


def check_common(cfg: TransferConfig) -> None:
    """Reject values that would only fail (or silently misbehave) later."""
    for key in ("epochs", "batch_size", "val_interval", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise LGDError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.batch_size % du.world_size():
        raise LGDError(f"batch_size {cfg.batch_size} is not divisible by the world size {du.world_size()}")
    if not 0 <= cfg.trainable_layers <= len(STAGE_STRIDES):
        raise LGDError(f"trainable_layers must be in 0..{len(STAGE_STRIDES)}, got {cfg.trainable_layers}")
    if cfg.norm not in NORMS:
        raise LGDError(f"norm must be one of {', '.join(NORMS)}, got {cfg.norm!r}")
    if cfg.schedule not in SCHEDULES:
        raise LGDError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 <= cfg.min_lr < cfg.lr:
        raise LGDError(f"need 0 <= min_lr < lr, got min_lr={cfg.min_lr:g}, lr={cfg.lr:g}")
    if not cfg.output:
        raise LGDError("no --output given: name a run folder for checkpoints, logs and metrics.json")


def image_stats(name: str) -> tuple[list[float], list[float]]:
    """(mean, std) of the named input normalisation (``clip`` or ``imagenet``)."""
    norm = normalization(name)
    return list(norm.mean), list(norm.std)


def demo_root(cfg: TransferConfig, kind: str, make: Callable[[Path], None]) -> Path:
    """``cfg.data``, or for ``demo`` the generated data set of ``kind`` (made once, by local rank 0)."""
    if cfg.data != "demo":
        if not cfg.data:
            raise LGDError("no --data given: pass the dataset root, or 'demo' for a small generated data set")
        return Path(cfg.data)
    root = Path(cfg.cache_dir or default_home()) / "transfer-demo" / kind
    with du.local_main_first():
        if not (root / "DONE").is_file():
            make(root)
            (root / "DONE").write_text("generated by lgd.transfer.synthetic\n")
    return root


# ------------------------------------------------------------------------------------------------ backbone
def load_backbone(source: str, arch: str) -> tuple[str, nn.Module, str]:
    """``(arch, torchvision model without classifier, report)`` with the backbone weights strictly loaded.

    ``source`` is an LGD checkpoint, a torchvision state_dict (``arch`` required: it does not say) or
    ``none`` for a randomly initialised baseline.
    """
    if source == "none":
        if not arch:
            raise LGDError("--backbone none (random initialisation) needs --arch")
        _check_arch(arch)
        model, _ = build_backbone(arch)
        return arch, model, f"{arch} backbone randomly initialised (--backbone none): a baseline without pre-training"
    if not source:
        raise LGDError("no --backbone given: pass an LGD checkpoint (e.g. runs/lgd/checkpoint_last.pth), "
                       "a torchvision state_dict with --arch, or 'none' for a random-init baseline")
    found, sd = backbone_state_dict(source)
    if found and arch and found != arch:
        raise LGDError(f"{source} holds a {found} backbone, but --arch is {arch}; drop --arch or pick {found}")
    arch = found or arch
    if not arch:
        raise LGDError(f"{source} is a plain state_dict that does not name its architecture; pass --arch")
    _check_arch(arch)
    report = verify_torchvision_load(arch, sd, str(source))  # one clear message for any mismatch
    with torch.device("meta"):  # every tensor comes from the checkpoint: skip the random initialisation
        model, _ = build_backbone(arch)
    model.load_state_dict(split_classifier(arch, sd)[0], strict=True, assign=True)
    return arch, model, f"{source} {report}"


def _check_arch(arch: str) -> None:
    if arch not in TRANSFER_ARCHES:
        raise LGDError(f"no transfer wiring for {arch!r}; supported: {', '.join(TRANSFER_ARCHES)}")


@dataclass
class Unit:
    """One step of the backbone's forward pass: a ResNet block or stem layer, a MobileNetV2 block."""

    child: str  # name of the top-level child of the body that holds it
    module: nn.Module
    stride: int  # output stride after this unit, in the undilated network
    channels: int


@dataclass
class Stages:
    """The backbone as a sequence of units, with their output strides measured by a forward pass."""

    body: nn.Module  # what IntermediateLayerGetter walks: the ResNet itself, MobileNetV2's ``features``
    units: list[Unit]

    def tap(self, stride: int) -> str:
        """Top-level child whose output is the last feature map at ``stride``."""
        index = max(i for i, u in enumerate(self.units) if u.stride == stride)
        if index + 1 < len(self.units) and self.units[index + 1].child == self.units[index].child:
            raise LGDError(f"internal error: stride {stride} ends inside {self.units[index].child}")
        return self.units[index].child

    def channels(self, stride: int) -> int:
        return [u.channels for u in self.units if u.stride == stride][-1]

    def stage(self, stride: int) -> list[nn.Module]:
        return [u.module for u in self.units if u.stride == stride]


@torch.no_grad()
def find_stages(model: nn.Module) -> Stages:
    """Split a ResNet / MobileNetV2 into units and measure each unit's output stride and width.

    Measuring (rather than tabulating) gives MobileNetV2's stage ends from the architecture: the last
    block at each stride is ``features[3]``, ``[6]``, ``[13]``, ``[18]`` (24, 32, 96 and 1280 channels).
    """
    if isinstance(model, ResNet):
        body, named = model, []
        for name, child in model.named_children():
            if name == "avgpool":
                break
            named += [(name, block) for block in child] if name.startswith("layer") else [(name, child)]
    elif isinstance(model, MobileNetV2):
        body = model.features
        named = list(body.named_children())
    else:
        raise LGDError(f"no transfer wiring for {type(model).__name__}; supported: {', '.join(TRANSFER_ARCHES)}")
    was_training = model.training
    model.eval()
    size = 64
    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)  # "meta" works: shapes only
    units = []
    for name, module in named:
        x = module(x)
        units.append(Unit(name, module, size // x.shape[-1], x.shape[1]))
    model.train(was_training)
    strides = sorted({u.stride for u in units})
    if strides != list(STAGE_STRIDES):
        raise LGDError(f"internal error: {type(model).__name__} has output strides {strides}, expected {STAGE_STRIDES}")
    return Stages(body, units)


def freeze_batchnorm(root: nn.Module, only: set[int] | None = None) -> None:
    """Replace ``BatchNorm2d`` modules (all, or those whose ``id`` is in ``only``) by ``FrozenBatchNorm2d``.

    Frozen stages need frozen statistics too: a BatchNorm in train mode would keep updating them.
    """
    for name, child in root.named_children():
        if isinstance(child, nn.BatchNorm2d) and (only is None or id(child) in only):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(root, name, frozen)
        else:
            freeze_batchnorm(child, only)


def apply_norm_and_freezing(stages: Stages, norm: str, trainable_layers: int) -> str:
    """Freeze the bottom ``5 - trainable_layers`` stages (weights and BN) and, for ``norm=frozen``, all BN."""
    frozen_strides = STAGE_STRIDES[: len(STAGE_STRIDES) - trainable_layers]
    frozen_modules = [m for s in frozen_strides for m in stages.stage(s)]
    ids = {id(m) for module in frozen_modules for m in module.modules()}
    freeze_batchnorm(stages.body, None if norm == "frozen" else ids)
    for module in frozen_modules:
        module.requires_grad_(False)
    trained = ", ".join(f"/{s}" for s in STAGE_STRIDES if s not in frozen_strides) or "none"
    return f"backbone stages trained (by output stride): {trained}; BatchNorm: {norm}"


# ------------------------------------------------------------------------------------------------ training
@dataclass
class Task:
    """What a transfer task gives the shared loop."""

    name: str
    arch: str
    model: nn.Module
    backbone: nn.Module  # its parameters get ``lr * backbone_lr_mult``
    train_set: Dataset
    loss: Callable[[nn.Module, Any, torch.device], dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module, torch.device, torch.dtype | None], dict[str, Any]]
    meta: dict[str, Any]  # class list etc.: saved in checkpoints, must match on resume
    collate: Callable[[list[Any]], Any] | None = None
    recipe_keys: tuple[str, ...] = ()  # the task's own config keys that a resume must not change


def lr_factor(step: int, total: int, cfg: TransferConfig) -> float:
    """Multiplier of the peak learning rate: linear warm-up (from ``warmup_ratio``) times the decay, which for
    poly and cosine goes from 1 to ``min_lr / lr`` (mmengine's ``eta_min``)."""
    progress = min(step, total) / max(1, total)
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "step":
        factor = 0.1 ** sum(progress >= m for m in STEP_MILESTONES)
    elif cfg.schedule == "cosine":
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = floor + (1.0 - floor) * (1.0 - progress) ** 0.9
    if step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor


def build_optimizer(cfg: TransferConfig, model: nn.Module, backbone: nn.Module) -> torch.optim.Optimizer:
    backbone_ids = {id(p) for p in backbone.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in backbone_ids], "lr_mult": cfg.backbone_lr_mult},
        {"params": [p for p in trainable if id(p) not in backbone_ids], "lr_mult": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise LGDError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")


@dataclass
class State:
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # steps already taken in epoch ``epoch`` (after a mid-epoch stop)
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, cfg: TransferConfig, task: Task, state: State, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler) -> None:
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "task": task.name, "arch": task.arch,
        "meta": task.meta, "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
        "step": state.step, "metrics": state.metrics, "config": dataclasses.asdict(cfg),
        "rng": {"torch": torch.get_rng_state()},
    }, path)


def resume_checkpoint(cfg: TransferConfig, out: Path, task: Task, state: State, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler) -> None:
    """Load ``--resume`` into the model, optimizer and ``state``; refuse another task, arch or class list."""
    path = resume_path(cfg.resume, out)
    if path is None:
        return
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise LGDError(f"cannot resume from {path}: not a checkpoint of lgd.transfer (no format={CHECKPOINT_FORMAT!r})")
    for key, want in (("task", task.name), ("arch", task.arch), ("meta", task.meta)):
        if ckpt.get(key) != want:
            raise LGDError(f"cannot resume from {path}: its {key} is {ckpt.get(key)!r}, this run's is {want!r}")
    saved = ckpt.get("config", {})
    changed = [f"{key} {saved[key]!r} -> {getattr(cfg, key)!r}" for key in (*RECIPE_KEYS, *task.recipe_keys)
               if key in saved and saved[key] != getattr(cfg, key)]
    if changed:
        raise LGDError(f"cannot resume from {path}: the recipe changed ({'; '.join(changed)}); resume with the "
                       "checkpoint's values, or start a new run in another --output")
    task.model.load_state_dict(ckpt["model"])
    mults = [group["lr_mult"] for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, mult in zip(optimizer.param_groups, mults):  # this run's --lr/--backbone-lr-mult apply
        group["lr_mult"] = mult
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.epoch, state.batch_in_epoch, state.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
    state.metrics = dict(ckpt.get("metrics", {}))
    if du.is_main():
        print(f"resumed from {path}: epoch {state.epoch}, step {state.step}")


def _train_epoch(cfg: TransferConfig, task: Task, model: nn.Module, loader: DataLoader, state: State,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                 autocast: torch.dtype | None, per_epoch: int, stop: StopRequested, log: RunLog) -> bool:
    """One pass over the loader; returns whether a signal asked to stop."""
    model.train()
    total = per_epoch * cfg.epochs
    params = [p for g in optimizer.param_groups for p in g["params"]]
    running: dict[str, float] = {}
    window_start, window_steps = time.time(), 0
    bar = tqdm(total=per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not du.is_main(), dynamic_ncols=True)
    for batch in loader:
        factor = lr_factor(state.step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_mult"] * factor
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            losses = task.loss(model, batch, device)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise LGDError(f"loss is {loss.item()} at step {state.step}; lower --lr, raise --warmup-iters, "
                           "or use --amp bf16/off instead of fp16")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()

        state.step += 1
        state.batch_in_epoch += 1
        for name, value in {"loss": loss, **losses}.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        window_steps += 1
        bar.update()
        if window_steps == cfg.log_interval or state.batch_in_epoch == per_epoch:
            means = {k: v / window_steps for k, v in running.items()}
            img_s = window_steps * cfg.batch_size / (time.time() - window_start)
            lr = optimizer.param_groups[-1]["lr"]
            log.write({"type": "train", "epoch": state.epoch, "step": state.step, **means, "lr": lr,
                       "img_per_s": img_s}, state.step)
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{img_s:.1f}")
            running, window_start, window_steps = {}, time.time(), 0
        if stop.agreed(device, state.step):
            bar.close()
            return True
    bar.close()
    return False


def evaluate(cfg: TransferConfig, task: Task, model: nn.Module, state: State, last: Path,
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
             autocast: torch.dtype | None, log: RunLog) -> None:
    """Score the model on the val set, log the numbers and save them into the last checkpoint."""
    model.eval()
    metrics = task.evaluate(model, device, autocast)
    model.train()
    log.write({"type": "val", "epoch": state.epoch, "step": state.step,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}, state.step)
    state.metrics = {**metrics, "metrics_epoch": state.epoch}  # the epoch the numbers come from
    if du.is_main():
        save_checkpoint(last, cfg, task, state, optimizer, scaler)


def fit(cfg: TransferConfig, task: Task, device: torch.device, notes: list[str]) -> dict[str, Any]:
    """Fine-tune ``task.model`` (resuming if asked), evaluate, and write ``metrics.json``; return it."""
    start_time = time.time()
    out = Path(cfg.output)
    if du.is_main():
        out.mkdir(parents=True, exist_ok=True)
    autocast = amp_dtype(cfg, device)  # type: ignore[arg-type]  # reads only cfg.amp
    model = task.model.to(device)
    if cfg.norm == "syncbn" and du.is_dist():
        if device.type == "cuda":
            model = task.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif du.is_main():
            notes.append("norm=syncbn: SyncBatchNorm needs CUDA, so each CPU process normalises its own batch")
    optimizer = build_optimizer(cfg, model, task.backbone)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    train_model: nn.Module = model
    if du.is_dist():
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    local_batch = cfg.batch_size // du.world_size()
    sampler = EpochSampler(task.train_set, du.world_size(), du.rank(), seed=cfg.seed)
    per_epoch = sampler.num_samples // local_batch
    if per_epoch == 0:
        raise LGDError(f"the training set has {len(task.train_set)} images, fewer than one batch of {cfg.batch_size}")
    loader = DataLoader(task.train_set, batch_size=local_batch, sampler=sampler, num_workers=loader_workers(cfg.workers),
                        collate_fn=task.collate, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=own_generator(cfg.seed))

    state = State()
    resume_checkpoint(cfg, out, task, state, optimizer, scaler)
    du.require_resumed_alike((state.epoch, state.batch_in_epoch, state.step), cfg.resume, device)
    if du.is_main():  # only now: a refused resume must not overwrite the config of the run it refused
        save_config(cfg, out / "config.yaml")
        print(f"{task.name}: {len(task.train_set)} training images; {per_epoch} steps/epoch x {cfg.epochs} epochs, "
              f"batch {cfg.batch_size} on {du.world_size()} process(es), {device}, amp={autocast}")

    log = RunLog(out, du.is_main(), state.step)
    stop = StopRequested()
    first_epoch = state.epoch
    last = out / "checkpoint_last.pth"
    try:
        while state.epoch < cfg.epochs:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch * local_batch)
            if _train_epoch(cfg, task, train_model, loader, state, optimizer, scaler, device, autocast,
                            per_epoch, stop, log):
                stop.save_and_exit(lambda: save_checkpoint(last, cfg, task, state, optimizer, scaler),
                                   state.epoch, state.step, last)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            done = state.epoch == cfg.epochs
            if du.is_main():  # the epoch's training is safe before an evaluation can fail
                save_checkpoint(last, cfg, task, state, optimizer, scaler)
            if done or state.epoch % cfg.val_interval == 0:
                evaluate(cfg, task, model, state, last, optimizer, scaler, device, autocast, log)
            if du.is_main() and cfg.save_interval and state.epoch % cfg.save_interval == 0:
                save_checkpoint(out / f"checkpoint_ep{state.epoch:04d}.pth", cfg, task, state, optimizer, scaler)
            du.barrier()
            if stop_after_reached(cfg.stop_after, state.epoch - first_epoch, done):
                break
        if state.epoch == cfg.epochs and state.metrics.get("metrics_epoch") != state.epoch:
            evaluate(cfg, task, model, state, last, optimizer, scaler, device, autocast, log)  # it failed last time
    finally:
        stop.restore()
        log.close()

    result = {"task": task.name, "arch": task.arch, **state.metrics, "epochs": state.epoch, "steps": state.step,
              "world_size": du.world_size(), "seconds": round(time.time() - start_time, 1),
              "checkpoint": str(last.resolve()), "notes": notes}
    if du.is_main():
        atomic_write_json(out / "metrics.json", result)
        for note in notes:
            print(f"note: {note}")
        print(f"metrics: {out / 'metrics.json'}")
    return result
