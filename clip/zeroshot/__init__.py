"""Class names and prompt templates for CLIP zero-shot classification and LGD's text banks.

A class-name set is chosen by name (``TEXT_SETS``), by a text file (one name per line) or by an
image-folder dataset (its class subfolders); LGD's point is that choosing the target task's names
("task-specific text control") matters. Templates default to CLIP's 80 ImageNet prompts, which the
paper uses for every class set.
"""
from __future__ import annotations

from pathlib import Path

from . import ade20k, caltech256, cifar10, cifar100, cityscapes, coco, imagenet, lvis, pets
from .parsing import (
    classnames_from_folder,
    clean_classname,
    read_classnames_file,
    read_templates_file,
    validate_template,
)

__all__ = [
    "TEMPLATE_SETS",
    "TEXT_SETS",
    "classnames_from_folder",
    "clean_classname",
    "get_classnames_and_templates",
    "read_classnames_file",
    "read_templates_file",
    "validate_template",
]

TEXT_SETS: dict[str, list[str]] = {
    "imagenet": imagenet.CLASSNAMES,
    "caltech256": caltech256.CLASSNAMES,
    "coco": coco.CLASSNAMES,
    "lvis": lvis.CLASSNAMES,
    "cityscapes": cityscapes.CLASSNAMES,
    "ade20k": ade20k.CLASSNAMES,
    "pets": pets.CLASSNAMES,
    "cifar10": cifar10.CLASSNAMES,
    "cifar100": cifar100.CLASSNAMES,
}

TEMPLATE_SETS: dict[str, list[str]] = {
    "imagenet": imagenet.TEMPLATES,
    "simple": ["a photo of a {}."],
}


def get_classnames_and_templates(spec: str, templates: str = "imagenet") -> tuple[list[str], list[str]]:
    """Class names and prompt templates (fresh lists, safe to modify).

    ``spec``: a name in ``TEXT_SETS`` (names win over a same-named path; write ``./coco`` for the folder),
    a text file with one class name per line, or an image-folder dataset root (class i = i-th sorted
    subfolder, as in ``torchvision.datasets.ImageFolder``). ``templates``: a name in ``TEMPLATE_SETS``
    or a text file with one template per line, each containing ``{}`` once.
    """
    if spec in TEXT_SETS:
        classnames = list(TEXT_SETS[spec])
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            classnames = classnames_from_folder(path)
        elif path.is_file():
            classnames = read_classnames_file(path)
        else:
            raise ValueError(f"unknown class-name set {spec!r}: use one of {', '.join(TEXT_SETS)}, a text file "
                             f"with one class name per line, or an image folder with one subfolder per class")
    if templates in TEMPLATE_SETS:
        prompts = list(TEMPLATE_SETS[templates])
    elif Path(templates).expanduser().is_file():
        prompts = read_templates_file(Path(templates).expanduser())
    else:
        raise ValueError(f"unknown template set {templates!r}: use one of {', '.join(TEMPLATE_SETS)} or a text file "
                         f"with one template per line, each containing '{{}}' once")
    return classnames, prompts
