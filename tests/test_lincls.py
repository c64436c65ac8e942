"""Linear probe: frozen backbone, label subsets, cached vs standard mode, resume, checkpoint loading, toy world."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from lgd.checkpoint import atomic_torch_save, safe_load
from lgd.convert import convert_to_torchvision
from lgd.lincls import (
    FrozenBackbone,
    LinclsConfig,
    ProbeState,
    balanced_subset,
    extract_features,
    linear_classifier,
    load_backbone,
    lr_at,
    main,
    train_one_epoch,
)
from lgd.data import SeededImageFolder, image_folder
from lgd.models import build_backbone, build_student

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "lincls_toyworld.yaml")


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-default BN statistics, so that any update of them shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def save_lgd_checkpoint(path: Path, arch: str) -> torch.nn.Module:
    """A small LGD checkpoint (random student, randomised BN) with the keys lincls reads."""
    torch.manual_seed(0)
    student = build_student(arch, 16)
    randomise_bn(student)
    atomic_torch_save({"format": "lgd", "version": 1, "arch": arch, "embed_dim": 16, "model": student.state_dict(),
                       "config": {"image_size": 32}}, path)
    return student


def probe(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    main(["--config", TOY_CONFIG, "--output", str(out), "--workers", "0", *args])
    return json.loads((out / "lincls_metrics.json").read_text())


# ------------------------------------------------------------------------------------------------ unit tests
def test_balanced_subset_is_class_balanced_and_seeded():
    targets = [c for c in range(24) for _ in range(100)] + [24] * 37  # 24 classes of 100, one of 37
    one = balanced_subset(targets, 0.01, seed=0)
    assert Counter(targets[i] for i in one) == {c: 1 for c in range(25)}  # every class, at least one image
    ten = balanced_subset(targets, 0.1, seed=0)
    assert Counter(targets[i] for i in ten) == {**{c: 10 for c in range(24)}, 24: 4}
    assert ten == sorted(set(ten))
    assert balanced_subset(targets, 0.1, seed=0) == ten  # reproducible from the seed
    assert balanced_subset(targets, 0.01, seed=0) == one
    assert balanced_subset(targets, 0.1, seed=1) != ten  # and the seed matters
    assert balanced_subset(targets, 1.0, seed=3) == list(range(len(targets)))


def test_frozen_backbone_stays_bit_identical():
    torch.manual_seed(0)
    module, dim = build_backbone("resnet18")
    randomise_bn(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    backbone = FrozenBackbone(module)
    fc = linear_classifier(dim, 3)
    fc_before = fc.weight.detach().clone()
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.1) and not fc.bias.any()  # N(0, 0.01), zero bias
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    cfg = LinclsConfig(epochs=1, batch_size=8, warmup_epochs=0, base_lr=30.0, log_interval=1)
    state = ProbeState(fc, torch.optim.SGD(fc.parameters(), lr=cfg.base_lr, momentum=0.9))
    backbone.train()  # what a training loop does; BN must stay in eval mode
    train_one_epoch(cfg, state, backbone, fc, loader, len(loader), torch.device("cpu"), None, None, None)
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # weights, BN running stats and num_batches_tracked
        assert torch.equal(after[key], value), key
    assert state.step == 3 and not torch.equal(fc.weight, fc_before)  # the probe itself did train


def test_cached_features_keep_the_label_of_the_image_they_hold(tmp_path):
    """An unreadable image is replaced by the next readable one, across a class boundary too: the cached row
    must carry that image's label, not the folder list's."""
    from PIL import Image

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "train" / name / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not a png")  # the last image of class a
    folder = image_folder(tmp_path / "train")
    dataset = SeededImageFolder(folder, torchvision.transforms.ToTensor(), seed=0)
    backbone = FrozenBackbone(torch.nn.AdaptiveAvgPool2d(1))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        feats, labels = extract_features(backbone, 3, dataset, 0, tmp_path / "f" / "train.npy", 4, 0,
                                         torch.device("cpu"), None, "train features")
    assert folder.targets == [0, 0, 1] and labels.tolist() == [0, 1, 1]
    torch.testing.assert_close(torch.tensor(feats[0, 1]), torch.tensor([0.0, 0.0, 1.0]))  # blue: class b


def test_lr_schedule_is_the_authors():
    cfg = LinclsConfig(batch_size=512)  # lr 30 x 512/256 = 60
    per_epoch = 10
    assert lr_at(0, per_epoch, cfg) == pytest.approx(60 / 50)  # linear warm-up over 5 epochs
    assert lr_at(49, per_epoch, cfg) == pytest.approx(60)
    assert lr_at(599, per_epoch, cfg) == pytest.approx(60)
    assert lr_at(600, per_epoch, cfg) == pytest.approx(6)  # x0.1 at epoch 60
    assert lr_at(800, per_epoch, cfg) == pytest.approx(0.6)  # and at 80


def test_torchvision_state_dict_loads_like_the_lgd_checkpoint(tmp_path):
    student = save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    convert_to_torchvision(tmp_path / "lgd.pth", tmp_path / "tv.pth")
    from_lgd = load_backbone(tmp_path / "lgd.pth")
    from_tv = load_backbone(tmp_path / "tv.pth", "resnet18")
    assert from_lgd.arch == from_tv.arch == "resnet18" and from_lgd.image_size == 32
    for key, value in student.backbone.state_dict().items():
        assert torch.equal(from_tv.module.state_dict()[key], value), key
        assert torch.equal(from_lgd.module.state_dict()[key], value), key
    # A full torchvision model (its ImageNet classifier included) loads too: the classifier is dropped.
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "full.pth")
    loaded = load_backbone(tmp_path / "full.pth", "resnet18")
    assert torch.equal(loaded.module.conv1.weight, full.conv1.weight)


# ------------------------------------------------------------------------------------- clear errors (CLI)
def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    err = _error(capsys, ["--config", TOY_CONFIG, "--checkpoint", str(tmp_path / "none.pth"),
                          "--output", str(tmp_path / "out")])
    assert "checkpoint not found" in err and "none.pth" in err and "bash scripts/train.sh" in err


def test_checkpoint_of_another_arch_is_refused(tmp_path, capsys):
    save_lgd_checkpoint(tmp_path / "mnv2.pth", "mobilenet_v2")
    err = _error(capsys, ["--checkpoint", str(tmp_path / "mnv2.pth"), "--arch", "resnet18",
                          "--data", str(tmp_path / "no_data"), "--output", str(tmp_path / "out")])
    assert "mobilenet_v2" in err and "resnet18" in err


def test_torchvision_state_dict_with_wrong_keys_names_them(tmp_path, capsys):
    module, _ = build_backbone("resnet18")
    sd = module.state_dict()
    del sd["layer4.1.bn2.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    argv = ["--checkpoint", str(tmp_path / "bad.pth"), "--data", str(tmp_path / "no_data"),
            "--output", str(tmp_path / "out")]
    assert "--arch" in _error(capsys, argv)  # a plain state_dict does not say what it is
    err = _error(capsys, [*argv, "--arch", "resnet18"])
    assert "layer4.1.bn2.running_var" in err and "extra.weight" in err
    err = _error(capsys, [*argv, "--arch", "mobilenet_v2"])  # another arch's weights
    assert "does not load into torchvision mobilenet_v2" in err


def noise_dataset(root: Path) -> None:
    """train/ (6 per class) and val/ (2 per class) of random 32 px images in classes a and b."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_unreadable_training_images_are_counted(tmp_path, capsys):
    save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    noise_dataset(tmp_path / "data")
    (tmp_path / "data" / "train" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = main(["--checkpoint", str(tmp_path / "lgd.pth"), "--data", str(tmp_path / "data"), "--epochs", "1",
                       "--batch-size", "4", "--warmup-epochs", "0", "--workers", "0", "--output", str(tmp_path / "out")])
    assert result["complete"] and result["num_train_images"] == 12
    assert "epoch 1: 1 unreadable training image(s) were replaced" in capsys.readouterr().out


def test_a_shared_feature_cache_extracts_each_backbone_once(tmp_path):
    """A sweep over lr and seed of a center-crop probe reuses the features; augmented views are other features."""
    save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    noise_dataset(tmp_path / "data")
    feats = tmp_path / "feats"
    common = ["--checkpoint", str(tmp_path / "lgd.pth"), "--data", str(tmp_path / "data"), "--epochs", "1",
              "--batch-size", "4", "--warmup-epochs", "0", "--workers", "0", "--cached-features",
              "--feature-cache", str(feats)]
    main([*common, "--output", str(tmp_path / "a")])
    stamps = {p.name: p.stat().st_mtime_ns for p in feats.iterdir()}
    assert len(stamps) == 4 and not any(name.startswith(".") for name in stamps)  # features + labels, train + val
    main([*common, "--output", str(tmp_path / "b"), "--seed", "1", "--base-lr", "10"])
    assert {p.name: p.stat().st_mtime_ns for p in feats.iterdir()} == stamps
    assert not (tmp_path / "a" / "features").exists() and not (tmp_path / "b" / "features").exists()
    main([*common, "--output", str(tmp_path / "c"), "--cached-views", "2"])
    assert len(list(feats.iterdir())) == 6  # two augmented views per image: new train files, the same val files


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["standard", "cached"])
def test_two_processes_train_the_fc_one_process_trains(tmp_path, mode):
    """torchrun with 2 gloo processes: the same global batches (the sampler interleaves ranks), gradients
    averaged by DDP, the features memmap filled by both ranks, val counts summed. The fc ends as one
    process's does (to float summation order) and the scores are equal."""
    save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    noise_dataset(tmp_path / "data")
    args = ["--checkpoint", str(tmp_path / "lgd.pth"), "--data", str(tmp_path / "data"), "--epochs", "3",
            "--batch-size", "4", "--warmup-epochs", "1", "--lr-steps", "2", "--no-augment", "--workers", "0",
            "--device", "cpu", "--cached-features" if mode == "cached" else "--no-cached-features"]
    single = main([*args, "--output", str(tmp_path / "single")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lgd.lincls",
           *args, "--output", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "lincls_metrics.json").read_text())
    assert ddp["num_val_images"] == single["num_val_images"] == 4 and ddp["num_train_images"] == 12
    assert (ddp["top1"], ddp["top5"]) == (single["top1"], single["top5"])
    a, b = (safe_load(tmp_path / run / "lincls_last.pth")["fc"] for run in ("single", "ddp"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    if mode == "cached":
        assert sorted(p.name for p in (tmp_path / "ddp" / "features").iterdir()) == \
            sorted(p.name for p in (tmp_path / "single" / "features").iterdir())


def test_train_and_val_with_other_class_folders_are_named(tmp_path, capsys):
    """Same count, other names: labels would silently mean other classes; the error names the odd folders."""
    save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    noise_dataset(tmp_path / "data")
    (tmp_path / "data" / "val" / "b").rename(tmp_path / "data" / "val" / "c")
    err = _error(capsys, ["--checkpoint", str(tmp_path / "lgd.pth"), "--data", str(tmp_path / "data"),
                          "--workers", "0", "--output", str(tmp_path / "out")])
    assert "must have the same class folders (2 vs 2 classes; only in train/: b; only in val/: c)" in err
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("mode", [[], ["--cached-features"]])
def test_unreadable_validation_image_is_an_error_that_names_it(tmp_path, capsys, mode):
    """Both modes score every val image once: no stand-in image, no traceback."""
    save_lgd_checkpoint(tmp_path / "lgd.pth", "resnet18")
    noise_dataset(tmp_path / "data")
    (tmp_path / "data" / "val" / "b" / "1.png").write_bytes(b"not a png")
    err = _error(capsys, ["--checkpoint", str(tmp_path / "lgd.pth"), "--data", str(tmp_path / "data"), "--epochs", "1",
                          "--batch-size", "4", "--warmup-epochs", "0", "--workers", "0",
                          "--output", str(tmp_path / "out"), *mode])
    assert "unreadable image" in err and str(Path("val", "b", "1.png")) in err and "Traceback" not in err


def script_sandbox(tmp_path: Path, checkpoint: str | None = None) -> Path:
    """A copy of scripts/ and configs/ whose runs/toyworld/checkpoint_last.pth is ``checkpoint`` (or absent)."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copytree(REPO / "configs", root / "configs")
    if checkpoint:
        (root / "runs" / "toyworld").mkdir(parents=True)
        (root / "runs" / "toyworld" / "checkpoint_last.pth").symlink_to(checkpoint)
    return root


def run_script(root: Path, name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CHECKPOINT", "DATA", "CONFIG", "OUTPUT", "NPROC")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(["bash", str(root / "scripts" / name)], env=env, capture_output=True, text=True, timeout=900)


def test_script_without_a_toy_run_says_how_to_make_one(tmp_path):
    done = run_script(script_sandbox(tmp_path), "lincls.sh")
    assert done.returncode == 2
    assert "runs/toyworld/checkpoint_last.pth" in done.stderr and "bash scripts/train.sh" in done.stderr


# ------------------------------------------------------------------------------------------ toy world runs
@pytest.fixture(scope="module")
def toy_checkpoint(toy_run) -> str:
    return str(toy_run["output"] / "checkpoint_last.pth")


@pytest.mark.slow
def test_builtin_default_lgd_beats_random_init_by_20_points(toy_checkpoint, tmp_path):
    """`bash scripts/lincls.sh` with no arguments probes runs/toyworld/checkpoint_last.pth with
    configs/lincls_toyworld.yaml; the same protocol on a random-init student must score 20 points less."""
    root = script_sandbox(tmp_path, toy_checkpoint)
    done = run_script(root, "lincls.sh")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"toy-world run {root / 'runs' / 'toyworld' / 'checkpoint_last.pth'}" in done.stdout
    lgd = json.loads((root / "runs" / "toyworld" / "lincls" / "lincls_metrics.json").read_text())
    torch.manual_seed(0)
    random_init, _ = build_backbone("resnet18")
    torch.save(random_init.state_dict(), tmp_path / "random_resnet18.pth")
    baseline = probe(tmp_path, "random", "--checkpoint", str(tmp_path / "random_resnet18.pth"), "--arch", "resnet18")
    assert lgd["epochs"] == 100 and lgd["train_fraction"] == 1.0 and lgd["num_train_images"] == 2400
    assert lgd["checkpoint"] == str(Path(toy_checkpoint).resolve()) and Path(lgd["dataset"]).is_dir()
    assert 0 <= lgd["top1"] <= lgd["top5"] <= 100
    assert lgd["top1"] >= baseline["top1"] + 20, (lgd["top1"], baseline["top1"])


@pytest.mark.slow
def test_cached_features_agree_with_standard_mode(toy_checkpoint, tmp_path):
    """Without augmentation both modes see the same features in the same order: within 1 point."""
    args = ["--checkpoint", toy_checkpoint, "--no-augment", "--epochs", "2", "--warmup-epochs", "1",
            "--train-fraction", "0.25", "--eval-interval", "2"]
    standard = probe(tmp_path, "standard", *args, "--no-cached-features")
    cached = probe(tmp_path, "cached", *args, "--cached-features")
    assert standard["mode"].startswith("standard") and cached["mode"].startswith("cached")
    assert standard["num_train_images"] == cached["num_train_images"] == 600
    assert abs(standard["top1"] - cached["top1"]) <= 1.0, (standard["top1"], cached["top1"])


@pytest.mark.slow
def test_resume_continues_exactly(toy_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", toy_checkpoint, "--epochs", "4", "--warmup-epochs", "1", "--lr-steps", "2,3",
            "--eval-interval", "2", "--train-fraction", "0.1", "--cached-views", "2"]
    whole = probe(tmp_path, "whole", *args)
    assert whole["num_train_images"] == 240  # 10 % of each class's 100 images
    cache = shutil.copytree(tmp_path / "whole" / "features", tmp_path / "split" / "features")
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    partial = probe(tmp_path, "split", *args, "--stop-after", "2")
    assert safe_load(tmp_path / "split" / "lincls_last.pth")["epoch"] == 2
    assert partial["complete"] is False and partial["metrics_epoch"] == 2  # never mistaken for a final result
    err = _error(capsys, ["--config", TOY_CONFIG, "--output", str(tmp_path / "split"), "--workers", "0", *args,
                          "--resume", "auto", "--batch-size", "128"])
    assert "cannot resume" in err and "batch_size" in err  # the schedule would bend
    assert yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["batch_size"] == 256  # kept as it ran
    resumed = probe(tmp_path, "split", *args, "--resume", "auto")
    assert resumed["epochs"] == 4 and resumed["top1"] == whole["top1"] and resumed["complete"] is True
    a, b = (safe_load(tmp_path / run / "lincls_last.pth")["fc"] for run in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # cached features were reused
    # A probe of another label subset is not continued.
    err = _error(capsys, ["--config", TOY_CONFIG, "--output", str(tmp_path / "split"), "--workers", "0", *args,
                          "--resume", "auto", "--seed", "1"])
    assert "cannot resume" in err and "seed" in err
