"""Data set preparation tools on generated folder trees with awkward names."""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from lgd.datasets_prep import caltech_classnames, make_caltech_trainval, make_imagenet_subset, write_caltech_classnames
from lgd.errors import LGDError

REPO = Path(__file__).resolve().parents[1]
CALTECH_CLASSES = ["001.ak47", "002.american-flag", "056.dog", "198.spider", "232.t-shirt", "253.faces-easy-101"]


def image_name(i: int) -> str:
    return f"img {i:03d} \"q\" 'é' ü.jpg"  # spaces, both quotes, non-ASCII


def make_tree(root: Path, classes: list[str], counts: list[int]) -> None:
    for name, count in zip(classes, counts):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / image_name(i)).write_bytes(f"{name}/{i}".encode())


@pytest.fixture
def caltech(tmp_path) -> Path:
    """``<tmp>/caltech 256/256_ObjectCategories/<class>/`` with 6..11 images per class and a stray file."""
    root = tmp_path / "caltech 256" / "256_ObjectCategories"
    make_tree(root, CALTECH_CLASSES, [6 + i for i in range(len(CALTECH_CLASSES))])
    (root / "198.spider" / "RENAME2").write_text("not an image")
    return root.parent


def files(root: Path) -> dict[str, str]:
    """relative path -> link target (or content) of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_text()
    return out


def test_caltech_split(caltech, tmp_path):
    dst = tmp_path / "out ü"
    summary = make_caltech_trainval(caltech, dst, per_class=4, seed=0)
    train, val = ImageFolder(str(dst / "train")), ImageFolder(str(dst / "val"))
    assert train.classes == val.classes == CALTECH_CLASSES
    for c in range(len(CALTECH_CLASSES)):
        n_train = sum(1 for _, label in train.samples if label == c)
        n_val = sum(1 for _, label in val.samples if label == c)
        assert (n_train, n_val) == (4, 6 + c - 4)
    for path, _ in train.samples + val.samples:  # links to the original images
        link = Path(path)
        assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
        original = caltech / "256_ObjectCategories" / link.parent.name / link.name
        assert os.path.realpath(link) == str(original.resolve())
    train_names = {Path(p).name for p, _ in train.samples if Path(p).parent.name == "001.ak47"}
    val_names = {Path(p).name for p, _ in val.samples if Path(p).parent.name == "001.ak47"}
    assert not train_names & val_names and len(train_names | val_names) == 6
    assert summary.made == sum(6 + i for i in range(len(CALTECH_CLASSES))) and summary.kept == 0
    assert summary.ignored == ["198.spider/RENAME2"]
    assert "ignored 1 non-image entries: 198.spider/RENAME2" in str(summary)


def test_caltech_is_seeded_and_idempotent(caltech, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_caltech_trainval(caltech, a, per_class=3, seed=7)
    make_caltech_trainval(caltech / "256_ObjectCategories", b, per_class=3, seed=7)  # the inner folder works too
    assert {k: Path(v).name for k, v in files(a).items()} == {k: Path(v).name for k, v in files(b).items()}
    before = files(a)
    again = make_caltech_trainval(caltech, a, per_class=3, seed=7)
    assert again.made == 0 and again.kept == len(before) and files(a) == before
    make_caltech_trainval(caltech, tmp_path / "c", per_class=3, seed=8)
    assert files(tmp_path / "c").keys() != before.keys()


def test_caltech_rerun_with_another_seed_needs_force(caltech, tmp_path):
    dst = tmp_path / "out"
    make_caltech_trainval(caltech, dst, per_class=3, seed=0)
    before = files(dst)
    with pytest.raises(LGDError, match="not part of this run .*--force"):
        make_caltech_trainval(caltech, dst, per_class=3, seed=1)
    assert files(dst) == before  # nothing was touched
    summary = make_caltech_trainval(caltech, dst, per_class=3, seed=1, force=True)
    assert summary.removed > 0
    assert files(dst) == files(make_fresh(caltech, tmp_path / "fresh", seed=1))


def make_fresh(src: Path, dst: Path, seed: int) -> Path:
    make_caltech_trainval(src, dst, per_class=3, seed=seed)
    return dst


def test_conflicting_link_is_an_error_unless_force_and_files_are_never_deleted(caltech, tmp_path):
    dst = tmp_path / "out"
    make_caltech_trainval(caltech, dst, per_class=3)
    victim = next((dst / "train" / "056.dog").iterdir())
    victim.unlink()
    (tmp_path / "elsewhere.jpg").write_text("something else")
    victim.symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(LGDError, match="differ from this run"):
        make_caltech_trainval(caltech, dst, per_class=3)
    summary = make_caltech_trainval(caltech, dst, per_class=3, force=True)
    assert summary.replaced == 1 and victim.resolve() != (tmp_path / "elsewhere.jpg")
    # A link run never deletes a regular file (it may be the only copy), in the plan's place or beside it.
    victim.unlink()
    victim.write_text("mine")
    (dst / "train" / "056.dog" / "extra.jpg").write_text("mine too")
    with pytest.raises(LGDError, match="never removed, even with --force") as err:
        make_caltech_trainval(caltech, dst, per_class=3, force=True)
    assert f"{victim} is a file this tool did not make, nor a copy of" in str(err.value)
    assert "extra.jpg is a file this tool did not make" in str(err.value)
    assert victim.read_text() == "mine" and (dst / "train" / "056.dog" / "extra.jpg").read_text() == "mine too"
    victim.unlink()
    (dst / "train" / "056.dog" / "extra.jpg").unlink()
    (dst / "train" / "056.dog" / "a folder").mkdir()
    (dst / "train" / "056.dog" / "a folder" / "notes.txt").write_text("mine")
    with pytest.raises(LGDError, match="never removed, even with --force"):
        make_caltech_trainval(caltech, dst, per_class=3, force=True)
    assert (dst / "train" / "056.dog" / "a folder" / "notes.txt").read_text() == "mine"


def test_caltech_copy_mode(caltech, tmp_path):
    dst = tmp_path / "copied"
    make_caltech_trainval(caltech, dst, per_class=5, copy=True)
    copies = [p for p in dst.rglob("*.jpg")]
    assert copies and not any(p.is_symlink() for p in copies)
    sample = copies[0]
    assert sample.read_text() == (caltech / "256_ObjectCategories" / sample.parent.name / sample.name).read_text()
    assert make_caltech_trainval(caltech, dst, per_class=5, copy=True).kept == len(copies)
    # --force deletes only the copies the tool made: a user's file beside them, or a copy the user edited, stays.
    mine = sample.parent / "mine.jpg"
    mine.write_text("mine")
    edited = copies[1]
    edited.write_text("edited")
    with pytest.raises(LGDError, match="never removed, even with --force") as err:
        make_caltech_trainval(caltech, dst, per_class=5, seed=1, copy=True, force=True)
    assert f"{mine} is a file this tool did not make" in str(err.value)
    assert f"{edited} is a file this tool did not make" in str(err.value)
    assert mine.read_text() == "mine" and edited.read_text() == "edited"
    mine.unlink()
    edited.unlink()
    reseeded = make_caltech_trainval(caltech, dst, per_class=5, seed=1, copy=True, force=True)
    assert reseeded.removed > 0  # the seed-0 copies that seed 1 puts in the other split
    fresh = tmp_path / "fresh"
    make_caltech_trainval(caltech, fresh, per_class=5, seed=1, copy=True)
    assert sorted(p.relative_to(dst) for p in dst.rglob("*.jpg")) == sorted(p.relative_to(fresh) for p in fresh.rglob("*.jpg"))
    make_caltech_trainval(caltech, dst, per_class=5, copy=True, force=True)  # back to seed 0
    with pytest.raises(LGDError, match="not a link to"):  # links wanted where copies are
        make_caltech_trainval(caltech, dst, per_class=5)
    summary = make_caltech_trainval(caltech, dst, per_class=5, force=True)  # identical copies: nothing is lost
    assert summary.replaced == len(copies) and all(p.is_symlink() for p in copies)


def test_caltech_layout_errors(caltech, tmp_path):
    with pytest.raises(LGDError, match="does not look like Caltech-256: expected class folders named like 001.ak47"):
        make_caltech_trainval(caltech / "256_ObjectCategories" / "056.dog", tmp_path / "x")
    with pytest.raises(LGDError, match="is not a folder"):
        make_caltech_trainval(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(LGDError, match="leaves no validation image in 1 classes with too few images: 001.ak47 \\(6\\)"):
        make_caltech_trainval(caltech, tmp_path / "x", per_class=6)
    with pytest.raises(LGDError, match="overlap"):
        make_caltech_trainval(caltech, caltech / "256_ObjectCategories" / "split")
    assert not (tmp_path / "x").exists()


def test_caltech_classnames(caltech, tmp_path):
    pytest.importorskip("clip.zeroshot")
    names = caltech_classnames(caltech)
    assert names == ["ak47", "american flag", "dog", "spider", "t shirt", "faces easy"]
    out = tmp_path / "names.txt"
    assert write_caltech_classnames(caltech, out).startswith("wrote 6 class names")
    assert out.read_text(encoding="utf-8").splitlines() == names
    assert "(kept)" in write_caltech_classnames(caltech, out)
    make_caltech_trainval(caltech, tmp_path / "split", per_class=3)
    assert caltech_classnames(tmp_path / "split" / "train") == names  # same order as ImageFolder's classes
    out.write_text("other\n")
    with pytest.raises(LGDError, match="--force"):
        write_caltech_classnames(caltech, out)
    write_caltech_classnames(caltech, out, force=True)
    assert out.read_text(encoding="utf-8").splitlines() == names


@pytest.fixture
def imagenet(tmp_path) -> Path:
    root = tmp_path / "image net"
    wnids = [f"n0{i:07d}" for i in range(1, 7)]
    make_tree(root / "train", wnids, [5, 6, 7, 8, 9, 10])
    make_tree(root / "val", wnids, [2] * 6)
    return root


def test_imagenet_all_classes_links_whole_val(imagenet, tmp_path):
    dst = tmp_path / "sub"
    summary = make_imagenet_subset(imagenet, dst, shots=4, classes=6, seed=0)
    assert (dst / "val").is_symlink() and os.path.realpath(dst / "val") == str((imagenet / "val").resolve())
    train = ImageFolder(str(dst / "train"))
    assert len(train.classes) == 6 and len(train.samples) == 24
    assert "val: linked to the whole" in str(summary)
    assert make_imagenet_subset(imagenet, dst, shots=4, classes=6, seed=0).made == 0


def test_imagenet_class_subset(imagenet, tmp_path):
    a = make_imagenet_subset(imagenet, tmp_path / "a", shots=3, classes=3, seed=1)
    b = make_imagenet_subset(imagenet, tmp_path / "b", shots=3, classes=3, seed=1)
    train_a, val_a = ImageFolder(str(tmp_path / "a" / "train")), ImageFolder(str(tmp_path / "a" / "val"))
    assert train_a.classes == val_a.classes == ImageFolder(str(tmp_path / "b" / "train")).classes
    assert len(train_a.classes) == 3 and len(train_a.samples) == 9 and len(val_a.samples) == 6
    assert all((tmp_path / "a" / "val" / c).is_symlink() for c in val_a.classes)
    assert str(a).replace(str(tmp_path / "a"), "") == str(b).replace(str(tmp_path / "b"), "")
    picks = set()
    for seed in range(6):
        make_imagenet_subset(imagenet, tmp_path / f"s{seed}", shots=3, classes=3, seed=seed)
        picks.add(tuple(ImageFolder(str(tmp_path / f"s{seed}" / "train")).classes))
    assert len(picks) > 1  # the seed draws the classes

    copied = make_imagenet_subset(imagenet, tmp_path / "c", shots=3, classes=3, seed=1, copy=True)
    assert not any(p.is_symlink() for p in (tmp_path / "c").rglob("*"))
    assert len(ImageFolder(str(tmp_path / "c" / "val")).samples) == 6 and copied.made == 15


def test_imagenet_switching_from_full_to_subset_never_writes_into_the_source(imagenet, tmp_path):
    dst = tmp_path / "sub"
    make_imagenet_subset(imagenet, dst, shots=2, classes=6)
    source_val = files(imagenet / "val")
    with pytest.raises(LGDError, match="a link to .*not a folder.*not part of this run"):
        make_imagenet_subset(imagenet, dst, shots=2, classes=2)
    summary = make_imagenet_subset(imagenet, dst, shots=2, classes=2, force=True)
    assert summary.removed == 1 + 4  # the val link, and the train folders of the classes left out
    assert not (dst / "val").is_symlink() and len(list((dst / "val").iterdir())) == 2
    assert len(list((dst / "train").iterdir())) == 2
    assert files(imagenet / "val") == source_val
    with pytest.raises(LGDError, match="differ from this run"):  # and back to all classes
        make_imagenet_subset(imagenet, dst, shots=2, classes=6)
    summary = make_imagenet_subset(imagenet, dst, shots=2, classes=6, force=True)
    assert summary.replaced == 1  # the folder of 2 class links became the link to the whole val/
    assert (dst / "val").is_symlink() and os.path.realpath(dst / "val") == str((imagenet / "val").resolve())
    assert files(imagenet / "val") == source_val


def test_imagenet_layout_errors(imagenet, tmp_path):
    with pytest.raises(LGDError, match="has no train/ folder.*pass its parent"):
        make_imagenet_subset(imagenet / "train", tmp_path / "x")
    with pytest.raises(LGDError, match="--shots 6 exceeds the images of 1 classes: n00000001 \\(5\\)"):
        make_imagenet_subset(imagenet, tmp_path / "x", shots=6, classes=6)
    with pytest.raises(LGDError, match="--classes 7 but .* has only 6 class folders"):
        make_imagenet_subset(imagenet, tmp_path / "x", shots=1, classes=7)
    for f in (imagenet / "val").rglob("*.jpg"):
        f.rename(imagenet / "val" / f.name.replace("img", f"{f.parent.name}_"))
    for d in (imagenet / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(LGDError, match="sort the validation images into val/<wnid>/ folders"):
        make_imagenet_subset(imagenet, tmp_path / "x", shots=1, classes=2)
    assert not (tmp_path / "x").exists()
    make_imagenet_subset(imagenet, tmp_path / "flat", shots=1, classes=6)  # all classes: any val layout


def load_tool(name: str) -> dict:
    return runpy.run_path(str(REPO / "tools" / name), run_name="tool_under_test")


@pytest.mark.parametrize("tool", ["make-caltech-trainval.py", "make-imgnet-subset.py", "get-caltech-classnames.py"])
def test_tools_have_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool)["main"](["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_tool_reports_and_errors(caltech, tmp_path, capsys):
    main = load_tool("make-caltech-trainval.py")["main"]
    main([str(caltech), str(tmp_path / "out"), "--per-class", "2", "--seed", "3"])
    assert "train: 12 images, 2 per class, 6 classes (seed 3)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), str(tmp_path / "other")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
