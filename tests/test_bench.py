"""Smoke tests of ``python -m lgd.bench`` (every mode runs and reports) and the LGKA equivalence.

No timing is asserted: timings belong in ``--compare`` runs, not in unit tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lgd.bench import Setting, lgka_update_loop, main as bench_main, parse_override
from lgd.banks import VisualSemanticsBank
from lgd.cache import CacheConfig, build_cache
from lgd.checkpoint import atomic_torch_save
from lgd.errors import LGDError
from lgd.toyworld import tiny_clip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: fanning out to threads costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random CLIP (32 px), 8 images and a teacher cache of them (K = 1)."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    atomic_torch_save(tiny_clip().state_dict(), root / "teacher.pt")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "data" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    build_cache(CacheConfig(data=str(root / "data"), output=str(root / "cache"), teacher=str(root / "teacher.pt"),
                            views=1, image_size=32, batch_size=8, chunk_images=8, workers=0, device="cpu"))
    return {"teacher": root / "teacher.pt", "data": root / "data", "cache": root / "cache", "root": root}


@pytest.mark.parametrize("classes,batch", [(20, 64), (300, 16)])  # many samples per class / most classes missed
def test_vectorised_lgka_equals_the_per_class_loop(classes: int, batch: int) -> None:
    generator = torch.Generator().manual_seed(classes)
    dim, momentum = 16, 0.9
    tsb = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    vsb = VisualSemanticsBank(classes, dim, momentum)
    vsb.seen.copy_(torch.rand(classes, generator=generator) < 0.5)
    bank, seen = vsb.bank.clone(), vsb.seen.clone()
    for _ in range(3):  # later rounds start from banks both versions updated
        t = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        vsb.update(t, labels=(t @ tsb.T).argmax(1))
        lgka_update_loop(bank, seen, t, tsb, momentum)
        torch.testing.assert_close(vsb.bank, bank, atol=1e-6, rtol=0)
        assert torch.equal(vsb.seen, seen)


def test_compare_specs() -> None:
    base = Setting("random:RN50", "resnet18", 224, 32, "auto", False, False, False)
    assert parse_override("cached=true,image-size=160", base) == Setting("random:RN50", "resnet18", 160, 32, "auto",
                                                                         False, False, True)
    with pytest.raises(LGDError, match="KEY=VALUE"):
        parse_override("cachd=true", base)
    with pytest.raises(LGDError, match="true or false"):
        parse_override("cached=maybe", base)


def test_step_compare_live_vs_cache(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    report = bench_main(["--teacher", str(tiny["teacher"]), "--arch", "mobilenet_v2", "--image-size", "32",
                         "--batch-size", "4", "--classes", "10", "--steps", "2", "--warmup", "1",
                         "--compare", "cached=false", "cached=true", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["groups"][0]["compare"].keys() == report["groups"][0]["compare"].keys()
    live, cached = saved["groups"][0]["results"]
    assert (live["setting"]["cached"], cached["setting"]["cached"]) == (False, True)
    for result in (live, cached):
        assert len(result["records"]) == 2 and result["img_per_s"] > 0 and result["peak_memory_bytes"] > 0
        assert set(result["seconds"]) == {"step", "data", "teacher", "student", "optimizer", "lgka"}
    compare = saved["groups"][0]["compare"]
    assert compare["ideal"] > 1 and {"speedup", "of_ideal", "of_ideal_paired", "paired"} <= compare.keys()

    table = bench_main(["--mode", "summary", str(out)])
    rows = [line for line in table.splitlines() if "mobilenet_v2" in line]
    assert len(rows) == 2 and "| live |" in rows[0] and "| cache |" in rows[1] and "of ideal" in rows[1]


def test_step_on_a_real_folder_with_the_teacher_cache(tiny: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    report = bench_main(["--teacher", str(tiny["teacher"]), "--arch", "mobilenet_v2", "--image-size", "32",
                         "--batch-size", "4", "--classes", "10", "--steps", "1", "--warmup", "1",
                         "--data", str(tiny["data"]), "--teacher-cache", str(tiny["cache"]), "--workers", "0",
                         "--compare", "cached=false", "cached=true", "--json", str(tmp_path / "real.json")])
    assert [r["setting"]["cached"] for r in report["groups"][0]["results"]] == [False, True]
    with pytest.raises(SystemExit):  # a cache of 32 px views cannot serve 64 px training
        bench_main(["--teacher", str(tiny["teacher"]), "--image-size", "64", "--batch-size", "4", "--steps", "1",
                    "--data", str(tiny["data"]), "--teacher-cache", str(tiny["cache"]), "--cached",
                    "--json", str(tmp_path / "bad.json")])
    assert "cannot use the teacher cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the default random tower can never be the cache's teacher
        bench_main(["--batch-size", "4", "--steps", "1", "--data", str(tiny["data"]),
                    "--teacher-cache", str(tiny["cache"]), "--cached", "--json", str(tmp_path / "bad.json")])
    assert f"--teacher {tiny['teacher']}" in capsys.readouterr().err


def test_two_archs_in_one_run_are_measured_apart(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The first arch's runners are freed before the second is measured (its memory is not the second's)."""
    import gc
    import weakref

    from lgd import bench

    made: list[weakref.ref] = []
    original = bench.StepRunner.__init__

    def tracked(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    alive_during_second: list[bool] = []
    step = bench.StepRunner.step

    def recording_step(self, keep: bool) -> None:
        if self.setting.arch == "resnet18":
            gc.disable()  # only what release() freed, not a collection that happens to run, counts
            alive_during_second.append(made[0]() is not None)
            gc.enable()
        step(self, keep)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.StepRunner, "__init__", tracked)
        patch.setattr(bench.StepRunner, "step", recording_step)
        report = bench_main(["--teacher", str(tiny["teacher"]), "--arch", "mobilenet_v2", "resnet18",
                             "--image-size", "32", "--batch-size", "4", "--classes", "10", "--steps", "1",
                             "--warmup", "1", "--data", str(tiny["data"]), "--workers", "0",
                             "--json", str(tmp_path / "two.json")])
    assert [g["arch"] for g in report["groups"]] == ["mobilenet_v2", "resnet18"]
    assert alive_during_second and not any(alive_during_second)


def test_loader_mode(tmp_path: Path) -> None:
    report = bench_main(["--mode", "loader", "--images", "6", "--jpeg-size", "64x48", "--image-size", "32",
                         "--batch-size", "2", "--workers", "0", "1", "--steps", "2", "--warmup", "1",
                         "--json", str(tmp_path / "loader.json")])
    assert report["mean_size"] == [64, 48] and report["images"] == 6
    assert [row["workers"] for row in report["rows"]] == [0, 1] and all(r["img_per_s"] > 0 for r in report["rows"])
    assert [row["warmup_batches"] for row in report["rows"]] == [1, 5]  # past one worker's prefetch burst


def test_hot_mode_reports_equal_results(tmp_path: Path) -> None:
    report = bench_main(["--mode", "hot", "--classes", "50", "--batch-size", "32", "--dim", "16", "--steps", "2",
                         "--warmup", "1", "--json", str(tmp_path / "hot.json")])
    assert [row["name"] for row in report["rows"]] == ["LGKA update (incl. t @ TSB)", "loss + LGKA assignment"]
    for row in report["rows"]:
        assert row["max_abs_diff"] <= 1e-6 and row["same_seen"] and row["speedup"] > 0
