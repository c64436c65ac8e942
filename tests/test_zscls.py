"""Zero-shot evaluation: equal to training's numbers and to an independent computation; clear errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lgd.checkpoint import atomic_torch_save, load_checkpoint
from lgd.convert import convert_to_torchvision
from lgd.data import eval_transform, image_folder
from lgd.evaluate import align_classes
from lgd.models import build_student
from lgd.toyworld import tiny_clip
from lgd.zscls import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_checkpoint(toy_run) -> Path:
    return toy_run["output"] / "checkpoint_last.pth"


@pytest.fixture(scope="module")
def default_result(toy_checkpoint, tmp_path_factory) -> dict:
    """What `bash scripts/zscls.sh` computes for the toy-world run (checkpoint TSB, teacher included)."""
    out = tmp_path_factory.mktemp("zscls")
    result = main(["--checkpoint", str(toy_checkpoint), "--data", "toy", "--output", str(out), "--workers", "0"])
    assert json.loads((out / "zscls_metrics.json").read_text()) == json.loads(json.dumps(result))
    return result


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _variant(src: Path, dst: Path, **changes) -> str:
    """A copy of an LGD checkpoint with some keys changed (training state dropped)."""
    ckpt = load_checkpoint(src)
    keep = {k: v for k, v in ckpt.items() if k not in ("optimizer", "vsb", "scaler", "rng")}
    atomic_torch_save({**keep, **changes}, dst)
    return str(dst)


@pytest.mark.slow
def test_builtin_default_runs_the_toy_world(toy_checkpoint, default_result, tmp_path):
    """`bash scripts/zscls.sh` with no arguments evaluates runs/toyworld/checkpoint_last.pth, or says how to make it."""
    (tmp_path / "runs" / "toyworld").mkdir(parents=True)
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    env = {k: v for k, v in os.environ.items() if k not in ("CHECKPOINT", "DATA", "OUTPUT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    script = ["bash", str(tmp_path / "scripts" / "zscls.sh")]
    missing = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "bash scripts/train.sh" in missing.stderr
    (tmp_path / "runs" / "toyworld" / "checkpoint_last.pth").symlink_to(toy_checkpoint)
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"toy-world run {tmp_path / 'runs' / 'toyworld' / 'checkpoint_last.pth'}" in done.stdout
    metrics = json.loads((tmp_path / "runs" / "toyworld" / "zscls" / "zscls_metrics.json").read_text())
    assert metrics["student_top1"] == default_result["student_top1"]
    assert metrics["teacher_top1"] == default_result["teacher_top1"]
    # Relative paths in arguments count from where the script is run, not from the repository.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "student.pth").symlink_to(toy_checkpoint)
    done = subprocess.run([*script, "--checkpoint", "student.pth", "--data", "toy", "--no-teacher", "--output", "zs"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((elsewhere / "zs" / "zscls_metrics.json").read_text())
    assert metrics["student_top1"] == default_result["student_top1"]


def test_equals_what_training_reported(default_result, toy_run):
    assert default_result["student_top1"] == pytest.approx(toy_run["student_top1"], abs=1e-9)
    assert default_result["student_top5"] == pytest.approx(toy_run["student_top5"], abs=1e-9)
    assert default_result["teacher_top1"] == pytest.approx(toy_run["teacher_top1"], abs=1e-9)
    assert default_result["num_classes"] == 24 and default_result["num_images"] == 600
    assert default_result["text"] == "checkpoint"


def test_equals_an_independent_computation(default_result, toy_checkpoint, toy_world):
    ckpt = load_checkpoint(toy_checkpoint)
    student = build_student(ckpt["arch"], ckpt["embed_dim"])
    student.load_state_dict(ckpt["model"])
    student.eval()
    val = image_folder(toy_world.data / "val")
    val.transform = eval_transform(ckpt["config"]["image_size"])
    embeddings, labels = [], []
    with torch.no_grad():
        for images, target in DataLoader(val, batch_size=100):
            embeddings.append(student.head(student.backbone(images)))
            labels.append(target)
    logits = 100 * F.normalize(torch.cat(embeddings), dim=1) @ ckpt["tsb"].T
    labels = torch.cat(labels)
    top5 = logits.topk(5, dim=1).indices
    correct = top5[:, 0] == labels
    assert default_result["student_top1"] == pytest.approx(100 * correct.float().mean().item(), abs=1e-4)
    assert default_result["student_top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item(),
                                                           abs=1e-4)
    assert default_result["class_match"] == "position"
    for c, name in enumerate(ckpt["classnames"]):
        row = default_result["per_class"][c]
        assert (row["label"], row["name"], row["folder"]) == (c, name, val.classes[c])
        assert row["images"] == int((labels == c).sum())
        assert row["student"] == pytest.approx(100 * correct[labels == c].float().mean().item(), abs=1e-4)
    # The confusion summary lists real errors, most frequent first.
    pred = top5[:, 0]
    names = list(ckpt["classnames"])
    counts = [p["images"] for p in default_result["confused"]]
    assert counts == sorted(counts, reverse=True)
    for pair in default_result["confused"]:
        t, p = names.index(pair["true"]), names.index(pair["predicted"])
        assert t != p and pair["images"] == int(((labels == t) & (pred == p)).sum())


def test_rebuilt_tsb_from_folder_names_gives_the_same_numbers(default_result, toy_checkpoint, tmp_path):
    # The toy world's folders are the class names ('red_circle' -> 'red circle'), in the banks' order.
    result = main(["--checkpoint", str(toy_checkpoint), "--data", "toy", "--text", "folder", "--templates", "toy",
                   "--no-teacher", "--output", str(tmp_path), "--workers", "0"])
    assert result["student_top1"] == pytest.approx(default_result["student_top1"], abs=1e-9)
    assert result["teacher_top1"] is None and result["text"] == "folder"


def test_student_at_another_resolution_keeps_the_teacher_at_its_own(default_result, toy_checkpoint, tmp_path):
    """The toy CLIP takes 32 px only; a 48 px student evaluation still gives the teacher's 32 px reference."""
    result = main(["--checkpoint", str(toy_checkpoint), "--data", "toy", "--image-size", "48",
                   "--output", str(tmp_path), "--workers", "0"])
    assert result["image_size"] == 48 and result["teacher_image_size"] == default_result["teacher_image_size"] == 32
    assert result["teacher_top1"] == default_result["teacher_top1"]
    assert result["teacher_top5"] == default_result["teacher_top5"]


def test_align_classes_pairs_folders_with_names():
    assert align_classes(["n01440764", "n01443537"], ["tench", "goldfish"]) == ([0, 1], "wordnet ids")
    assert align_classes(["001.ak47", "015.bonsai-101"], ["ak47", "bonsai"]) == ([0, 1], "position")
    # ImageFolder sorts capitalised folders first: Pets' cat breeds come before its dog breeds.
    folders = ["Abyssinian", "Bengal", "american_bulldog"]
    assert align_classes(folders, ["Abyssinian", "American Bulldog", "Bengal"]) == ([0, 2, 1], "name")
    assert align_classes(["a_b", "c"], ["b a", "c"]) == ([0, 1], "position, 1 of 2 folder names differ")


def _renamed_val(toy_world, dst: Path, rename) -> Path:
    """toy val/ with its class folders linked under other names."""
    dst.mkdir()
    for folder in sorted((toy_world.data / "val").iterdir()):
        (dst / rename(folder.name)).symlink_to(folder)
    return dst


def test_folders_in_another_order_are_matched_by_name(default_result, toy_checkpoint, toy_world, tmp_path):
    # Capitalising every other folder changes ImageFolder's label order, not the names.
    names = sorted(p.name for p in (toy_world.data / "val").iterdir())
    moved = _renamed_val(toy_world, tmp_path / "val", lambda n: n.title() if names.index(n) % 2 else n)
    assert image_folder(moved).classes != names
    result = main(["--checkpoint", str(toy_checkpoint), "--data", str(moved), "--split", "", "--no-teacher",
                   "--output", str(tmp_path / "out"), "--workers", "0"])
    assert result["class_match"] == "name"
    assert result["student_top1"] == pytest.approx(default_result["student_top1"], abs=1e-9)


def test_folders_that_are_other_names_are_warned_about(toy_checkpoint, toy_world, tmp_path, capsys):
    swapped = _renamed_val(toy_world, tmp_path / "val", lambda n: "_".join(reversed(n.split("_"))))
    result = main(["--checkpoint", str(toy_checkpoint), "--data", str(swapped), "--split", "", "--no-teacher",
                   "--output", str(tmp_path / "out"), "--workers", "0"])
    assert result["class_match"] == "position, 24 of 24 folder names differ"
    out = capsys.readouterr().out
    assert "warning: the class folders of" in out and "paired with names by position" in out


def test_unreadable_image_is_an_error_that_names_it(toy_checkpoint, toy_world, tmp_path, capsys):
    """Also from a DataLoader worker, whose re-raised error carries the worker's traceback."""
    val = _renamed_val(toy_world, tmp_path / "val", lambda n: n)
    broken = tmp_path / "val_with_broken" / "red_circle"
    shutil.copytree(val, tmp_path / "val_with_broken", symlinks=False)
    (broken / "broken.png").write_bytes(b"not a png")
    err = _error(capsys, ["--checkpoint", str(toy_checkpoint), "--data", str(tmp_path / "val_with_broken"),
                          "--split", "", "--no-teacher", "--output", str(tmp_path / "out"), "--workers", "1"])
    assert f"unreadable image {broken / 'broken.png'}" in err and "Traceback" not in err


def test_class_count_mismatch_shows_both_counts(toy_checkpoint, tmp_path, capsys):
    err = _error(capsys, ["--checkpoint", str(toy_checkpoint), "--data", "toy", "--text", "cifar10",
                          "--output", str(tmp_path)])
    assert "class count mismatch" in err and "10 classes" in err and "24 class folders" in err


def test_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    err = _error(capsys, ["--checkpoint", str(tmp_path / "none.pth"), "--data", "toy", "--output", str(tmp_path)])
    assert "checkpoint not found" in err and "bash scripts/train.sh" in err


def test_checkpoint_of_another_arch_is_refused(toy_checkpoint, tmp_path, capsys):
    bad = _variant(toy_checkpoint, tmp_path / "mislabelled.pth", arch="mobilenet_v2")
    err = _error(capsys, ["--checkpoint", bad, "--data", "toy", "--output", str(tmp_path)])
    assert "mobilenet_v2" in err and "do not fit" in err
    convert_to_torchvision(toy_checkpoint, tmp_path / "tv.pth")  # a backbone alone has no head and no TSB
    err = _error(capsys, ["--checkpoint", str(tmp_path / "tv.pth"), "--data", "toy", "--output", str(tmp_path)])
    assert "not an LGD checkpoint" in err


def test_teacher_model_must_be_the_students_for_a_rebuilt_tsb(default_result, toy_checkpoint, toy_world, tmp_path,
                                                                capsys):
    """--teacher-model: the same teacher at a new path works; another model never builds the student's TSB."""
    moved = _variant(toy_checkpoint, tmp_path / "moved.pth", teacher=str(tmp_path / "gone" / "teacher.pt"))
    same = main(["--checkpoint", moved, "--data", "toy", "--teacher-model", str(toy_world.teacher), "--text", "folder",
                 "--templates", "toy", "--output", str(tmp_path / "same"), "--workers", "0"])
    assert same["student_top1"] == pytest.approx(default_result["student_top1"], abs=1e-9)
    assert same["teacher_top1"] == pytest.approx(default_result["teacher_top1"], abs=1e-9)

    torch.manual_seed(123)
    other = tmp_path / "other_teacher.pth"  # same architecture and width, other weights
    atomic_torch_save(tiny_clip().state_dict(), other)
    err = _error(capsys, ["--checkpoint", str(toy_checkpoint), "--data", "toy", "--teacher-model", str(other),
                          "--text", "folder", "--templates", "toy", "--output", str(tmp_path / "x"), "--workers", "0"])
    assert "is another model" in err and "Drop --teacher-model" in err
    result = main(["--checkpoint", str(toy_checkpoint), "--data", "toy", "--teacher-model", str(other),
                   "--output", str(tmp_path / "ref"), "--workers", "0"])  # the checkpoint's TSB for the student
    assert result["student_top1"] == pytest.approx(default_result["student_top1"], abs=1e-9)
    assert "uses its own text bank" in capsys.readouterr().out


def test_teacher_that_moved_is_a_clear_error(toy_checkpoint, tmp_path, capsys):
    moved = _variant(toy_checkpoint, tmp_path / "moved.pth", teacher=str(tmp_path / "gone" / "teacher.pt"))
    err = _error(capsys, ["--checkpoint", moved, "--data", "toy", "--output", str(tmp_path)])
    assert "gone/teacher.pt" in err and "--teacher-model" in err and "--no-teacher" in err
