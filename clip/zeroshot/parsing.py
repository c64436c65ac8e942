"""Class names and prompt templates from user files and image folders.

Folder names are turned into readable text because CLIP is prompted with them ("a photo of a {}."):
``001.ak47`` or ``golden_retriever`` would read as noise to the text encoder.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

_INDEX_PREFIX = re.compile(r"^\d+\.(?=\D)")  # "001.ak47": Caltech-style numbering (not "3.5mm-jack")
_CALTECH101_SUFFIX = re.compile(r"-101$")  # "015.bonsai-101": Caltech-256 folders shared with Caltech-101
_WORDNET_ID = re.compile(r"^n\d{8}$")  # "n01440764": ImageNet folders


def clean_classname(folder_name: str) -> str:
    """Readable class name of a dataset folder: drop an ``NNN.`` index prefix (and then a Caltech ``-101``
    suffix), turn underscores and hyphens into spaces, collapse whitespace (``002.american-flag`` ->
    ``american flag``; ``room-101`` keeps its number)."""
    name, caltech = _INDEX_PREFIX.subn("", folder_name.strip())
    if caltech:
        name = _CALTECH101_SUFFIX.sub("", name)
    name = " ".join(name.replace("_", " ").replace("-", " ").split())
    if not name:
        raise ValueError(f"folder name {folder_name!r} has no class name left after cleaning; rename the folder")
    return name


def _read_lines(path: str | os.PathLike[str], what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-``#`` lines of a UTF-8 file; error if there are none."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first name
        lines = [(number, line.strip()) for number, line in enumerate(f, start=1)]
    entries = [(number, text) for number, text in lines if text and not text.startswith("#")]
    if not entries:
        raise ValueError(f"{path} contains no {what} (one per line; blank lines and '#' comments are skipped)")
    return entries


def _raise_on_duplicates(names: list[str], source: str, fix: str) -> None:
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        shown = ", ".join(repr(name) for name in duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise ValueError(f"{source} has duplicate class names {shown}{more}: two classes would get the same text "
                         f"embedding; {fix}")


def read_classnames_file(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line, in file order (the order defines the class indices)."""
    names = [text for _, text in _read_lines(path, "class names")]
    _raise_on_duplicates(names, str(path), "make each line unique")
    return names


def validate_template(template: str) -> None:
    """A template is filled with ``template.format(classname)``, so it needs exactly one ``{}`` and no
    other braces."""
    rest = template.replace("{}", "", 1)
    if template.count("{}") != 1 or "{" in rest or "}" in rest:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once (where the class name "
                         f"goes) and no other braces, e.g. 'a photo of a {{}}.'")


def read_templates_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompt templates from a text file, one per line, each with exactly one ``{}``."""
    templates = []
    for number, text in _read_lines(path, "prompt templates"):
        try:
            validate_template(text)
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}") from None
        templates.append(text)
    return templates


def classnames_from_folder(root: str | os.PathLike[str]) -> list[str]:
    """Cleaned names of the class subfolders of an image-folder dataset, in the order of
    ``torchvision.datasets.ImageFolder(root).classes`` (sorted folder names), so index i is label i."""
    root = Path(root)
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not folders:
        raise ValueError(f"{root} has no subfolders; an image-folder dataset needs one subfolder per class")
    if all(_WORDNET_ID.match(folder) for folder in folders):
        raise ValueError(f"the subfolders of {root} are WordNet ids ({folders[0]}, ...), not class names; use the "
                         f"'imagenet' class-name set for ImageNet-1k, or a text file with one class name per line")
    names = [clean_classname(folder) for folder in folders]
    _raise_on_duplicates(names, f"the subfolders of {root}",
                         "rename the folders or pass a text file with one class name per line")
    return names
