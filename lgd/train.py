"""LGD pre-training: ``python -m lgd.train`` (one process) or ``torchrun -m lgd.train`` (DDP).

Read top to bottom: config -> teacher and TSB -> student, VSB, optimizer -> data -> resume -> the epoch
loop (``train_one_epoch``: teacher forward, student forward, LGD loss, step, LGKA update of the VSB) ->
checkpoint and zero-shot evaluation -> summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import clip

from . import distributed as du
from .banks import VisualSemanticsBank, class_text, load_or_build_tsb
from .checkpoint import FORMAT, VERSION, atomic_file, atomic_torch_save, atomic_write_json, load_checkpoint, resume_path
from .config import opt, parse_config, save_config
from .cache import CachedViewDataset, open_teacher_cache, teacher_embeddings
from .data import (EpochSampler, SeededImageFolder, SkippingFolder, eval_transform, ignore_stop_signals, image_folder,
                   loader_workers, own_generator)
from .errors import LGDError, cli_entry
from .evaluate import (accuracy_from_hits, align_classes, class_mismatch_warning, embed_dataset, topk_hits,
                       zero_shot_logits)
from .knn import knn_monitor
from .losses import lgd_loss
from .models import LGDStudent, available_students, build_student
from .toyworld import default_home, ensure_toy_world
from .views import MocoV2View, check_teacher_resolution


@dataclass
class TrainConfig:
    """Defaults are the authors' recipe (RN50 teacher, ResNet-18 student, 200 epochs, batch 2048)."""

    data: str = field(default="", metadata=opt("ImageFolder root with train/ (and optional val/), or 'toy'"))
    text: str = field(default="folder", metadata=opt("class names of the banks: a set name, a text file, 'folder', or 'toy'"))
    templates: str = field(default="imagenet", metadata=opt("prompt templates: a set name, a text file, or 'toy'"))
    teacher: str = field(default="RN50", metadata=opt("CLIP teacher: an official name, a checkpoint path, or 'toy'"))
    clip_root: str = field(default="", metadata=opt("download folder for official CLIP weights (default ~/.cache/clip)"))
    teacher_cache: str = field(default="", metadata=opt("teacher-embedding cache built by python -m lgd.cache: training skips the teacher"))
    arch: str = field(default="resnet18", metadata=opt("student architecture", choices=available_students()))
    image_size: int = field(default=224, metadata=opt("training and evaluation resolution"))
    min_crop_scale: float = field(default=0.2, metadata=opt("smallest RandomResizedCrop area fraction (MoCo v2: 0.2)"))
    student_temp: float = field(default=0.2, metadata=opt("student temperature τ_s"))
    teacher_temp: float = field(default=0.01, metadata=opt("teacher temperature τ_t"))
    alpha: float = field(default=0.5, metadata=opt("loss = alpha * L_VIS + (1 - alpha) * L_TEX"))
    vsb_momentum: float = field(default=0.999, metadata=opt("momentum m of the VSB rows"))
    epochs: int = field(default=200, metadata=opt("training epochs"))
    batch_size: int = field(default=2048, metadata=opt("global batch size (split over all ranks)"))
    base_lr: float = field(default=0.03, metadata=opt("learning rate per 256 images (lr = base_lr * batch/256)"))
    optimizer: str = field(default="sgd", metadata=opt("sgd (the paper's) or adamw", choices=["sgd", "adamw"]))
    momentum: float = field(default=0.9, metadata=opt("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=opt("weight decay"))
    warmup_epochs: int = field(default=5, metadata=opt("linear warm-up epochs before the cosine decay"))
    workers: int = field(default=8, metadata=opt("data-loading processes per rank"))
    max_bad_images: float = field(default=0.01, metadata=opt("fraction of unreadable images tolerated per epoch"))
    output: str = field(default="runs/lgd", metadata=opt("run folder (checkpoints, logs, config)"))
    resume: str = field(default="", metadata=opt("'auto' (the run folder's last checkpoint, if any) or a checkpoint path"))
    seed: int = field(default=0, metadata=opt("seed of initialisation, data order and augmentation"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    amp: str = field(default="auto", metadata=opt("student autocast: auto (bf16 on GPU, fp16 before Ampere; off on CPU), "
                                                   "bf16, fp16, off; with AMP on GPU the teacher runs in fp16",
                                                   choices=["auto", "bf16", "fp16", "off"]))
    channels_last: bool = field(default=False, metadata=opt("channels_last memory format for teacher and student"))
    compile: bool = field(default=False, metadata=opt("torch.compile the student"))
    val_interval: int = field(default=10, metadata=opt("zero-shot evaluation on val/ every N epochs and at the end "
                                                        "(0: only at the end)"))
    knn_interval: int = field(default=0, metadata=opt("weighted kNN (k=20, T=0.07) of val/ against train/ on backbone "
                                                       "features every N epochs (and at the end); 0: off"))
    save_interval: int = field(default=0, metadata=opt("also keep checkpoint_epNNNN.pth every N epochs (0: only the last)"))
    log_interval: int = field(default=20, metadata=opt("steps between log lines"))
    stop_after: int = field(default=0, metadata=opt("exit cleanly after N epochs of this run (time-limited jobs)"))
    cache_dir: str = field(default="", metadata=opt("TSB and toy-world cache (default $LGD_HOME or ~/.cache/lgd)"))


@dataclass
class Setup:
    """What the config resolves to once the toy world (if asked for) exists."""

    data: Path
    teacher: str
    text: str
    templates: str


def resolve_inputs(cfg: TrainConfig) -> Setup:
    """Turn ``data/teacher/text/templates == 'toy'`` into the built-in toy world's paths."""
    if not cfg.data:
        raise LGDError(
            "no --data given: pass an ImageFolder root with train/, or run the built-in toy world with "
            "`bash scripts/train.sh` (or --config configs/toyworld.yaml)"
        )
    uses_toy = "toy" in (cfg.data, cfg.teacher, cfg.text, cfg.templates)
    world = None
    if uses_toy:
        with du.local_main_first():
            world = ensure_toy_world(Path(cfg.cache_dir) if cfg.cache_dir else None, verbose=du.is_main())
    data = world.data if cfg.data == "toy" else Path(cfg.data)
    if not (data / "train").is_dir():
        raise LGDError(f"image folder not found: {data / 'train'} (--data takes an ImageFolder root with "
                       "train/<class>/<image> and optionally val/)")
    teacher = str(world.teacher) if cfg.teacher == "toy" else cfg.teacher
    text = str(world.classnames) if cfg.text == "toy" else cfg.text
    if text == "folder":
        text = str(data / "train")
    templates = str(world.templates) if cfg.templates == "toy" else cfg.templates
    return Setup(data=data, teacher=teacher, text=text, templates=templates)


def check_config(cfg: TrainConfig) -> None:
    if cfg.batch_size % du.world_size():
        raise LGDError(f"batch_size {cfg.batch_size} is not divisible by the world size {du.world_size()}")
    for key in ("epochs", "batch_size", "image_size"):
        if getattr(cfg, key) <= 0:
            raise LGDError(f"{key} must be positive, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise LGDError(f"alpha must be in [0, 1], got {cfg.alpha}")
    for key in ("student_temp", "teacher_temp", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise LGDError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("warmup_epochs", "weight_decay", "workers", "base_lr"):
        if getattr(cfg, key) < 0:
            raise LGDError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key, low, high in (("vsb_momentum", 0.0, 1.0), ("momentum", 0.0, 1.0)):
        if not low <= getattr(cfg, key) < high:
            raise LGDError(f"{key} must be in [{low:g}, {high:g}), got {getattr(cfg, key)}")
    if not 0.0 < cfg.min_crop_scale <= 1.0:
        raise LGDError(f"min_crop_scale must be in (0, 1], got {cfg.min_crop_scale}")
    if not 0.0 <= cfg.max_bad_images <= 1.0:
        raise LGDError(f"max_bad_images is a fraction in [0, 1], got {cfg.max_bad_images}")
    for key in ("val_interval", "knn_interval", "save_interval"):
        if getattr(cfg, key) < 0:
            raise LGDError(f"{key} must be >= 0 (0: off, or only at the end for val_interval), got {getattr(cfg, key)}")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. fp16 needs a GradScaler; bf16 does not.

    ``auto`` is bf16 on GPUs with native bf16 (compute capability 8.0+, Ampere on) and fp16 before them, where
    torch emulates bf16 at a fraction of fp16's speed without saying so (V100, T4)."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16":
        return torch.float16
    raise LGDError(f"amp must be one of auto, bf16, fp16, off; got {cfg.amp!r}")


def teacher_dtype(autocast: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The frozen teacher's precision: fp16 on GPU whenever AMP is on (CLIP's own, and the authors'), else fp32.

    Not bf16 even when the student autocasts to bf16: with τ_t = 0.01 its 8-bit mantissa moves the teacher's
    target logits by whole units (cosine errors of ~0.04 measured on a small tower), fp16's by ~0.002.
    """
    return torch.float16 if autocast is not None and device.type == "cuda" else torch.float32


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to ``peak_lr``, then cosine decay to 0 (per optimizer step)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FrozenTeacher(nn.Module):
    """The CLIP image tower in eval mode, never updated: ``t = normalize(encode_image(x))`` in fp32.

    With ``dtype=torch.float16`` the tower runs in CLIP's own mixed precision (fp16 matrices, fp32 norms).
    """

    def __init__(self, visual: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False).float()
        if dtype != torch.float32:
            clip.convert_weights(self.visual, dtype)
        self.dtype = dtype

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # BN statistics of the teacher must never move

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            t = F.normalize(self.visual(images.to(self.dtype)).float(), dim=-1)
        return t.clone()  # a normal tensor: the loss saves it for the backward pass


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag, so the loop can save a checkpoint at a step boundary.

    A repeated SIGTERM changes nothing: under SLURM every process gets the scheduler's SIGTERM and torchrun
    forwards its own copy, milliseconds apart, before the ranks reach the step where they agree to stop. A second
    SIGINT (Ctrl-C twice) is the user's way out without saving and acts immediately.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    sync_every = 10

    def agreed(self, device: torch.device, step: int) -> bool:
        """Whether any rank was signalled; every rank must stop at the same step.

        Under DDP the ranks agree through an all-reduce, which waits for the GPU to drain; asking only every
        ``sync_every`` steps keeps the step pipelined and still stops within seconds of a pre-emption notice.
        """
        if not du.is_dist():
            return self.signum != 0
        if step % self.sync_every:
            return False
        flag = torch.tensor([float(self.signum)], device=device)
        return du.all_reduce_sum(flag).item() > 0

    def save_and_exit(self, save: Callable[[], None], epoch: int, step: int, path: Path) -> None:
        """Pre-emption: rank 0 saves ``path``, every rank leaves with the conventional 128+signal status."""
        if du.is_main():
            save()
            print(f"stopped by signal {self.signum} at epoch {epoch} step {step}; saved {path}; "
                  "continue with --resume auto")
        du.barrier()
        raise SystemExit(128 + self.signum)


def stop_after_reached(stop_after: int, epochs_this_run: int, done: bool) -> bool:
    """``--stop-after N``: end a time-limited job cleanly once N epochs of this run are done."""
    if not stop_after or epochs_this_run < stop_after or done:
        return False
    if du.is_main():
        print(f"stopping after {stop_after} epoch(s) as asked; continue with --resume auto")
    return True


class RunLog:
    """Rank-0 JSON-lines log plus TensorBoard scalars (other ranks write nothing).

    A run resumed at step ``S`` re-trains every step after ``S``: records past ``S`` (left by a crash after the
    last checkpoint, or by an earlier run in the same folder) would repeat those steps with other values, so
    they move to ``log.dropped.jsonl`` (with a note) and are purged from TensorBoard.
    """

    def __init__(self, out: Path, enabled: bool, step: int) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            path = out / "log.jsonl"
            if path.is_file():
                keep_records_until(path, step)
            self.file = open(path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"), purge_step=step + 1)
            except ImportError:
                print("note: tensorboard is not installed; logging to log.jsonl only")

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{record['type']}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def keep_records_until(path: Path, step: int) -> None:
    """Move the records of steps after ``step`` (and lines cut short by a crash) out of the JSON-lines log
    ``path`` into ``log.dropped.jsonl`` beside it: the log keeps one record per step, nothing is deleted."""
    kept, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record.get("step"), int) and record["step"] <= step
        except (json.JSONDecodeError, AttributeError):  # torn, or not a record of ours
            keep = False
        (kept if keep else dropped).append(line)
    if dropped:
        aside = path.with_name("log.dropped.jsonl")
        with open(aside, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())
        with atomic_file(path) as f:
            f.write("".join(line + "\n" for line in kept).encode())
        print(f"note: {len(dropped)} record(s) of {path} past step {step}, the step this run starts from, "
              f"moved to {aside}")


@dataclass
class State:
    """Everything a checkpoint restores."""

    student: LGDStudent
    vsb: VisualSemanticsBank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # steps already taken in epoch ``epoch`` (after a mid-epoch stop)
    bad_in_epoch: int = 0  # unreadable images replaced in those steps, summed over ranks
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def save_state(state: State, path: Path, cfg: TrainConfig, setup: Setup, tsb: torch.Tensor,
               classnames: Sequence[str], templates: Sequence[str], train_data: dict[str, Any]) -> None:
    atomic_torch_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "arch": cfg.arch,
            "embed_dim": state.student.embed_dim,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "bad_in_epoch": state.bad_in_epoch,
            "step": state.step,
            "model": state.student.state_dict(),
            "vsb": state.vsb.state_dict(),
            "tsb": tsb.cpu(),
            "classnames": list(classnames),
            "templates": list(templates),
            "teacher": setup.teacher,
            "train_data": train_data,
            "config": dataclasses.asdict(cfg),
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "metrics": dict(state.metrics),
        },
        path,
    )


# A resumed run must keep these: the learning rate of every step, the data order and views, and the loss
# depend on them. Everything else (paths, precision, workers, intervals, compile) may change on resume.
RECIPE_KEYS = ("epochs", "batch_size", "base_lr", "warmup_epochs", "momentum", "weight_decay", "image_size",
               "min_crop_scale", "student_temp", "teacher_temp", "alpha", "vsb_momentum", "seed")


def resume_state(state: State, cfg: TrainConfig, out: Path, tsb: torch.Tensor, train_data: dict[str, Any]) -> None:
    """Load ``--resume`` into ``state``; refuse checkpoints of another student, text set, recipe or image set."""
    path = resume_path(cfg.resume, out)
    if path is None:
        return
    ckpt = load_checkpoint(path)
    saved = ckpt.get("train_data", train_data)  # the sampler's permutations index this image list
    if saved != train_data:
        raise LGDError(f"cannot resume: {path} was trained on {saved['images']} images of {len(saved['classes'])} "
                       f"classes, this run's train/ has {train_data['images']} of {len(train_data['classes'])}"
                       f"{'' if saved['classes'] == train_data['classes'] else ' (other class folders)'}; resume "
                       "on the same images, or start a new --output")
    if ckpt["arch"] != cfg.arch:
        raise LGDError(f"cannot resume: {path} holds a {ckpt['arch']} student, this run trains {cfg.arch}")
    if tuple(ckpt["tsb"].shape) != tuple(tsb.shape):
        raise LGDError(
            f"cannot resume: {path} was trained with a TSB of shape {tuple(ckpt['tsb'].shape)}, "
            f"this run has {tuple(tsb.shape)} (another teacher or class-name set?)"
        )
    # Same shape is not same bank: another teacher of the same width, or reordered class names, would give
    # the resumed VSB rows another meaning. Tolerance covers a TSB rebuilt on another device.
    if not torch.allclose(ckpt["tsb"].float(), tsb.float().cpu(), atol=1e-4):
        raise LGDError(f"cannot resume: the TSB of {path} differs from this run's (another teacher, class-name "
                       "order or templates?); resume with the checkpoint's teacher and --text, or start a new --output")
    if ckpt["config"].get("optimizer") != cfg.optimizer:
        raise LGDError(f"cannot resume: {path} was trained with {ckpt['config'].get('optimizer')}, this run asks for "
                       f"{cfg.optimizer}; their states do not convert (start a new --output to switch)")
    changed = [f"{key}={ckpt['config'][key]!r} (this run: {getattr(cfg, key)!r})" for key in RECIPE_KEYS
               if key in ckpt["config"] and ckpt["config"][key] != getattr(cfg, key)]
    if changed:
        raise LGDError(f"cannot resume: {path} was trained with {', '.join(changed)}; these keys define the schedule "
                       "and the method, so the resumed run would be neither run. Resume with the checkpoint's values "
                       "(its run folder's config.yaml), or start a new --output")
    state.student.load_state_dict(ckpt["model"])
    state.vsb.load_state_dict(ckpt["vsb"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler.is_enabled() and ckpt["scaler"]:  # fp16 loss scale; a run switching to fp16 starts a fresh one
        state.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.epoch, state.batch_in_epoch, state.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
    state.bad_in_epoch = ckpt.get("bad_in_epoch", 0)
    state.metrics = dict(ckpt.get("metrics", {}))
    if du.is_main():
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
                   if k not in ("resume", "output", "stop_after") and getattr(cfg, k, v) != v}
        if changed:
            print(f"note: config differs from the checkpoint's: {changed}")
        print(f"resumed from {path}: epoch {state.epoch}, step {state.step}")


@torch.no_grad()
def zero_shot(embed: nn.Module, loader: DataLoader, tsb: torch.Tensor, device: torch.device,
              autocast: torch.dtype | None, desc: str) -> dict[str, float]:
    """Zero-shot top-1/top-5 (%) against the TSB; under DDP each rank scores its shard and the hits are summed."""
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        feats, labels = embed_dataset(embed, loader, device, desc=desc)
    logits = zero_shot_logits(feats, tsb.cpu()) if len(feats) else torch.empty(0, len(tsb))
    acc = accuracy_from_hits(du.all_reduce_sum(topk_hits(logits, labels).to(device)).cpu())
    return {"top1": acc[1], "top5": acc[5]}


Phase = Callable[[str], ContextManager[object]]


def no_phase(name: str) -> ContextManager[object]:
    return contextlib.nullcontext()


def lgd_step(
    images: torch.Tensor, state: State, model: nn.Module, teacher: nn.Module, tsb: torch.Tensor, cfg: TrainConfig,
    autocast: torch.dtype | None, t: torch.Tensor | None = None, phase: Phase = no_phase,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LGD optimisation step; returns ``(loss, l_vis, l_tex)`` without syncing the device.

    ``t`` may carry precomputed teacher embeddings (skipping the teacher); ``phase`` names the parts
    of the step so that ``lgd.bench`` can time them.
    """
    with phase("teacher"):
        if t is None:
            t = teacher(images)
    with phase("student"):
        with torch.autocast(images.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            s = model(images)
        t_tsb = t @ tsb.T  # shared by L_TEX and the LGKA assignment
        # The logits use the VSB as it was before this step's update.
        loss, l_vis, l_tex = lgd_loss(s, t, tsb, state.vsb.bank, cfg.student_temp, cfg.teacher_temp, cfg.alpha, t_tsb=t_tsb)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
    with phase("optimizer"):
        state.scaler.step(state.optimizer)
        state.scaler.update()
    with phase("lgka"):
        # Every rank folds in the teacher embeddings of the whole global batch, so the banks agree. One
        # collective per step: the LGKA labels travel as a last fp32 column (exact below 2**24 classes).
        packed = du.all_gather_cat(torch.cat([t.float(), t_tsb.argmax(1, keepdim=True).float()], dim=1))
        state.vsb.update(packed[:, :-1], labels=packed[:, -1].long())
    return loss, l_vis, l_tex


def check_bad_images(cfg: TrainConfig, state: State, per_epoch: int, bad: int) -> None:
    """Stop once an epoch's unreadable images exceed ``max_bad_images`` of the epoch: checked at every log step
    too, so a mostly unreadable dataset fails within minutes instead of after an epoch of duplicates."""
    limit = cfg.max_bad_images * per_epoch * cfg.batch_size
    if bad > limit:
        raise LGDError(f"{bad} unreadable images in epoch {state.epoch + 1} (limit {cfg.max_bad_images:.1%} of "
                       f"{per_epoch * cfg.batch_size}); check the images of {Path(cfg.data) / 'train'}")


def train_one_epoch(
    cfg: TrainConfig, state: State, model: nn.Module, teacher: FrozenTeacher | None, tsb: torch.Tensor,
    loader: DataLoader, device: torch.device, autocast: torch.dtype | None, schedule: dict[str, int],
    stop: StopRequested, log: RunLog,
) -> tuple[bool, int]:
    """One pass over the loader. Returns (stopped by a signal, unreadable images skipped)."""
    model.train()
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    skipped = torch.zeros((), dtype=torch.long)
    running = torch.zeros(3, device=device)
    window_start, window_steps = time.time(), 0
    bar = tqdm(total=schedule["per_epoch"], initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not du.is_main(), dynamic_ncols=True)
    for images, _, n_bad, *cached in loader:  # a CachedViewDataset adds the teacher's embeddings
        lr = lr_at(state.step, schedule["total"], schedule["warmup"], peak_lr)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        t = teacher_embeddings(cached[0], device) if cached else None
        loss, l_vis, l_tex = lgd_step(images, state, model, teacher, tsb, cfg, autocast, t=t)

        state.step += 1
        state.batch_in_epoch += 1
        skipped += n_bad.sum()
        running += torch.stack([loss.detach(), l_vis.detach(), l_tex.detach()])
        window_steps += 1
        bar.update()
        if window_steps == cfg.log_interval or state.batch_in_epoch == schedule["per_epoch"]:
            # Every rank logs at the same steps: average over ranks, so the log is the global batch's loss and
            # a non-finite loss on any rank stops all of them (one rank raising alone would leave the rest waiting).
            totals = du.all_reduce_sum(torch.cat([running, skipped.to(device, running.dtype).view(1)]))
            check_bad_images(cfg, state, schedule["per_epoch"], state.bad_in_epoch + int(totals[3].item()))
            values = (totals[:3] / (window_steps * du.world_size())).tolist()
            if not math.isfinite(values[0]):
                raise LGDError(f"loss is {values[0]} near step {state.step}; lower the learning rate or disable fp16")
            img_s = window_steps * cfg.batch_size / (time.time() - window_start)
            record = {"type": "train", "epoch": state.epoch, "step": state.step, "loss": values[0],
                      "l_vis": values[1], "l_tex": values[2], "lr": lr, "img_per_s": img_s}
            log.write(record, state.step)
            bar.set_postfix(loss=f"{values[0]:.4f}", l_vis=f"{values[1]:.4f}", l_tex=f"{values[2]:.4f}",
                            lr=f"{lr:.3g}", img_s=f"{img_s:.0f}")
            running.zero_()
            window_start, window_steps = time.time(), 0
        if stop.agreed(device, state.step):
            bar.close()
            return True, int(skipped)
    bar.close()
    return False, int(skipped)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one LGD pre-training; return the final metrics written to ``train_metrics.json``."""
    start_time = time.time()
    device = du.init_distributed(cfg.device)
    check_config(cfg)
    setup = resolve_inputs(cfg)
    out = Path(cfg.output)
    if du.is_main():
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    autocast = amp_dtype(cfg, device)

    # Teacher and TSB. Local rank 0 loads first so that a download happens once per node.
    with du.local_main_first():
        clip_model, _ = clip.load(setup.teacher, device="cpu", download_root=cfg.clip_root or None)
    check_teacher_resolution(clip_model.visual, cfg.image_size, setup.teacher)
    clip_model = clip_model.to(device)  # fp32; on a GPU the 80k prompts of an ImageNet TSB take seconds, not hours
    classnames, templates = class_text(setup.text, setup.templates)
    embed_dim = clip_model.text_projection.shape[1]
    tsb = torch.zeros(len(classnames), embed_dim)
    if du.is_main():
        tsb = load_or_build_tsb(clip_model, classnames, templates, Path(cfg.cache_dir or default_home()) / "tsb")
    tsb = du.broadcast(tsb.to(device))
    teacher_precision = teacher_dtype(autocast, device)
    visual = clip_model.visual
    del clip_model  # the text tower is not needed any more
    # With a teacher cache the teacher never runs in training: it waits on the CPU for the zero-shot baseline.
    teacher = None if cfg.teacher_cache else FrozenTeacher(visual, teacher_precision).to(device)
    if teacher is None:
        visual.cpu()
    if cfg.channels_last and teacher is not None:
        teacher = teacher.to(memory_format=torch.channels_last)

    # Student, VSB, optimizer.
    student = build_student(cfg.arch, embed_dim).to(device)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    vsb = VisualSemanticsBank(len(classnames), embed_dim, cfg.vsb_momentum).to(device)
    du.broadcast(vsb.bank)  # identical random init on every rank
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.base_lr, weight_decay=cfg.weight_decay)
    else:
        raise LGDError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    state = State(student, vsb, optimizer, scaler)
    model: nn.Module = student
    if du.is_dist():
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    # Data.
    local_batch = cfg.batch_size // du.world_size()
    train_folder = image_folder(setup.data / "train")
    train_set: SeededImageFolder | CachedViewDataset
    if cfg.teacher_cache:  # refused unless built for this teacher, dataset and view size, and complete
        cache = open_teacher_cache(cfg.teacher_cache, visual=visual, folder=train_folder, image_size=cfg.image_size,
                                   min_scale=cfg.min_crop_scale)
        train_set = CachedViewDataset(train_folder, cache)
        if cache.manifest["seed"] != cfg.seed and du.is_main():
            print(f"note: the teacher cache was built with seed {cache.manifest['seed']}, this run has --seed "
                  f"{cfg.seed}: its views are valid, but not the ones a live run with this seed would draw")
    else:
        train_set = SeededImageFolder(train_folder, MocoV2View(cfg.image_size, min_scale=cfg.min_crop_scale), cfg.seed)
    sampler = EpochSampler(train_set, du.world_size(), du.rank(), seed=cfg.seed)
    per_epoch = sampler.num_samples // local_batch
    if per_epoch == 0:
        raise LGDError(f"{setup.data / 'train'} has {len(train_set)} images, fewer than one batch of {cfg.batch_size}")
    workers = loader_workers(cfg.workers)
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_stop_signals,
                        generator=own_generator(cfg.seed))
    val_loader = None
    if (setup.data / "val").is_dir():
        val_set = image_folder(setup.data / "val")
        val_set.transform = eval_transform(cfg.image_size)
        if len(val_set.classes) != len(classnames):
            if du.is_main():
                print(f"note: no zero-shot evaluation during training: the text set has {len(classnames)} classes, "
                      f"{setup.data / 'val'} has {len(val_set.classes)} (use python -m lgd.zscls with a matching set)")
        else:
            order, class_match = align_classes(val_set.classes, classnames)
            val_tsb = tsb[order]  # row i: the text class of val label i
            if du.is_main() and class_match == "name":
                print(f"note: the class folders of {setup.data / 'val'} hold the text set's names in another order; "
                      "zero-shot matches them by name")
            elif du.is_main() and class_match.startswith("position,"):
                print(class_mismatch_warning(val_set.classes, classnames, class_match, str(setup.data / "val")))
            val_loader = DataLoader(du.shard(val_set), batch_size=min(local_batch, 256), num_workers=workers,
                                    pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                                    generator=own_generator())
    knn_loaders: list[DataLoader] = []
    if cfg.knn_interval and (setup.data / "val").is_dir():
        query_set = image_folder(setup.data / "val")
        knn_classes = len(train_folder.classes)
        if train_folder.classes == query_set.classes:
            query_set.transform = eval_transform(cfg.image_size)
            bank_set = SkippingFolder(train_folder, eval_transform(cfg.image_size))  # training tolerates bad files
            knn_loaders = [DataLoader(du.shard(s), batch_size=min(local_batch, 256), num_workers=workers,
                                      pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                                      generator=own_generator())
                           for s in (bank_set, query_set)]
        elif du.is_main():
            print(f"note: no kNN monitor: {setup.data / 'val'} lacks the class folders of {setup.data / 'train'}")
    schedule = {"per_epoch": per_epoch, "total": per_epoch * cfg.epochs, "warmup": per_epoch * cfg.warmup_epochs}

    train_data = {"images": len(train_set), "classes": list(train_folder.classes)}
    resume_state(state, cfg, out, tsb, train_data)
    du.require_resumed_alike((state.epoch, state.batch_in_epoch, state.step), cfg.resume, device)
    if du.is_main():  # only now: a refused start must not overwrite the config of the run it refused to resume
        save_config(cfg, out / "config.yaml")
        print(f"LGD: teacher {setup.teacher} (D={embed_dim}) -> student {cfg.arch}; {len(train_set)} images, "
              f"{len(classnames)} classes in the banks; {per_epoch} steps/epoch x {cfg.epochs} epochs, "
              f"batch {cfg.batch_size} on {du.world_size()} process(es), {device}, amp={autocast}")

    log = RunLog(out, du.is_main(), state.step)
    stop = StopRequested()
    teacher_metrics: dict[str, float] | None = None
    first_epoch = state.epoch
    last = out / "checkpoint_last.pth"

    def save(path: Path) -> None:
        save_state(state, path, cfg, setup, tsb, classnames, templates, train_data)

    try:
        while state.epoch < cfg.epochs:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch * local_batch)
            stopped, bad = train_one_epoch(cfg, state, model, teacher, tsb, loader, device, autocast, schedule, stop, log)
            state.bad_in_epoch += int(du.all_reduce_sum(torch.tensor(bad, device=device)).item())
            if stopped:  # the epoch's count so far is saved: the resumed part adds to it
                stop.save_and_exit(lambda: save(last), state.epoch, state.step, last)
            # Every rank updates the VSB from the same gathered batch, but CUDA's index_add_ sums in no fixed
            # order: re-align the ranks on rank 0's bank (the one saved) once per epoch, before ULPs add up.
            # BN running stats: DDP copies rank 0's before each forward, so after the last step every rank has
            # its own; align them too, so that the sharded evaluation below scores exactly the saved checkpoint.
            for tensor in (state.vsb.bank, *student.buffers()):
                du.broadcast(tensor)
            check_bad_images(cfg, state, per_epoch, state.bad_in_epoch)
            state.epoch, state.batch_in_epoch, state.bad_in_epoch = state.epoch + 1, 0, 0
            done = state.epoch == cfg.epochs
            if du.is_main():  # the epoch's training is safe before an evaluation can fail
                save(last)
            evaluate_zero_shot = val_loader is not None and (
                done or (cfg.val_interval > 0 and state.epoch % cfg.val_interval == 0))
            evaluate_knn = bool(knn_loaders) and (done or state.epoch % cfg.knn_interval == 0)
            if evaluate_zero_shot:
                if teacher_metrics is None:
                    evaluated = teacher if teacher is not None else FrozenTeacher(visual, teacher_precision).to(device)
                    teacher_metrics = zero_shot(evaluated, val_loader, val_tsb, device, None, "zero-shot (teacher)")
                    if teacher is None:
                        evaluated.cpu()  # measured once per run; its memory goes back to the student
                student_metrics = zero_shot(student.eval(), val_loader, val_tsb, device, autocast, "zero-shot (student)")
                state.metrics = {"teacher_top1": teacher_metrics["top1"], "teacher_top5": teacher_metrics["top5"],
                                 "student_top1": student_metrics["top1"], "student_top5": student_metrics["top5"]}
                log.write({"type": "val", "epoch": state.epoch, "step": state.step, **state.metrics}, state.step)
                if du.is_main():
                    print(f"epoch {state.epoch}: zero-shot top-1 student {state.metrics['student_top1']:.2f}% "
                          f"(teacher {state.metrics['teacher_top1']:.2f}%)")
            if evaluate_knn:
                knn = knn_monitor(student.eval().features, *knn_loaders, device, knn_classes, autocast=autocast)
                state.metrics.update(knn)
                log.write({"type": "knn", "epoch": state.epoch, "step": state.step, **knn}, state.step)
                if du.is_main():
                    print(f"epoch {state.epoch}: kNN top-1 {knn['knn_top1']:.2f}% (k=20, T=0.07)")
            if du.is_main():
                if evaluate_zero_shot or evaluate_knn:  # again, now with the epoch's metrics
                    save(last)
                if cfg.save_interval and state.epoch % cfg.save_interval == 0:
                    save(out / f"checkpoint_ep{state.epoch:04d}.pth")
            if stop_after_reached(cfg.stop_after, state.epoch - first_epoch, done):
                break
    finally:
        stop.restore()
        log.close()

    result = {**state.metrics, "epochs": state.epoch, "seconds": round(time.time() - start_time, 1),
              "checkpoint": str(last.resolve())}
    if du.is_main():
        atomic_write_json(out / "train_metrics.json", result)
        print("\n== LGD run summary ==")
        if "teacher_top1" in state.metrics:
            print(f"teacher zero-shot top-1: {state.metrics['teacher_top1']:.2f}%")
            print(f"student zero-shot top-1: {state.metrics['student_top1']:.2f}%")
        print(f"epochs: {state.epoch}/{cfg.epochs}, time: {result['seconds']}s")
        print(f"checkpoint: {result['checkpoint']}")
    du.cleanup()
    return result


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TrainConfig, argv, description="LGD pre-training (see configs/ for the paper's settings)")
    return train(cfg)


if __name__ == "__main__":
    main()
