"""Teacher-embedding cache: ``python -m lgd.cache`` runs the frozen teacher once, ahead of training.

The teacher never changes, so its embedding of a given augmented view never changes either. For every
training image the cache stores K views: the exact augmentation parameters (``lgd.views.PARAMS_DTYPE``)
and the teacher's L2-normalised embedding in fp16. Training with ``--teacher-cache DIR`` takes view
``epoch % K`` of each image, re-renders exactly that view for the student and skips the teacher.

View ``k`` of image ``i`` is the view live training would draw for that image in epoch ``k`` with the
cache's seed (the same per-sample seeding as ``SeededImageFolder``), so with ``K >= epochs`` and the
same seed a cached run sees the views of the live run.

A cache folder holds ``manifest.json`` (what the cache is valid for: teacher fingerprint, dataset
fingerprint, K, seed, view settings; and its layout) and ``chunk_NNNNNN.npy`` files, each a [rows, K]
structured array for ``chunk_images`` consecutive images, read through memory maps. A chunk file
appears, by atomic rename, only once all of its rows are computed: an interrupted build leaves whole
chunks and nothing else, and running the same command again computes only the missing ones. Under
``torchrun`` the missing chunks are split over the ranks.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from tqdm import tqdm

import clip

from . import distributed as du
from .config import opt, parse_config
from .data import UNREADABLE, VIEW_INTERPOLATION, image_folder, loader_workers, rgb_loader, sample_seed
from .checkpoint import atomic_file, atomic_write_json
from .errors import LGDError, cli_entry
from .toyworld import ensure_toy_world
from .views import PARAMS_DTYPE, MocoV2View, ViewParams, check_teacher_resolution

FORMAT = "lgd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
# Manifest entries that decide what the stored numbers are; the rest ("built") is informational.
IDENTITY_KEYS = ("format", "version", "teacher", "dataset", "views", "seed", "view", "chunk_images", "record_dtype")


@dataclass
class CacheConfig:
    """What to cache: the teacher and the view settings must match the training run that will use it."""

    data: str = field(default="", metadata=opt("ImageFolder root with train/ (as for lgd.train), or 'toy'"))
    output: str = field(default="", metadata=opt("cache folder (created; an interrupted build there is resumed)"))
    teacher: str = field(default="RN50", metadata=opt("CLIP teacher: an official name, a checkpoint path, or 'toy'"))
    clip_root: str = field(default="", metadata=opt("download folder for official CLIP weights (default ~/.cache/clip)"))
    views: int = field(default=10, metadata=opt("K: cached views per image (training uses view epoch %% K)"))
    seed: int = field(default=0, metadata=opt("augmentation seed (use the training seed to cache the live run's views)"))
    image_size: int = field(default=224, metadata=opt("view resolution (must equal the training --image-size)"))
    min_crop_scale: float = field(default=0.2, metadata=opt("smallest crop area fraction (must equal the training one)"))
    batch_size: int = field(default=256, metadata=opt("views per teacher forward, per process"))
    chunk_images: int = field(default=2048, metadata=opt("images per chunk file (the unit of resumption)"))
    workers: int = field(default=8, metadata=opt("data-loading processes per rank"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    teacher_dtype: str = field(default="auto", metadata=opt("teacher precision: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16",
                                                             choices=["auto", "fp32", "fp16", "bf16"]))
    channels_last: bool = field(default=False, metadata=opt("channels_last memory format for the teacher"))
    cache_dir: str = field(default="", metadata=opt("toy-world home when --data/--teacher is 'toy' (default $LGD_HOME)"))


def record_dtype(embed_dim: int) -> np.dtype:
    """One cached view: its augmentation parameters, the image actually read, the fp16 embedding."""
    return np.dtype(PARAMS_DTYPE.descr + [("source", "<i4"), ("embedding", "<f2", (embed_dim,))])


def visual_tower_fingerprint(visual: nn.Module) -> str:
    """SHA-256 over the image tower's weights (as fp32): the cached embeddings depend on nothing else."""
    digest = hashlib.sha256()
    for key, value in sorted(visual.state_dict().items()):
        digest.update(f"{key}:{tuple(value.shape)}".encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(folder: datasets.ImageFolder) -> str:
    """SHA-256 over (relative path, label, size, mtime in s) of every image, in ImageFolder order.

    Copies of the dataset keep the fingerprint when they keep modification times (``rsync -a``, ``cp -p``).
    """
    prefix = os.path.join(folder.root, "")
    digest = hashlib.sha256()
    for path, label in folder.samples:
        st = os.stat(path)
        digest.update(f"{path[len(prefix):]}\t{label}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
    return digest.hexdigest()


def teacher_embeddings(cached: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cached fp16 rows -> unit-norm fp32 teacher embeddings on ``device`` (what ``lgd_step`` takes as ``t``)."""
    return F.normalize(cached.to(device, non_blocking=True).float(), dim=-1)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LGDError(f"{path} is unreadable ({err}); delete the folder and build the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LGDError(f"{root} holds a {MANIFEST} that is not a teacher cache's; choose another --output")
    if manifest.get("version", 0) > VERSION:
        raise LGDError(f"{root} is a teacher cache of version {manifest['version']}; this lgd reads up to {VERSION}")
    return manifest


def _describe(key: str, value: Any) -> str:
    if key == "teacher":
        return f"teacher {value['name']!r} (visual tower {value['fingerprint'][:12]}, D={value['embed_dim']})"
    if key == "dataset":
        return f"a dataset of {value['images']} images in {value['classes']} classes (fingerprint {value['fingerprint'][:12]})"
    return f"{key}={value}"


def _identity(manifest: dict[str, Any], key: str) -> Any:
    value = manifest.get(key)
    if key == "teacher" and isinstance(value, dict):  # the same weights may be named differently
        return {k: v for k, v in value.items() if k != "name"}
    return value


def _differences(built: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"built for {_describe(k, built.get(k))}, asked for {_describe(k, wanted.get(k))}"
            for k in IDENTITY_KEYS if _identity(built, k) != _identity(wanted, k)]


class TeacherCache:
    """A cache folder opened for reading: its manifest, and records by (image, view) via memory maps."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise LGDError(f"no teacher cache in {self.root} (no {MANIFEST}); build one with `python -m lgd.cache`")
        self.manifest = manifest
        self.views: int = manifest["views"]
        self.num_images: int = manifest["dataset"]["images"]
        self.chunk_images: int = manifest["chunk_images"]
        self.num_chunks = math.ceil(self.num_images / self.chunk_images)
        self.embed_dim: int = manifest["teacher"]["embed_dim"]
        self.dtype = record_dtype(self.embed_dim)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    # Every open map holds a file descriptor: ImageNet at the default chunk size has 626 chunks, past the
    # usual limit of 1024 descriptors once a DataLoader adds its own. Keep only the recently used ones.
    max_open_maps = 64

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps must not be pickled into DataLoader workers (numpy would copy them whole).
        return {**self.__dict__, "_maps": OrderedDict()}

    def chunk_path(self, chunk: int) -> Path:
        return self.root / f"chunk_{chunk:06d}.npy"

    def chunk_rows(self, chunk: int) -> int:
        return min(self.chunk_images, self.num_images - chunk * self.chunk_images)

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.chunk_path(c).is_file()]

    def _open(self, chunk: int) -> np.ndarray:
        path = self.chunk_path(chunk)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise LGDError(f"cannot read {path} ({err}); delete it and rerun `python -m lgd.cache` to rebuild it") from None
        if array.dtype != self.dtype or array.shape != (self.chunk_rows(chunk), self.views):
            raise LGDError(f"{path} holds {array.shape} records of another layout than {MANIFEST} describes; "
                           "delete it and rerun `python -m lgd.cache` to rebuild it")
        return array

    def _chunk(self, chunk: int) -> np.ndarray:
        array = self._maps.get(chunk)
        if array is None:
            array = self._maps[chunk] = self._open(chunk)
            if len(self._maps) > self.max_open_maps:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(chunk)
        return array

    def record(self, index: int, view: int) -> np.void:
        """The stored record of view ``view`` of image ``index`` (parameters, source, embedding)."""
        chunk, row = divmod(index, self.chunk_images)
        return self._chunk(chunk)[row, view]

    def check(self, *, teacher_fingerprint: str, folder: datasets.ImageFolder, image_size: int, min_scale: float) -> None:
        """Refuse a cache that was built for another teacher, dataset or view size, or is incomplete."""
        manifest, where = self.manifest, self.root
        problems = []
        if manifest["teacher"]["fingerprint"] != teacher_fingerprint:
            problems.append(f"it was built for another teacher ({_describe('teacher', manifest['teacher'])}; "
                            f"this run's teacher has visual-tower fingerprint {teacher_fingerprint[:12]})")
        dataset = manifest["dataset"]
        if dataset["images"] != len(folder.samples) or dataset["fingerprint"] != dataset_fingerprint(folder):
            problems.append(f"it was built for {_describe('dataset', dataset)}, but {folder.root} has "
                            f"{len(folder.samples)} images whose list, sizes or modification times differ")
        view = manifest["view"]
        if (view["image_size"], view["min_scale"]) != (image_size, min_scale):
            problems.append(f"its views are {view['image_size']} px crops of min scale {view['min_scale']}, "
                            f"this run asks for {image_size} px and {min_scale}")
        built_with = view.get("interpolation", "bicubic")  # caches of lgd before 2026-11-28 resized bicubically
        if built_with != VIEW_INTERPOLATION.value:
            problems.append(f"its embeddings are of {built_with}-resized crops, this lgd renders the student's view "
                            f"{VIEW_INTERPOLATION.value}, so they would not be the same images")
        if problems:
            raise LGDError(f"cannot use the teacher cache {where}: " + "; ".join(problems)
                           + ". Build a matching cache with `python -m lgd.cache`, or train without --teacher-cache")
        missing = self.missing_chunks()
        if missing:
            raise LGDError(f"the teacher cache {where} is incomplete ({len(missing)} of {self.num_chunks} chunks "
                           "missing); finish it by rerunning the `python -m lgd.cache` command that built it")
        for chunk in range(self.num_chunks):
            self._open(chunk)  # validates every chunk header once, up front (the map closes again)


def open_teacher_cache(root: str | os.PathLike, *, visual: nn.Module, folder: datasets.ImageFolder,
                       image_size: int, min_scale: float) -> TeacherCache:
    """Open a cache for training with ``visual`` on ``folder``; raises ``LGDError`` if it does not fit."""
    cache = TeacherCache(root)
    cache.check(teacher_fingerprint=visual_tower_fingerprint(visual), folder=folder, image_size=image_size,
                min_scale=min_scale)
    return cache


class CachedViewDataset(Dataset):
    """Training images from the cache, indexed by ``(index, epoch)`` like ``SeededImageFolder``.

    Returns ``(view, label, skipped, embedding)``: the view re-rendered from the stored parameters of
    view ``epoch % K``, the label of the image read, how many unreadable files the build skipped to
    find it, and the stored fp16 teacher embedding of that view.
    """

    def __init__(self, folder: datasets.ImageFolder, cache: TeacherCache) -> None:
        if len(folder.samples) != cache.num_images:
            raise LGDError(f"{folder.root} has {len(folder.samples)} images, the cache {cache.root} {cache.num_images}")
        self.folder, self.cache = folder, cache
        self.classes = folder.classes
        view = cache.manifest["view"]
        self.view = MocoV2View(view["image_size"], view["norm"], view["min_scale"])

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.cache.record(index, epoch % self.cache.views)
        source = int(record["source"])
        path, label = self.folder.samples[source]
        try:
            image = rgb_loader(path)
        except UNREADABLE as err:
            raise LGDError(f"{path} was readable when the teacher cache was built but is not now ({err})") from None
        view = self.view.render(image, ViewParams.from_record(record))
        embedding = torch.from_numpy(np.array(record["embedding"]))
        return view, label, (source - index) % len(self), embedding


class _ImageViews(Dataset):
    """Build-time source: image ``i`` decoded once, its K views rendered, with their parameters.

    Seeding and the skipping of unreadable files follow ``SeededImageFolder`` with epoch = view.
    """

    def __init__(self, folder: datasets.ImageFolder, view: MocoV2View, seed: int, views: int) -> None:
        self.folder, self.view, self.seed, self.views = folder, view, seed, views

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> tuple[int, int, torch.Tensor, np.ndarray]:
        source = index
        while True:
            try:
                image = rgb_loader(self.folder.samples[source][0])
                break
            except UNREADABLE as err:
                warnings.warn(f"skipping unreadable image {self.folder.samples[source][0]}: {err}", stacklevel=2)
                source = (source + 1) % len(self)
                if source == index:
                    raise LGDError(f"no readable image in {self.folder.root}") from None
        tensors, records = [], np.zeros(self.views, dtype=PARAMS_DTYPE)
        for k in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, k, source))
                tensor, params = self.view.sample_and_render(image)
            tensors.append(tensor)
            records[k] = params.to_record()
        return index, source, torch.stack(tensors), records


def _collate_views(batch: Sequence[tuple[int, int, torch.Tensor, np.ndarray]]) -> tuple[list[int], list[int], torch.Tensor, np.ndarray]:
    indices, sources, tensors, records = zip(*batch)
    return list(indices), list(sources), torch.cat(tensors), np.stack(records)


def _atomic_save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_file(path) as f:
        np.save(f, array)


def _build_lock(out: Path, device: torch.device) -> IO[str] | None:
    """Rank 0 holds ``out/.build.lock`` for the whole build: a second build into the same folder would delete
    the first one's unfinished chunk files. Every rank learns the outcome, so all fail alike (none waits)."""
    handle, status, problem = None, torch.zeros(1), ""
    if du.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / ".build.lock", "w")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            status.fill_(1)
        except OSError as err:
            status.fill_(2)
            problem = str(err)
        if status.item() and handle is not None:
            handle.close()
            handle = None
    if du.is_dist():
        status = du.broadcast(status.to(device)).cpu()
    if status.item() == 1:
        raise LGDError(f"another `python -m lgd.cache` is building {out} right now; wait for it, or pass another --output")
    if status.item() == 2:
        raise LGDError(f"cannot create the cache folder {out}: {problem or 'see rank 0'}")
    return handle


TEACHER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --teacher-dtype


def _precision_name(flag: str) -> str:
    """How the teacher computes a cache's embeddings (FrozenTeacher: CLIP's mixed precision below fp32). Caches
    of lgd before 2026-11-28 do not say: their fp16 teachers were converted whole, with ``half()``."""
    return flag if flag == "fp32" else f"clip-mixed-{flag}"


def _teacher_flag(name: str, device: torch.device) -> str:
    """``auto``: fp16 on GPU, as a training run with AMP runs the teacher (the stored embeddings are fp16 anyway)."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return name


def _check_config(cfg: CacheConfig) -> None:
    if not cfg.data or not cfg.output:
        raise LGDError("pass --data (an ImageFolder root with train/, or 'toy') and --output (the cache folder)")
    for key in ("views", "image_size", "batch_size", "chunk_images"):
        if getattr(cfg, key) <= 0:
            raise LGDError(f"--{key.replace('_', '-')} must be positive, got {getattr(cfg, key)}")
    if not 0.0 < cfg.min_crop_scale <= 1.0:
        raise LGDError(f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}")


def build_cache(cfg: CacheConfig) -> TeacherCache:
    """Build (or finish) the cache ``cfg.output``; every rank of a torchrun job computes its share."""
    from .train import FrozenTeacher  # lgd.train imports this module

    _check_config(cfg)
    device = du.init_distributed(cfg.device)
    data, teacher_name = Path(cfg.data), cfg.teacher
    if "toy" in (cfg.data, cfg.teacher):
        with du.local_main_first():
            world = ensure_toy_world(Path(cfg.cache_dir) if cfg.cache_dir else None, verbose=du.is_main())
        data = world.data if cfg.data == "toy" else data
        teacher_name = str(world.teacher) if cfg.teacher == "toy" else teacher_name
    folder = image_folder(data / "train")
    with du.local_main_first():
        clip_model, _ = clip.load(teacher_name, device="cpu", download_root=cfg.clip_root or None)
    embed_dim = int(clip_model.text_projection.shape[1])
    visual = clip_model.visual
    del clip_model
    check_teacher_resolution(visual, cfg.image_size, teacher_name)
    view = MocoV2View(cfg.image_size, "clip", cfg.min_crop_scale)
    flag = _teacher_flag(cfg.teacher_dtype, device)
    dtype = TEACHER_DTYPES[flag]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"name": cfg.teacher, "fingerprint": visual_tower_fingerprint(visual), "embed_dim": embed_dim},
        "dataset": {"images": len(folder.samples), "classes": len(folder.classes), "fingerprint": dataset_fingerprint(folder)},
        "views": cfg.views,
        "seed": cfg.seed,
        "view": {"kind": "moco_v2", "image_size": cfg.image_size, "min_scale": cfg.min_crop_scale, "norm": view.norm,
                 "interpolation": VIEW_INTERPOLATION.value},
        "chunk_images": cfg.chunk_images,
        "record_dtype": str(record_dtype(embed_dim).descr),
        "built": {"root": str(folder.root), "teacher_dtype": str(dtype).removeprefix("torch."),
                  "teacher_precision": _precision_name(flag), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "pillow": PIL.__version__},
    }
    out = Path(cfg.output)
    existing = _read_manifest(out) if out.is_dir() else None  # every rank checks, so all fail alike
    if existing is not None and _differences(existing, manifest):
        raise LGDError(f"{out} already holds a teacher cache that does not match this command: "
                       + "; ".join(_differences(existing, manifest))
                       + ". Pass another --output, or delete that folder to rebuild")
    if dtype == torch.bfloat16 and du.is_main():
        print("note: a bf16 teacher rounds its embeddings to 8 mantissa bits; with the teacher temperature 0.01 "
              "that moves the target logits by whole units (fp16 or fp32 do not)", flush=True)
    lock = _build_lock(out, device)
    try:
        du.barrier()
        if du.is_main():
            for stale in out.glob(".chunk_*.tmp"):  # left by an interrupted build; never read
                stale.unlink()
            if existing is None or not any(out.glob("chunk_*.npy")):  # no chunk yet: this run's precision is the cache's
                atomic_write_json(out / MANIFEST, manifest)
        du.barrier()
        existing = _read_manifest(out)

        cache = TeacherCache(out)
        missing = cache.missing_chunks()
        du.barrier()  # every rank has listed the same chunks before any rank writes one
        built_with, this_run = existing["built"].get("teacher_precision"), manifest["built"]["teacher_precision"]
        if missing and len(missing) < cache.num_chunks and built_with != this_run:
            raise LGDError(f"the chunks already in {out} were computed by a {built_with or 'half()-converted fp16'} "
                           f"teacher, this command runs a {this_run} one, and one cache must hold one precision: "
                           + (f"add --teacher-dtype {built_with.removeprefix('clip-mixed-')}"
                              if built_with and built_with.removeprefix("clip-mixed-") in TEACHER_DTYPES
                              else "delete the folder to rebuild it"))
        mine = missing[du.rank()::du.world_size()]
        per_batch = max(1, cfg.batch_size // cfg.views)
        batches = [list(range(start, min(start + per_batch, c * cache.chunk_images + cache.chunk_rows(c))))
                   for c in mine for start in range(c * cache.chunk_images, c * cache.chunk_images + cache.chunk_rows(c), per_batch)]
        if du.is_main():
            size_gb = cache.num_images * cfg.views * cache.dtype.itemsize / 1e9
            done = cache.num_chunks - len(missing)
            print(f"teacher cache {out}: {cache.num_images} images x {cfg.views} views, D={embed_dim} fp16 ({size_gb:.2f} GB); "
                  f"{done}/{cache.num_chunks} chunks already built; {du.world_size()} process(es), teacher {dtype} on {device}",
                  flush=True)
        teacher = FrozenTeacher(visual, dtype).to(device)
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        loader = DataLoader(_ImageViews(folder, view, cfg.seed, cfg.views), batch_sampler=batches, num_workers=loader_workers(cfg.workers),
                            collate_fn=_collate_views, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if cfg.workers > 0 else None)
        buffers: dict[int, np.ndarray] = {}
        left: dict[int, int] = {}
        start = time.time()
        bar = tqdm(total=sum(len(b) for b in batches), desc="caching teacher embeddings", unit="img",
                   disable=not du.is_main(), dynamic_ncols=True)
        for indices, sources, tensors, records in loader:
            images = tensors.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            embedding = teacher(images).half()
            if not torch.isfinite(embedding).all():
                raise LGDError(f"the teacher produced non-finite embeddings for images {indices[0]}..{indices[-1]}; "
                               "try --teacher-dtype fp32")
            chunk, first = divmod(indices[0], cache.chunk_images)
            if chunk not in buffers:
                buffers[chunk], left[chunk] = np.zeros((cache.chunk_rows(chunk), cfg.views), cache.dtype), cache.chunk_rows(chunk)
            rows = buffers[chunk][first : first + len(indices)]
            rows["embedding"] = embedding.cpu().numpy().reshape(len(indices), cfg.views, embed_dim)
            rows["source"] = np.asarray(sources, dtype=np.int32)[:, None]
            for name in PARAMS_DTYPE.names:
                rows[name] = records[name]
            left[chunk] -= len(indices)
            if left[chunk] == 0:
                _atomic_save_npy(buffers.pop(chunk), cache.chunk_path(chunk))
            bar.update(len(indices))
        bar.close()
        du.barrier()
        missing = cache.missing_chunks()
        if missing:
            raise LGDError(f"{len(missing)} chunks of {out} are still missing after the build; rerun the same command")
        if du.is_main():
            print(f"teacher cache complete: {out} ({time.time() - start:.0f}s for this run's share)", flush=True)
        return cache
    finally:
        if lock is not None:
            lock.close()


@cli_entry
def main(argv: Sequence[str] | None = None) -> TeacherCache:
    cfg = parse_config(CacheConfig, argv, description="Precompute the frozen teacher's embeddings of K views per image")
    cache = build_cache(cfg)
    du.cleanup()
    return cache


if __name__ == "__main__":
    main()
