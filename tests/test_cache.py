"""Parameterised MoCo-v2 views and the teacher-embedding cache (lgd.views, lgd.cache).

Everything runs on a dozen generated images and a tiny random-weight CLIP at 32 px, so the whole file
takes seconds; the toy world is not needed.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
from lgd.cache import CacheConfig, CachedViewDataset, TeacherCache, build_cache, open_teacher_cache
from lgd.checkpoint import atomic_torch_save
from lgd.config import parse_config
from lgd.data import SeededImageFolder, image_folder, moco_v2_transform
from lgd.errors import LGDError
from lgd.toyworld import tiny_clip
from lgd.views import MocoV2View, ViewParams

SIZE, MIN_SCALE, SEED, VIEWS = 32, 0.3, 7, 2
pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image")  # the planted broken file


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: fanning out to threads costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field (compresses and resizes like a photo, unlike white noise)."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ImageFolder (11 files, one of them unreadable), two tiny teachers, a template file."""
    root = tmp_path_factory.mktemp("cache_world")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red thing", "blue thing"]):
        folder = root / "data" / "train" / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(5):
            _image(rng, 40 + 7 * i, 36 + 5 * c).save(folder / f"{i:02d}.png")
    (root / "data" / "train" / "red_thing" / "02b_broken.png").write_bytes(b"not a png")
    teachers = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers[seed] = root / f"teacher{seed}.pt"
        atomic_torch_save(tiny_clip().state_dict(), teachers[seed])
    (root / "templates.txt").write_text("a photo of a {}.\n")
    return {"root": root, "data": root / "data", "teacher": teachers[0], "other_teacher": teachers[1],
            "templates": root / "templates.txt"}


def _build(world: dict[str, Path], out: Path, *extra: str) -> TeacherCache:
    return _cache_cli(["--data", str(world["data"]), "--teacher", str(world["teacher"]), "--output", str(out),
                       "--views", str(VIEWS), "--seed", str(SEED), "--image-size", str(SIZE),
                       "--min-crop-scale", str(MIN_SCALE), "--batch-size", "6", "--chunk-images", "4",
                       "--workers", "0", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def built(world: dict[str, Path]) -> TeacherCache:
    with pytest.warns(UserWarning, match="unreadable"):
        return _build(world, world["root"] / "cache")


def _cache_cli(argv: list[str]) -> TeacherCache:
    """``python -m lgd.cache ARGV`` without the exit-status wrapper, so errors stay exceptions."""
    return build_cache(parse_config(CacheConfig, argv))


def _visual(teacher: Path) -> torch.nn.Module:
    return clip.load(str(teacher), device="cpu")[0].visual


def test_view_equals_torchvision_transform_bit_for_bit() -> None:
    image = _image(np.random.default_rng(1), 60, 45)
    view, reference = MocoV2View(32, min_scale=0.2), moco_v2_transform(32, min_scale=0.2)
    branches = set()
    for seed in range(40):
        torch.manual_seed(seed)
        expected, rng_after = reference(image), torch.rand(1)
        torch.manual_seed(seed)
        params = view.sample(image)
        got = view.render(image, params)
        assert torch.equal(got, expected), f"seed {seed}: {params}"
        assert torch.equal(torch.rand(1), rng_after), "the sampler must consume the RNG like the transforms"
        restored = ViewParams.from_record(params.to_record())
        assert restored == params and torch.equal(view.render(image, restored), got)
        branches |= {(name, getattr(params, name)) for name in ("jitter", "gray", "blur", "flip")}
    assert len(branches) == 8, "every optional step should be both taken and skipped by these seeds"


def test_cached_views_and_embeddings_are_exact(world: dict[str, Path], built: TeacherCache) -> None:
    from lgd.train import FrozenTeacher

    folder = image_folder(world["data"] / "train")
    cache = open_teacher_cache(built.root, visual=_visual(world["teacher"]), folder=folder, image_size=SIZE,
                               min_scale=MIN_SCALE)
    assert cache.num_chunks == 3 and cache.views == VIEWS
    cached = CachedViewDataset(folder, cache)
    live = SeededImageFolder(folder, MocoV2View(SIZE, min_scale=MIN_SCALE), SEED)
    teacher = FrozenTeacher(_visual(world["teacher"]), torch.float32)
    skipped_total = 0
    for index in range(len(cached)):
        for epoch in range(3):
            view, label, skipped, embedding = cached[(index, epoch)]
            live_view, live_label, live_skipped = live[(index, epoch % VIEWS)]
            # The cached view is the live run's view of epoch k, re-rendered from the stored parameters.
            assert torch.equal(view, live_view) and (label, skipped) == (live_label, live_skipped)
            assert embedding.dtype == torch.float16 and embedding.shape == (64,)
            expected = teacher(view[None])[0]
            torch.testing.assert_close(embedding.float(), expected, atol=2e-3, rtol=0)
            skipped_total += skipped
    assert skipped_total == 3  # the broken file, once per epoch


def test_open_memory_maps_are_bounded(world: dict[str, Path], built: TeacherCache, monkeypatch) -> None:
    """Each open chunk map holds a file descriptor: a 600-chunk ImageNet cache must not exhaust them."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to count file descriptors")
    monkeypatch.setattr(TeacherCache, "max_open_maps", 2)
    cache = TeacherCache(built.root)
    before = len(os.listdir("/proc/self/fd"))
    cache.check(teacher_fingerprint=cache.manifest["teacher"]["fingerprint"],
                folder=image_folder(world["data"] / "train"), image_size=SIZE, min_scale=MIN_SCALE)
    assert len(os.listdir("/proc/self/fd")) == before, "validating the chunks must not keep them open"
    records = {}
    for index in range(cache.num_images):  # touches all 3 chunks
        records[index] = cache.record(index, 0).tobytes()
    assert len(cache._maps) == 2 and len(os.listdir("/proc/self/fd")) <= before + 2
    assert all(cache.record(i, 0).tobytes() == r for i, r in records.items()), "a reopened chunk reads the same"


def test_interrupted_build_resumes_without_mixing(world: dict[str, Path], built: TeacherCache,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lgd.train

    out = tmp_path / "cache"
    forward = lgd.train.FrozenTeacher.forward
    calls = {"n": 0}

    def dies_on_third_batch(self: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # batches of 3 images: chunk 0 is written, chunk 1 is half done
            raise KeyboardInterrupt
        return forward(self, images)

    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _build(world, out)
    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", forward)
    partial = TeacherCache(out)
    assert partial.missing_chunks() == [1, 2]
    assert not list(out.glob(".*.tmp")), "an interrupted chunk must leave no file behind"
    folder = image_folder(world["data"] / "train")
    with pytest.raises(LGDError, match="incomplete"):
        open_teacher_cache(out, visual=_visual(world["teacher"]), folder=folder, image_size=SIZE, min_scale=MIN_SCALE)

    with pytest.raises(LGDError, match="computed by a fp32 teacher.*--teacher-dtype fp32"):
        _build(world, out, "--teacher-dtype", "fp16")  # chunks of another precision would be mixed in
    with open(out / ".build.lock", "w") as other_build:
        fcntl.flock(other_build, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LGDError, match="is building"):
            _build(world, out)  # it would delete the other build's unfinished chunk files

    (out / ".chunk_000001.x.tmp").write_bytes(b"debris of a killed process")
    first_chunk = os.stat(partial.chunk_path(0)).st_mtime_ns
    resumed = _build(world, out)
    assert os.stat(resumed.chunk_path(0)).st_mtime_ns == first_chunk, "complete chunks are not recomputed"
    assert not list(out.glob(".*.tmp"))
    for chunk in range(built.num_chunks):
        a, b = np.load(built.chunk_path(chunk)), np.load(resumed.chunk_path(chunk))
        assert a.tobytes() == b.tobytes(), f"chunk {chunk} differs from an uninterrupted build"


def test_a_build_stopped_before_its_first_chunk_takes_the_next_runs_precision(
        world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lgd.train

    out = tmp_path / "cache"
    forward = lgd.train.FrozenTeacher.forward
    calls = {"n": 0, "die_at": 1}

    def dies(self: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return forward(self, images)

    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", dies)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="unreadable"):
        _build(world, out)  # fp32: stopped on its first batch, a manifest and no chunk
    assert not list(out.glob("chunk_*.npy"))
    calls.update(n=0, die_at=3)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="unreadable"):
        _build(world, out, "--teacher-dtype", "bf16")  # chunk 0 is written in bf16
    assert json.loads((out / "manifest.json").read_text())["built"]["teacher_precision"] == "clip-mixed-bf16"
    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", forward)
    with pytest.raises(LGDError, match="computed by a clip-mixed-bf16 teacher.*--teacher-dtype bf16"):
        _build(world, out)


def test_mismatching_cache_is_refused(world: dict[str, Path], built: TeacherCache, tmp_path: Path) -> None:
    with pytest.raises(LGDError, match="views=2, asked for views=3"):
        _build(world, built.root, "--views", "3")
    with pytest.raises(LGDError, match="teacher"):
        _cache_cli(["--data", str(world["data"]), "--teacher", str(world["other_teacher"]), "--output", str(built.root),
                    "--views", str(VIEWS), "--seed", str(SEED), "--image-size", str(SIZE),
                    "--min-crop-scale", str(MIN_SCALE), "--chunk-images", "4", "--workers", "0", "--device", "cpu"])

    folder = image_folder(world["data"] / "train")
    with pytest.raises(LGDError, match="another teacher"):
        open_teacher_cache(built.root, visual=_visual(world["other_teacher"]), folder=folder, image_size=SIZE,
                           min_scale=MIN_SCALE)
    with pytest.raises(LGDError, match="64 px"):
        open_teacher_cache(built.root, visual=_visual(world["teacher"]), folder=folder, image_size=64,
                           min_scale=MIN_SCALE)
    copy = tmp_path / "train"
    shutil.copytree(world["data"] / "train", copy, copy_function=shutil.copy2)  # keeps mtimes: accepted
    open_teacher_cache(built.root, visual=_visual(world["teacher"]), folder=image_folder(copy), image_size=SIZE,
                       min_scale=MIN_SCALE)
    touched = copy / "blue_thing" / "01.png"
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 60))  # edited since the build?
    with pytest.raises(LGDError, match="modification times differ"):
        open_teacher_cache(built.root, visual=_visual(world["teacher"]), folder=image_folder(copy), image_size=SIZE,
                           min_scale=MIN_SCALE)
    _image(np.random.default_rng(5), 40, 40).save(copy / "blue_thing" / "99.png")
    with pytest.raises(LGDError, match="12 images"):
        open_teacher_cache(built.root, visual=_visual(world["teacher"]), folder=image_folder(copy), image_size=SIZE,
                           min_scale=MIN_SCALE)
    manifest = json.loads((built.root / "manifest.json").read_text())
    assert manifest["views"] == VIEWS and manifest["seed"] == SEED and manifest["dataset"]["images"] == 11

    old = tmp_path / "old_cache"  # built before views were resized bilinearly: its manifest has no interpolation
    shutil.copytree(built.root, old)
    del manifest["view"]["interpolation"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LGDError, match="bicubic-resized crops"):
        open_teacher_cache(old, visual=_visual(world["teacher"]), folder=folder, image_size=SIZE, min_scale=MIN_SCALE)


def _train(world: dict[str, Path], out: Path, *extra: str) -> list[dict]:
    from lgd.train import main as train_main

    train_main(["--data", str(world["data"]), "--teacher", str(world["teacher"]), "--text", "folder",
                "--templates", str(world["templates"]), "--arch", "mobilenet_v2", "--image-size", str(SIZE),
                "--min-crop-scale", str(MIN_SCALE), "--epochs", "2", "--batch-size", "4", "--workers", "0",
                "--seed", str(SEED), "--device", "cpu", "--log-interval", "1", "--warmup-epochs", "0", "--max-bad-images", "0.5",
                "--output", str(out), "--resume", "", "--cache-dir", str(world["root"] / "home"), *extra])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_from_cache_follows_the_live_run(world: dict[str, Path], built: TeacherCache, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import lgd.train

    forward = lgd.train.FrozenTeacher.forward

    def stored_precision(self: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(forward(self, images).half().float(), dim=-1)  # t as the cache stores it

    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", stored_precision)
    live = _train(world, tmp_path / "live")

    def no_teacher(self: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("training from the cache must not run the teacher")

    monkeypatch.setattr(lgd.train.FrozenTeacher, "forward", no_teacher)
    cached = _train(world, tmp_path / "cached", "--teacher-cache", str(built.root))
    assert len(cached) == len(live) == 4  # 11 images, batch 4: 2 steps per epoch, 2 epochs
    # Same seed and K = epochs: the same views and the same (fp16-stored) teacher embeddings, so the same
    # run; only summation order may differ (the cache was built with other batches).
    for a, b in zip(live, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), (a, b)


def _ddp_rank(rank: int, world: int, init_file: str, data: str, teacher: str, out: str, result: str) -> None:
    """One rank of a gloo job: build the cache split over the ranks, then one LGD step on this rank's shard."""
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from lgd.banks import VisualSemanticsBank
    from lgd.cache import teacher_embeddings
    from lgd.data import EpochSampler
    from lgd.models import build_student
    from lgd.train import State, TrainConfig, lgd_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cache = _cache_cli(["--data", data, "--teacher", teacher, "--output", out, "--views", str(VIEWS), "--seed", str(SEED),
                        "--image-size", str(SIZE), "--min-crop-scale", str(MIN_SCALE), "--batch-size", "6",
                        "--chunk-images", "4", "--workers", "0", "--device", "cpu"])
    dataset = CachedViewDataset(image_folder(Path(data) / "train"), cache)
    sampler = EpochSampler(dataset, world, rank, seed=SEED)
    sampler.set_epoch(1)
    images, _, _, cached = default_collate([dataset[key] for key in list(sampler)[:2]])
    torch.manual_seed(0)
    tsb = F.normalize(torch.randn(16, 64), dim=1)
    vsb = VisualSemanticsBank(16, 64, 0.9)  # the same random rows on both ranks
    student = build_student("mobilenet_v2", 64)
    state = State(student, vsb, torch.optim.SGD(student.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False))
    lgd_step(images, state, student, None, tsb, TrainConfig(), None, t=teacher_embeddings(cached, torch.device("cpu")))
    torch.save({"bank": vsb.bank, "seen": vsb.seen}, f"{result}.{rank}")
    dist.destroy_process_group()


def test_ddp_split_build_and_lgka_over_all_shards(world: dict[str, Path], built: TeacherCache, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from lgd.banks import VisualSemanticsBank
    from lgd.cache import teacher_embeddings
    from lgd.data import EpochSampler

    out, result = tmp_path / "cache", tmp_path / "bank"
    # fork: no re-import per rank (seconds on a busy CI machine); the ranks use one thread each.
    mp.start_processes(_ddp_rank, nprocs=2, start_method="fork",
                       args=(2, str(tmp_path / "init"), str(world["data"]), str(world["teacher"]), str(out), str(result)))
    for chunk in range(built.num_chunks):  # chunks 0 and 2 came from rank 0, chunk 1 from rank 1
        assert np.load(built.chunk_path(chunk)).tobytes() == np.load(TeacherCache(out).chunk_path(chunk)).tobytes()

    # Expected: one LGKA update with the cached embeddings of both ranks' shards, in rank order.
    dataset = CachedViewDataset(image_folder(world["data"] / "train"), built)
    keys = []
    for rank in range(2):
        sampler = EpochSampler(dataset, 2, rank, seed=SEED)
        sampler.set_epoch(1)
        keys += list(sampler)[:2]
    t = teacher_embeddings(torch.stack([dataset[key][3] for key in keys]), torch.device("cpu"))
    torch.manual_seed(0)
    tsb = F.normalize(torch.randn(16, 64), dim=1)
    expected = VisualSemanticsBank(16, 64, 0.9)
    one_shard = VisualSemanticsBank(16, 64, 0.9)
    one_shard.bank.copy_(expected.bank)
    expected.update(t, tsb)
    one_shard.update(t[:2], tsb)
    assert (one_shard.bank - expected.bank).abs().max() > 1e-4, "the shards must matter for this check"
    for rank in range(2):
        got = torch.load(f"{result}.{rank}", weights_only=True)
        torch.testing.assert_close(got["bank"], expected.bank, atol=1e-6, rtol=0)
        assert torch.equal(got["seen"], expected.seen)
