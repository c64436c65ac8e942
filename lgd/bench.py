"""Benchmarks of LGD pre-training: ``python -m lgd.bench [--mode step|loader|hot|summary]``.

* ``step`` (default): the real training step (``lgd.train.lgd_step``) of a teacher/student/resolution/
  batch on CPU or GPU, with synthetic in-memory data or a real folder. After warm-up it reports the
  median and spread of the step time, img/s, the split into data wait, teacher forward, student
  forward+loss+backward, optimizer and LGKA update, and peak memory (RSS on CPU, allocated on GPU).
  ``--compare A B`` runs two settings in one process, alternating step by step, and prints their ratio;
  for live teacher vs cache it also prints the ideal ratio (teacher + rest) / rest.
* ``loader``: decoded + augmented images per second (and per worker) of the training data pipeline.
* ``hot``: the vectorised hot paths against their straightforward versions (LGKA update vs a per-class
  loop; one shared ``t @ TSB`` vs two), with the result difference.
* ``summary``: a Markdown table of earlier JSON results (for the README).

Every mode prints a table and writes JSON (``--json``). Timings on shared machines are noisy: trust
ratios from one ``--compare`` run, and never turn them into timed unit tests.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import clip
from clip.model import CLIP

from . import distributed as du
from .banks import VisualSemanticsBank
from .cache import CachedViewDataset, TeacherCache, open_teacher_cache, teacher_embeddings
from .data import EpochSampler, SeededImageFolder, image_folder
from .checkpoint import atomic_write_json
from .errors import LGDError, cli_entry
from .losses import lgd_loss
from .models import available_students, build_student
from .toyworld import ensure_toy_world
from .train import FrozenTeacher, State, TrainConfig, amp_dtype, lgd_step, teacher_dtype
from .views import MocoV2View

# Official CLIP constructor arguments (embed_dim, vision_layers, vision_width, vision_patch_size) of the
# image towers that ``--teacher random:NAME`` builds with random weights (timing needs no download).
RANDOM_TOWERS: dict[str, tuple[int, int | tuple[int, ...], int, int | None]] = {
    "RN50": (1024, (3, 4, 6, 3), 64, None),
    "RN101": (512, (3, 4, 23, 3), 64, None),
    "ViT-B/32": (512, 12, 768, 32),
    "ViT-B/16": (512, 12, 768, 16),
}
PHASES = ("data", "teacher", "student", "optimizer", "lgka")


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """What one compared configuration of the training step is (``--compare`` overrides these keys)."""

    teacher: str
    arch: str
    image_size: int
    batch_size: int
    amp: str
    channels_last: bool
    compile: bool
    cached: bool

    def describe(self, keys: Sequence[str]) -> str:
        return " ".join(f"{k}={_show(getattr(self, k))}" for k in keys)


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise LGDError(f"--compare: {key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "on", "yes")
    try:
        return kind(text)
    except ValueError:
        raise LGDError(f"--compare: {key} takes a {kind.__name__}, got {text!r}") from None


def parse_override(spec: str, base: Setting) -> Setting:
    """``"cached=true,amp=bf16"`` applied to ``base``."""
    kinds = {f.name: {"str": str, "int": int, "bool": bool}[f.type] for f in dataclasses.fields(Setting)}
    values = {}
    for item in filter(None, spec.split(",")):
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise LGDError(f"--compare {spec!r}: use KEY=VALUE[,KEY=VALUE] with KEY one of {', '.join(kinds)}")
        values[key] = _coerce(key, text.strip(), kinds[key])
    return dataclasses.replace(base, **values)


# ----------------------------------------------------------------------------------------------- measuring
class PhaseTimer:
    """The ``phase`` callable of ``lgd_step``: wall time per named part on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu: dict[str, float] = {}
        self.events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name] = (start, end)
        else:
            begin = time.perf_counter()
            yield
            self.cpu[name] = self.cpu.get(name, 0.0) + time.perf_counter() - begin

    def seconds(self) -> dict[str, float]:
        """Per-phase seconds; call after the device is synchronised."""
        gpu = {name: start.elapsed_time(end) / 1e3 for name, (start, end) in self.events.items()}
        return {**self.cpu, **gpu}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a window: ``max_memory_allocated`` on GPU, the RSS high-water mark on CPU.

    On Linux the RSS high-water mark is reset through ``/proc/self/clear_refs``; elsewhere it covers
    the whole process so far (``scope`` says which).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "window" if device.type == "cuda" or self._reset_rss() else "process"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.scope == "window":
            self._reset_rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.scope == "window":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes (robust against the outliers of a shared machine)."""
    q1, median, q3 = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                      else (values[0],) * 3)
    return {"median": median, "p25": q1, "p75": q3, "min": min(values), "max": max(values), "n": len(values)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "world_size": du.world_size(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "argv": sys.argv[1:],
    }


# ----------------------------------------------------------------------------------------------- step mode
def check_cache_teacher(spec: str, cache_root: str) -> None:
    """A random tower can never be the teacher a ``--teacher-cache`` was built for: say which one is."""
    if spec.startswith("random:"):
        built_for = TeacherCache(cache_root).manifest["teacher"]["name"]
        raise LGDError(f"--teacher-cache holds the embeddings of the teacher it was built for, not of a random tower: "
                       f"pass that teacher (--teacher {built_for})")


def load_visual(spec: str, image_size: int, cache_dir: str) -> tuple[nn.Module, int]:
    """The teacher's image tower and embedding width: ``random:NAME``, an official name, a path, or 'toy'."""
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        if name not in RANDOM_TOWERS:
            raise LGDError(f"--teacher {spec}: random towers are {', '.join('random:' + n for n in RANDOM_TOWERS)}")
        embed_dim, layers, width, patch = RANDOM_TOWERS[name]
        return CLIP(embed_dim, image_size, layers, width, patch, 77, 49408, 512, 8, 12).visual, embed_dim
    if spec == "toy":
        spec = str(ensure_toy_world(Path(cache_dir) if cache_dir else None, verbose=du.is_main()).teacher)
    model, _ = clip.load(spec, device="cpu")
    return model.visual, int(model.text_projection.shape[1])


class StepRunner:
    """One setting's student, optimizer, banks and data, stepping through ``lgd_step``."""

    def __init__(self, setting: Setting, args: argparse.Namespace, device: torch.device,
                 towers: dict[tuple[str, int], tuple[nn.Module, int]]) -> None:
        self.setting, self.device = setting, device
        if setting.batch_size % du.world_size():
            raise LGDError(f"batch size {setting.batch_size} is not divisible by the world size {du.world_size()}")
        self.local_batch = setting.batch_size // du.world_size()
        self.cfg = TrainConfig(amp=setting.amp, image_size=setting.image_size)
        self.autocast = amp_dtype(self.cfg, device)
        key = (setting.teacher, setting.image_size)
        if key not in towers:
            towers[key] = load_visual(setting.teacher, setting.image_size, args.cache_dir)
        visual, embed_dim = towers[key]
        self.teacher: nn.Module | None = None
        if not setting.cached:
            # A copy: FrozenTeacher converts its tower in place, and other settings may share the tower.
            self.teacher = FrozenTeacher(copy.deepcopy(visual), teacher_dtype(self.autocast, device)).to(device)
            if setting.channels_last:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(args.seed)
        self.tsb = F.normalize(torch.randn(args.classes, embed_dim, generator=generator), dim=1).to(device)
        torch.manual_seed(args.seed)  # every setting starts from the same student
        student = build_student(setting.arch, embed_dim).to(device)
        if setting.channels_last:
            student = student.to(memory_format=torch.channels_last)
        vsb = VisualSemanticsBank(args.classes, embed_dim, self.cfg.vsb_momentum).to(device)
        du.broadcast(vsb.bank)
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.state = State(student, vsb, optimizer, scaler)
        self.model: nn.Module = student
        if du.is_dist():
            self.model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        if setting.compile:
            self.model = torch.compile(self.model)
        self.model.train()
        self.batches = self._real_batches(args, visual) if args.data else self._synthetic_batches(embed_dim, generator)
        self.records: list[dict[str, float]] = []
        self.memory = PeakMemory(device)
        self.peak = 0

    def _synthetic_batches(self, embed_dim: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        size = self.setting.image_size
        images = torch.randn(self.local_batch, 3, size, size, generator=generator)
        cached = F.normalize(torch.randn(self.local_batch, embed_dim, generator=generator), dim=1).half()
        if pin:
            images, cached = images.pin_memory(), cached.pin_memory()
        while True:
            yield images, cached

    def _real_batches(self, args: argparse.Namespace, visual: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        folder = image_folder(Path(args.data) / "train")
        dataset: Dataset
        if self.setting.cached:
            if not args.teacher_cache:
                raise LGDError("cached=true with --data needs --teacher-cache DIR (built by python -m lgd.cache)")
            check_cache_teacher(self.setting.teacher, args.teacher_cache)
            cache = open_teacher_cache(args.teacher_cache, visual=visual, folder=folder,
                                       image_size=self.setting.image_size, min_scale=args.min_crop_scale)
            dataset = CachedViewDataset(folder, cache)
        else:
            dataset = SeededImageFolder(folder, MocoV2View(self.setting.image_size, min_scale=args.min_crop_scale), args.seed)
        sampler = EpochSampler(dataset, du.world_size(), du.rank(), seed=args.seed)
        loader = DataLoader(dataset, batch_size=self.local_batch, sampler=sampler, num_workers=args.workers,
                            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0,
                            prefetch_factor=4 if args.workers > 0 else None)
        if len(loader) == 0:
            raise LGDError(f"{folder.root} has fewer than one batch of {self.setting.batch_size} images")
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for batch in loader:
                yield batch[0], (batch[3] if self.setting.cached else None)
            epoch += 1

    def step(self, keep: bool) -> None:
        """One timed training step; ``keep`` adds it to the statistics (warm-up steps are dropped)."""
        timer = PhaseTimer(self.device)
        synchronize(self.device)
        self.memory.start()
        begin = time.perf_counter()
        data_begin = time.perf_counter()
        images, cached = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        if self.setting.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        t = teacher_embeddings(cached, self.device) if self.setting.cached else None
        data_seconds = time.perf_counter() - data_begin
        lgd_step(images, self.state, self.model, self.teacher, self.tsb, self.cfg, self.autocast, t=t, phase=timer)
        synchronize(self.device)
        total = time.perf_counter() - begin
        if keep:
            self.records.append({"step": total, "data": data_seconds, **timer.seconds()})
            self.peak = max(self.peak, self.memory.peak_bytes())

    def summary(self) -> dict[str, Any]:
        keys = ["step", *PHASES]
        stats = {k: spread([r.get(k, 0.0) for r in self.records]) for k in keys}
        peak = torch.tensor([float(self.peak)], device=self.device)
        if du.is_dist():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {
            "setting": dataclasses.asdict(self.setting),
            "seconds": stats,
            "img_per_s": self.setting.batch_size / stats["step"]["median"],
            "peak_memory_bytes": int(peak.item()),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else f"rss_{self.memory.scope}",
            "records": self.records,
        }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How much faster B is than A; with a live teacher vs the cache, also the ideal ratio."""
    steps_a, steps_b = ([r["step"] for r in x["records"]] for x in (a, b))
    paired = [x / y for x, y in zip(steps_a, steps_b)]
    result = {"speedup": a["seconds"]["step"]["median"] / b["seconds"]["step"]["median"], "paired": spread(paired)}
    other = {k for k in a["setting"] if a["setting"][k] != b["setting"][k]}
    if other == {"cached"} and not a["setting"]["cached"]:
        live = a["seconds"]
        rest = live["step"]["median"] - live["teacher"]["median"]
        result["ideal"] = live["step"]["median"] / rest
        result["of_ideal"] = result["speedup"] / result["ideal"]
        # The same per alternating pair, (live - teacher) / cached: robust against slow load drift.
        teacher = [r["teacher"] for r in a["records"]]
        result["of_ideal_paired"] = spread([(x - t) / y for x, t, y in zip(steps_a, teacher, steps_b)])
    return result


def bench_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    towers: dict[tuple[str, int], tuple[nn.Module, int]] = {}
    groups = []
    # Real data: each loader worker prefetches 4 batches at start-up; timing that burst would hide data waits.
    warmup = max(args.warmup, 4 * args.workers + 1) if args.data else args.warmup
    for arch in args.arch:
        base = Setting(args.teacher, arch, args.image_size, args.batch_size, args.amp, args.channels_last,
                       args.compile, args.cached)
        settings = [parse_override(spec, base) for spec in args.compare] if args.compare else [base]
        runners = [StepRunner(s, args, device, towers) for s in settings]
        label = f"{arch}: {' vs '.join(args.compare)}" if args.compare else arch
        alternate(runners, warmup, args.steps, label)
        results = [r.summary() for r in runners]
        group: dict[str, Any] = {"arch": arch, "results": results, "warmup_steps": warmup}
        if len(results) == 2:
            group["compare"] = compare(*results)
        groups.append(group)
        release(runners)
    return {"groups": groups}


def alternate(runners: list[StepRunner], warmup: int, steps: int, label: str) -> None:
    """A B, B A, A B, ...: neither setting always runs right after the other one."""
    for i in tqdm(range(warmup + steps), desc=label, unit="step", disable=not du.is_main(), dynamic_ncols=True):
        for runner in runners if i % 2 == 0 else runners[::-1]:
            runner.step(keep=i >= warmup)


def release(runners: list[StepRunner]) -> None:
    """Free one arch's runners (models, optimizer state, loader workers) before the next arch is measured:
    each runner's batch generator refers back to it, so without this only a later full GC would free them."""
    for runner in runners:
        runner.batches.close()
    runners.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- loader mode
def write_synthetic_jpegs(root: Path, count: int, size: tuple[int, int], classes: int = 4, seed: int = 0) -> None:
    """``count`` photo-like JPEGs (smooth colour fields with grain, quality 90) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in tqdm(range(count), desc="writing synthetic JPEGs", unit="img", leave=False, dynamic_ncols=True,
                  disable=not du.is_main()):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def bench_loader(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if args.warmup < 1:
        raise LGDError("--warmup must be at least 1 in loader mode (worker start-up is not loading speed)")
    with contextlib.ExitStack() as stack:
        if args.data:
            root = Path(args.data) / "train"
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lgd-bench-"))) / "train"
            width, _, height = args.jpeg_size.partition("x")
            write_synthetic_jpegs(root, args.images, (int(width), int(height)))
        folder = image_folder(root)
        dataset: Dataset
        if args.teacher_cache:
            check_cache_teacher(args.teacher, args.teacher_cache)
            visual = load_visual(args.teacher, args.image_size, args.cache_dir)[0]
            cache = open_teacher_cache(args.teacher_cache, visual=visual, folder=folder, image_size=args.image_size,
                                       min_scale=args.min_crop_scale)
            dataset = CachedViewDataset(folder, cache)
        else:
            dataset = SeededImageFolder(folder, MocoV2View(args.image_size, min_scale=args.min_crop_scale), args.seed)
        sizes = []
        for path, _ in folder.samples[:64]:
            with Image.open(path) as image:
                sizes.append(image.size)
        mean_bytes = statistics.mean(os.path.getsize(p) for p, _ in folder.samples[:64])
        rows = []
        for workers in args.workers:
            sampler = EpochSampler(dataset, 1, 0, seed=args.seed)
            loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                pin_memory=device.type == "cuda")
            if len(loader) == 0:
                raise LGDError(f"{root} has fewer images than one batch of {args.batch_size}")
            # The workers start together and prefetch 4 batches each: until that burst is consumed, batches
            # arrive faster than the pipeline can sustain, so the clock starts after it.
            warmup = max(args.warmup, 4 * workers + 1)
            batches, images, begin, epoch = 0, 0, 0.0, 0
            threads = torch.get_num_threads()
            if workers == 0:
                torch.set_num_threads(1)  # like a DataLoader worker, so that the row is one worker's rate
            progress = tqdm(total=warmup + args.steps, desc=f"loader, {workers} worker(s)", unit="batch", leave=False,
                            dynamic_ncols=True, disable=not du.is_main())
            while batches < warmup + args.steps:
                sampler.set_epoch(epoch)
                for batch in loader:
                    batches += 1
                    progress.update()
                    if batches == warmup:
                        begin = time.perf_counter()
                    elif batches > warmup:
                        images += batch[0].shape[0]
                    if batches == warmup + args.steps:
                        break
                epoch += 1
            rate = images / (time.perf_counter() - begin)
            progress.close()
            torch.set_num_threads(threads)
            rows.append({"workers": workers, "img_per_s": rate, "img_per_s_per_worker": rate / max(1, workers),
                         "warmup_batches": warmup})
            del loader
    return {"images": len(folder.samples), "mean_size": [statistics.mean(s[i] for s in sizes) for i in (0, 1)],
            "mean_file_bytes": mean_bytes, "cached": bool(args.teacher_cache), "rows": rows}


# ----------------------------------------------------------------------------------------------- hot paths
@torch.no_grad()
def lgka_update_loop(bank: torch.Tensor, seen: torch.Tensor, t: torch.Tensor, tsb: torch.Tensor, momentum: float) -> None:
    """The straightforward LGKA update (the baseline of the ``hot`` rows): one Python step per class."""
    labels = (t @ tsb.T).argmax(1)
    for c in range(bank.shape[0]):
        members = labels == c
        if members.any():
            z = t[members].mean(0)
            bank[c] = momentum * bank[c] + (1 - momentum) * z if seen[c] else z
            seen[c] = True


def _time_pair(first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int,
               device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            fn = (first, second)[which]
            synchronize(device)
            begin = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[which].append(time.perf_counter() - begin)
    return spread(times[0]), spread(times[1])


def bench_hot(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    classes, batch, dim, momentum = args.classes, args.batch_size, args.dim, 0.999
    tsb = F.normalize(torch.randn(classes, dim, generator=generator), dim=1).to(device)
    t = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).to(device)
    start = F.normalize(torch.randn(classes, dim, generator=generator), dim=1).to(device)
    seen = (torch.rand(classes, generator=generator) < 0.5).to(device)  # both branches of the update

    vsb = VisualSemanticsBank(classes, dim, momentum).to(device)
    loop_bank, loop_seen = start.clone(), seen.clone()

    def vectorised() -> None:
        vsb.update(t, labels=(t @ tsb.T).argmax(1))

    def loop() -> None:
        lgka_update_loop(loop_bank, loop_seen, t, tsb, momentum)

    vsb.bank.copy_(start)
    vsb.seen.copy_(seen)
    vectorised()
    loop()
    lgka_diff = (vsb.bank - loop_bank).abs().max().item()
    lgka_same_seen = bool(torch.equal(vsb.seen, loop_seen))
    lgka_loop, lgka_vec = _time_pair(loop, vectorised, args.steps, args.warmup, device)

    s = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).to(device)
    bank = start.clone()

    def twice() -> None:
        lgd_loss(s, t, tsb, bank)
        vsb.assign(t, tsb)

    def shared() -> None:
        t_tsb = t @ tsb.T
        lgd_loss(s, t, tsb, bank, t_tsb=t_tsb)
        t_tsb.argmax(1)

    loss_twice, loss_shared = lgd_loss(s, t, tsb, bank)[0], lgd_loss(s, t, tsb, bank, t_tsb=t @ tsb.T)[0]
    tsb_twice, tsb_shared = _time_pair(twice, shared, args.steps, args.warmup, device)
    return {
        "classes": classes, "batch": batch, "dim": dim,
        "rows": [
            {"name": "LGKA update (incl. t @ TSB)", "baseline": "per-class loop", "optimised": "VisualSemanticsBank.update",
             "baseline_s": lgka_loop, "optimised_s": lgka_vec,
             "speedup": lgka_loop["median"] / lgka_vec["median"], "max_abs_diff": lgka_diff, "same_seen": lgka_same_seen},
            {"name": "loss + LGKA assignment", "baseline": "t @ TSB twice", "optimised": "t @ TSB shared",
             "baseline_s": tsb_twice, "optimised_s": tsb_shared,
             "speedup": tsb_twice["median"] / tsb_shared["median"],
             "max_abs_diff": (loss_twice - loss_shared).abs().item(), "same_seen": True},
        ],
    }


# ----------------------------------------------------------------------------------------------- output
def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_step(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"LGD training step: {env['device_name']} ({env['device']}, {env['world_size']} process(es), "
             f"{env['torch_threads']} torch threads), torch {env['torch']}, load average "
             f"{env['load_avg_start'][0]:.1f} -> {env['load_avg_end'][0]:.1f}",
             f"{'setting':<44} {'step ms (p25-p75)':>22} {'img/s':>8} " + " ".join(f"{p:>9}" for p in PHASES)
             + f" {'peak mem':>10}"]
    for group in report["groups"]:
        results = group["results"]
        varying = [k for k in results[0]["setting"] if len({_show(r["setting"][k]) for r in results}) > 1]
        shown = ["arch", *varying] if varying else ["teacher", "arch", "image_size", "batch_size", "cached"]
        for r in results:
            sec = r["seconds"]
            label = " ".join(f"{k}={_show(r['setting'][k])}" for k in shown)
            step = sec["step"]
            lines.append(f"{label:<44} {step['median'] * 1e3:>9.1f} ({step['p25'] * 1e3:.0f}-{step['p75'] * 1e3:.0f})"
                         .ljust(44 + 1 + 22) + f" {r['img_per_s']:>8.1f} "
                         + " ".join(f"{sec[p]['median'] * 1e3:>9.1f}" for p in PHASES) + f" {_gb(r['peak_memory_bytes']):>10}")
        if "compare" in group:
            c = group["compare"]
            a, b = (" ".join(f"{k}={_show(r['setting'][k])}" for k in varying) for r in results)
            line = (f"  {group['arch']}: {b} is {c['speedup']:.2f}x as fast as {a} (paired median {c['paired']['median']:.2f}x, "
                    f"p25-p75 {c['paired']['p25']:.2f}-{c['paired']['p75']:.2f})")
            if "ideal" in c:
                line += (f"; ideal (teacher + rest) / rest = {c['ideal']:.2f}x -> {c['of_ideal']:.0%} of ideal "
                         f"(paired median {c['of_ideal_paired']['median']:.0%})")
            lines.append(line)
    lines.append("times are medians in ms over the measured steps; phases: data wait, teacher forward, student "
                 "forward+loss+backward, optimizer, LGKA update")
    return "\n".join(lines)


def format_loader(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"LGD data loader: {report['images']} images, mean {report['mean_size'][0]:.0f}x{report['mean_size'][1]:.0f} px, "
             f"{report['mean_file_bytes'] / 1e3:.0f} kB; {'cached views' if report['cached'] else 'live MoCo-v2 views'} "
             f"at {report['image_size']} px; {env['device_name']}, load average {env['load_avg_start'][0]:.1f} -> "
             f"{env['load_avg_end'][0]:.1f}",
             f"{'workers':>8} {'img/s':>10} {'img/s per worker':>18}"]
    for row in report["rows"]:
        lines.append(f"{row['workers']:>8} {row['img_per_s']:>10.1f} {row['img_per_s_per_worker']:>18.1f}")
    lines.append("workers=0: decoding and augmenting in the main process, with one torch thread like a worker; "
                 "with N workers the clock starts after the first 4N+1 batches (their prefetch burst)")
    return "\n".join(lines)


def format_hot(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"LGD hot paths at C={report['classes']}, B={report['batch']}, D={report['dim']} on {env['device_name']} "
             f"({env['device']}, {env['torch_threads']} torch threads), load average {env['load_avg_start'][0]:.1f} -> "
             f"{env['load_avg_end'][0]:.1f}",
             f"{'path':<30} {'baseline':<16} {'ms':>8} {'optimised':<28} {'ms':>8} {'speed-up':>9} {'max |diff|':>11}"]
    for row in report["rows"]:
        lines.append(f"{row['name']:<30} {row['baseline']:<16} {row['baseline_s']['median'] * 1e3:>8.2f} "
                     f"{row['optimised']:<28} {row['optimised_s']['median'] * 1e3:>8.2f} {row['speedup']:>8.2f}x "
                     f"{row['max_abs_diff']:>11.1e}")
    return "\n".join(lines)


def format_summary(files: Sequence[str]) -> str:
    """One Markdown row per measured setting of the given step-mode JSON files."""
    lines = ["| date | device | procs | teacher -> student | px | batch | amp | channels_last | compile | teacher | "
             "img/s | step ms | peak mem | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in files:
        try:
            report = json.loads(Path(name).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LGDError(f"cannot read bench result {name}: {err}") from None
        if report.get("mode") != "step":
            continue
        env = report["env"]
        for group in report["groups"]:
            for i, r in enumerate(group["results"]):
                s = r["setting"]
                c = group.get("compare")
                speed = ""
                if c and i == 1:
                    speed = f"{c['speedup']:.2f}x" + (f" ({c['of_ideal']:.0%} of ideal)" if "of_ideal" in c else "")
                lines.append(f"| {env['date'][:10]} | {env['device_name']} | {env['world_size']} | {s['teacher']} -> {s['arch']} | "
                             f"{s['image_size']} | {s['batch_size']} | {s['amp']} | {_show(s['channels_last'])} | "
                             f"{_show(s['compile'])} | {'cache' if s['cached'] else 'live'} | {r['img_per_s']:.0f} | "
                             f"{r['seconds']['step']['median'] * 1e3:.0f} | {_gb(r['peak_memory_bytes'])} | {speed} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lgd.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["step", "loader", "hot", "summary"], default="step", help="what to measure")
    p.add_argument("--teacher", default="random:RN50",
                   help=f"random:{{{','.join(RANDOM_TOWERS)}}} (random weights), an official CLIP name, a checkpoint path, or 'toy'")
    p.add_argument("--arch", nargs="+", default=["mobilenet_v2"], choices=available_students(),
                   help="student(s); several run one after the other in this process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (step: 32, loader: 32, hot: 256 = the LGKA batch B)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast as in lgd.train")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the student")
    p.add_argument("--cached", action=argparse.BooleanOptionalAction, default=False,
                   help="teacher embeddings from a cache instead of the teacher (synthetic, or --teacher-cache)")
    p.add_argument("--compare", nargs=2, metavar="SPEC", default=None,
                   help="two settings KEY=VALUE[,KEY=VALUE] over the options above, e.g. cached=false cached=true")
    p.add_argument("--data", default="", help="ImageFolder root with train/ (default: synthetic in-memory batches)")
    p.add_argument("--teacher-cache", default="", help="a cache built by python -m lgd.cache (with --data)")
    p.add_argument("--min-crop-scale", type=float, default=0.2)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="data-loading processes (loader mode: one or more counts to measure; default 0 2)")
    p.add_argument("--images", type=int, default=256, help="loader mode: synthetic JPEGs to generate")
    p.add_argument("--jpeg-size", default="500x375", help="loader mode: WxH of synthetic JPEGs (ImageNet-like)")
    p.add_argument("--classes", type=int, default=1000, help="C: rows of the banks")
    p.add_argument("--dim", type=int, default=1024, help="hot mode: embedding width D")
    p.add_argument("--steps", type=int, default=None, help="measured steps per setting (step: 10, loader: 20, hot: 30)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (step: 2, loader: 2 and at least 4 x workers + 1, hot: 5)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="", help="toy-world home for --teacher toy")
    p.add_argument("--json", default="", help="result file (default runs/bench/<mode>-<time>.json)")
    p.add_argument("files", nargs="*", help="summary mode: JSON results to tabulate")
    return p


DEFAULTS = {"step": {"batch_size": 32, "steps": 10, "warmup": 2, "workers": [0]},
            "loader": {"batch_size": 32, "steps": 20, "warmup": 2, "workers": [0, 2]},
            "hot": {"batch_size": 256, "steps": 30, "warmup": 5, "workers": [0]}}


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    args = build_parser().parse_args(argv)
    if args.mode == "summary":
        table = format_summary(args.files)
        print(table)
        return table
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode == "step":
        args.workers = args.workers[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("steps", "batch_size", "image_size", "classes"):
        if getattr(args, key) <= 0:
            raise LGDError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    device = du.init_distributed(args.device)
    env = environment(device)
    run = {"step": bench_step, "loader": bench_loader, "hot": bench_hot}[args.mode]
    report = {"mode": args.mode, "env": env, "image_size": args.image_size, **run(args, device)}
    env["load_avg_end"] = list(os.getloadavg())
    if du.is_main():
        text = {"step": format_step, "loader": format_loader, "hot": format_hot}[args.mode](report)
        print(text)
        out = Path(args.json or f"runs/bench/{args.mode}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
        atomic_write_json(out, report)
        print(f"results: {out}")
    du.cleanup()
    return report


if __name__ == "__main__":
    main()
