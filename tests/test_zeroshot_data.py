"""Class-name sets, prompt templates and the ways users point at their own classes."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from clip.zeroshot import (
    TEMPLATE_SETS,
    TEXT_SETS,
    caltech256,
    classnames_from_folder,
    clean_classname,
    get_classnames_and_templates,
    read_classnames_file,
    read_templates_file,
)

EXPECTED_COUNTS = {
    "imagenet": 1000,
    "caltech256": 257,
    "coco": 80,
    "lvis": 1203,
    "cityscapes": 19,
    "ade20k": 150,
    "pets": 37,
    "cifar10": 10,
    "cifar100": 100,
}


def _make_image_folder(root: Path, folders: list[str]) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (2, 2)).save(root / folder / "x.png")
    return root


def test_every_set_has_the_dataset_class_count() -> None:
    assert {name: len(names) for name, names in TEXT_SETS.items()} == EXPECTED_COUNTS


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_names_are_readable_and_unique(name: str) -> None:
    names = TEXT_SETS[name]
    assert all(n == " ".join(n.split()) and n and "_" not in n for n in names)
    duplicates = {n for n, count in Counter(names).items() if count > 1}
    # CLIP's curated ImageNet list itself repeats two names; every other source is unique.
    assert duplicates == ({"missile", "sunglasses"} if name == "imagenet" else set())


def test_template_sets() -> None:
    assert len(TEMPLATE_SETS["imagenet"]) == 80 and len(set(TEMPLATE_SETS["imagenet"])) == 80
    assert TEMPLATE_SETS["simple"] == ["a photo of a {}."]
    for templates in TEMPLATE_SETS.values():
        assert all(t.count("{}") == 1 and t.format("cat") != t for t in templates)


def test_default_templates_are_clips_80() -> None:
    classnames, templates = get_classnames_and_templates("caltech256")
    assert classnames == TEXT_SETS["caltech256"] and templates == TEMPLATE_SETS["imagenet"]


def test_returned_lists_are_copies() -> None:
    classnames, templates = get_classnames_and_templates("cifar10", "simple")
    classnames.append("extra")
    templates.clear()
    assert len(TEXT_SETS["cifar10"]) == 10 and TEMPLATE_SETS["simple"] == ["a photo of a {}."]


def test_caltech256_folders_are_the_official_257() -> None:
    assert [int(f.split(".")[0]) for f in caltech256.FOLDERS] == list(range(1, 258))
    assert caltech256.FOLDERS[-1] == "257.clutter"
    assert caltech256.CLASSNAMES == [clean_classname(f) for f in caltech256.FOLDERS]


def test_caltech256_set_equals_names_read_from_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "256_ObjectCategories"
    for folder in caltech256.FOLDERS:
        (root / folder).mkdir(parents=True)
    assert get_classnames_and_templates(str(root))[0] == TEXT_SETS["caltech256"]


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("001.ak47", "ak47"),
        ("002.american-flag", "american flag"),
        ("015.bonsai-101", "bonsai"),
        ("253.faces-easy-101", "faces easy"),
        ("golden_retriever", "golden retriever"),
        ("Maine_Coon", "Maine Coon"),
        ("  a__b - c  ", "a b c"),
        ("x-101-y", "x 101 y"),
        ("room-101", "room 101"),  # the -101 suffix is Caltech's only after a Caltech index prefix
        ("3.5mm-jack", "3.5mm jack"),  # not an index prefix
    ],
)
def test_clean_classname(folder: str, expected: str) -> None:
    assert clean_classname(folder) == expected


def test_clean_classname_rejects_names_that_clean_to_nothing() -> None:
    with pytest.raises(ValueError, match="'001._'"):
        clean_classname("001._")


def test_read_classnames_file(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# my classes\n\n  zebra  \nred panda\n\n# done\naardvark\n", encoding="utf-8")
    assert read_classnames_file(path) == ["zebra", "red panda", "aardvark"]
    assert get_classnames_and_templates(str(path))[0] == ["zebra", "red panda", "aardvark"]
    path.write_text("cat\ndog\n", encoding="utf-8-sig")  # as Windows editors save UTF-8
    assert read_classnames_file(path) == ["cat", "dog"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("cat\ndog\ncat\n", "duplicate class names 'cat'"),
        ("# only a comment\n\n", "contains no class names"),
        ("", "contains no class names"),
    ],
)
def test_read_classnames_file_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_classnames_file(path)


def test_templates_file(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text("# prompts\na photo of a {}.\n\nart of the {}\n", encoding="utf-8")
    assert read_templates_file(path) == ["a photo of a {}.", "art of the {}"]
    assert get_classnames_and_templates("coco", str(path))[1] == ["a photo of a {}.", "art of the {}"]


@pytest.mark.parametrize("bad", ["a photo of a cat.", "a {} next to a {}.", "a {0} photo", "a {} photo {x}", "a {} }"])
def test_templates_file_rejects_bad_placeholders(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "templates.txt"
    path.write_text(f"a photo of a {{}}.\n{bad}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: .*exactly once"):
        read_templates_file(path)


def test_folder_order_matches_imagefolder(tmp_path: Path) -> None:
    # Upper case sorts before lower case and "10" before "2": the label order ImageFolder uses.
    folders = ["b_cat", "A_dog", "10.zebra", "2.yak", "Zebu", "aardvark-101"]
    root = _make_image_folder(tmp_path / "train", folders)
    (root / "README.txt").write_text("not a class", encoding="utf-8")
    expected = [clean_classname(c) for c in ImageFolder(str(root)).classes]
    assert classnames_from_folder(root) == expected
    assert get_classnames_and_templates(str(root))[0] == expected
    assert expected[:2] == ["zebra", "yak"]


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no subfolders"):
        classnames_from_folder(tmp_path / "empty")
    _make_image_folder(tmp_path / "dup", ["ice_cream", "ice-cream"])
    with pytest.raises(ValueError, match="duplicate class names 'ice cream'"):
        classnames_from_folder(tmp_path / "dup")
    _make_image_folder(tmp_path / "imagenet", ["n01440764", "n01443537"])
    with pytest.raises(ValueError, match="'imagenet' class-name set"):
        classnames_from_folder(tmp_path / "imagenet")


def test_set_names_win_over_same_named_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_image_folder(tmp_path / "coco", ["only_class"])
    monkeypatch.chdir(tmp_path)
    assert get_classnames_and_templates("coco")[0] == TEXT_SETS["coco"]
    assert get_classnames_and_templates("./coco")[0] == ["only class"]


def test_unknown_names_list_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown class-name set 'imagenet21k'") as excinfo:
        get_classnames_and_templates("imagenet21k")
    assert all(name in str(excinfo.value) for name in TEXT_SETS)
    with pytest.raises(ValueError, match="unknown template set 'fancy'.*imagenet, simple"):
        get_classnames_and_templates("coco", "fancy")
    with pytest.raises(ValueError, match="unknown class-name set"):
        get_classnames_and_templates(str(tmp_path / "missing.txt"))
