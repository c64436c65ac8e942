"""Folder trees for the evaluation data sets, built from links (or copies) into the original downloads.

The trees are what ``torchvision.datasets.ImageFolder`` reads (``DST/{train,val}/<class>/<image>``).
Re-running a tool is safe: an entry that already points at (or equals) the right file is kept, anything
else in the way is an error unless ``force`` is set, and nothing is written before the whole tree has
been checked. ``force`` replaces or removes links, folders of links and the copies a tool made (listed with
their size and time in ``DST/.lgd-copies.json``, and unchanged since); a file it did not make is never
deleted or overwritten, unless it is identical to the source that replaces it.
"""
from __future__ import annotations

import filecmp
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from .checkpoint import atomic_write_text
from .errors import LGDError

CALTECH_DIRNAME = "256_ObjectCategories"
CALTECH_CLASS = re.compile(r"^\d{3}\.\S")  # 001.ak47, 253.faces-easy-101
COPIES_RECORD = ".lgd-copies.json"  # DST-relative path -> [size, mtime_ns] of every copy a tool made


@dataclass(frozen=True)
class Entry:
    """``dst`` must become a link to (or, for files, a copy of) ``src``; folders are only ever linked."""

    src: Path
    dst: Path
    is_dir: bool = False


@dataclass
class Summary:
    """What a run made, for the one-paragraph report the tools print."""

    dst: Path
    copy: bool
    splits: list[str] = field(default_factory=list)
    made: int = 0
    kept: int = 0
    replaced: int = 0
    removed: int = 0
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = "copies" if self.copy else "links"
        lines = [f"{self.dst}:", *(f"  {s}" for s in self.splits)]
        lines.append(
            f"  {how}: {self.made} made, {self.kept} already correct (kept), {self.replaced} replaced, "
            f"{self.removed} stale entries removed"
        )
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (f" (+{len(self.ignored) - 5} more)" if len(self.ignored) > 5 else "")
            lines.append(f"  ignored {len(self.ignored)} non-image entries: {shown}")
        return "\n".join(lines)


def _listing(items: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def list_images(folder: Path) -> tuple[list[Path], list[str]]:
    """Image files directly in ``folder`` (the extensions ImageFolder reads), sorted; and what was skipped."""
    images, ignored = [], []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(IMG_EXTENSIONS):
            images.append(path)
        else:
            ignored.append(f"{folder.name}/{path.name}")
    return images, ignored


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_disjoint(src: Path, dst: Path) -> None:
    """DST inside SRC (or SRC inside DST) would let a re-run with ``force`` treat source files as stale."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise LGDError(f"the output {dst} and the source {src} overlap; choose an output folder outside the source")


def _rng(seed: int, name: str) -> random.Random:
    """A generator per (seed, class): one class's draw does not depend on which other classes exist."""
    return random.Random(f"{seed}/{name}")


# ------------------------------------------------------------------------------------------ materialise
class Copies:
    """The copies a tool made in ``dst`` (``COPIES_RECORD``): only those may be replaced or removed, and only
    while their size and modification time are still the recorded ones (nobody has edited them since)."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        path = dst / COPIES_RECORD
        self.made: dict[str, list[int]] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _key(self, path: Path) -> str:
        return path.relative_to(self.dst).as_posix()

    def ours(self, path: Path) -> bool:
        return path.is_file() and not path.is_symlink() and self.made.get(self._key(path)) == self._stamp(path)

    def save(self, copied: Iterable[Path]) -> None:
        """Record ``copied`` (this run's copies) and keep the earlier records that still hold."""
        made = {key: stamp for key, stamp in self.made.items() if self.ours(self.dst / key)}
        made.update({self._key(path): self._stamp(path) for path in copied})
        if made or (self.dst / COPIES_RECORD).exists():
            atomic_write_text(self.dst / COPIES_RECORD, json.dumps(made, indent=0, sort_keys=True) + "\n")


def _is_removable_folder(path: Path, copies: Copies) -> bool:
    """What ``force`` may delete: a real folder that holds nothing but links and the tools' own copies."""
    return path.is_dir() and not path.is_symlink() and all(p.is_symlink() or copies.ours(p) for p in path.iterdir())


def _remove_folder(path: Path) -> None:
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


def _entry_state(entry: Entry, copy: bool, copies: Copies) -> str:
    """``missing``, ``ok``, ``conflict`` (in the way, but replacing it loses nothing) or ``blocked`` (a folder,
    or a regular file that this tool did not make and that is not a copy of its source: it may be someone's
    only copy)."""
    dst = entry.dst
    if not dst.is_symlink() and not dst.exists():
        return "missing"
    if dst.is_symlink():
        if not copy or entry.is_dir:
            return "ok" if os.path.realpath(dst) == os.path.realpath(entry.src) else "conflict"
        return "conflict"
    if dst.is_dir():  # a folder of links where a link to a folder goes (growing a subset to all classes)
        return "conflict" if entry.is_dir and _is_removable_folder(dst, copies) else "blocked"
    if copy and dst.is_file() and filecmp.cmp(entry.src, dst, shallow=True):
        return "ok"
    if dst.is_file() and (copies.ours(dst) or filecmp.cmp(entry.src, dst, shallow=False)):
        return "conflict"
    return "blocked"


def _place(entry: Entry, copy: bool) -> None:
    """Create ``entry.dst`` atomically (temp name in the same folder, then rename over any old link/file)."""
    tmp = entry.dst.with_name(f".{entry.dst.name}.lgd-tmp-{os.getpid()}")
    try:
        if copy and not entry.is_dir:
            shutil.copy2(entry.src, tmp)
        else:
            os.symlink(os.path.abspath(entry.src), tmp, target_is_directory=entry.is_dir)
        os.replace(tmp, entry.dst)
    except BaseException:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        raise


def materialise(plan: Sequence[Entry], managed: Iterable[Path], summary: Summary, force: bool) -> Summary:
    """Make ``plan`` real. ``managed`` folders hold exactly what the plan puts there: anything else in them
    is stale (e.g. from a run with another seed) and is an error unless ``force`` removes it. ``force``
    removes links, folders of links and the tools' own unchanged copies; any other regular file is replaced
    only by an identical source, and a folder holding such files is never deleted."""
    copy = summary.copy
    copies = Copies(summary.dst)
    managed = sorted(set(managed), key=lambda p: (len(p.parts), str(p)))
    expected: dict[Path, set[str]] = {d: set() for d in managed}
    for entry in plan:
        expected.setdefault(entry.dst.parent, set()).add(entry.dst.name)
    for d in managed:
        if d.parent in expected:
            expected[d.parent].add(d.name)

    # A managed folder that is a link (DST/val -> SRC/val from an all-classes run) becomes a real folder;
    # nothing is looked up or written through the link, so the source is never touched.
    linked = [d for d in managed if d.is_symlink()]

    def behind_link(path: Path) -> bool:
        return any(link in path.parents for link in linked)

    states = ["missing" if behind_link(e.dst) else _entry_state(e, copy, copies) for e in plan]
    blocked = [f"{e.dst} is a {'folder' if e.dst.is_dir() else 'file this tool did not make, nor a copy of ' + str(e.src)}"
               for e, s in zip(plan, states) if s == "blocked"]
    differ = [f"{e.dst} (not {'a copy of' if copy and not e.is_dir else 'a link to'} {e.src})"
              for e, s in zip(plan, states) if s == "conflict"]
    differ += [f"{d} (a link to {os.path.realpath(d)}, not a folder)" for d in linked]
    stale: list[Path] = []
    stale_dirs: list[Path] = []
    for d in managed:
        if d.is_symlink() or behind_link(d) or not d.is_dir():
            continue
        for child in sorted(d.iterdir()):
            if child.name in expected[d]:
                continue
            if child.is_symlink() or copies.ours(child):
                stale.append(child)
            elif not child.is_dir():
                blocked.append(f"{child} is a file this tool did not make")
            elif _is_removable_folder(child, copies):
                stale_dirs.append(child)
            else:
                blocked.append(f"{child} holds files that this tool did not make")
    if blocked:
        raise LGDError(
            f"{len(blocked)} entries are in the way and are never removed, even with --force (delete them by "
            f"hand): {_listing(blocked)}"
        )
    if (differ or stale or stale_dirs) and not force:
        problems = []
        if differ:
            problems.append(f"{len(differ)} existing entries differ from this run: {_listing(differ)}")
        if stale or stale_dirs:
            problems.append(f"{len(stale) + len(stale_dirs)} entries are not part of this run (made with another "
                            f"seed or class choice?): {_listing([str(p) for p in stale + stale_dirs])}")
        raise LGDError(". ".join(problems) + ". Re-run with --force to replace or remove them.")

    for path in linked + stale:
        path.unlink()
        summary.removed += 1
    for folder in stale_dirs:
        _remove_folder(folder)
        summary.removed += 1
    for d in managed:
        d.mkdir(parents=True, exist_ok=True)
    verb = "copying" if copy else "linking"
    copied: list[Path] = []
    try:
        for entry, state in tqdm(list(zip(plan, states)), desc=verb, unit="file", disable=None, leave=False):
            if copy and not entry.is_dir:
                copied.append(entry.dst)  # kept or made: a copy of its source either way
            if state == "ok":
                summary.kept += 1
                continue
            entry.dst.parent.mkdir(parents=True, exist_ok=True)
            if state == "conflict" and entry.dst.is_dir() and not entry.dst.is_symlink():
                _remove_folder(entry.dst)
            _place(entry, copy)
            summary.made += state == "missing"
            summary.replaced += state == "conflict"
    finally:  # an interrupted run still records the copies it made
        copies.save(p for p in copied if p.is_file() and not p.is_symlink())
    return summary


# ---------------------------------------------------------------------------------------------- Caltech-256
def find_caltech_classes(src: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The Caltech-256 class folders (``001.ak47`` ...) in ``src`` or in ``src/256_ObjectCategories``."""
    src = Path(src)
    if not src.is_dir():
        raise LGDError(f"{src} is not a folder; pass the Caltech-256 folder (256_ObjectCategories or its parent)")
    root = src / CALTECH_DIRNAME if (src / CALTECH_DIRNAME).is_dir() else src
    classes = [p for p in class_folders(root) if CALTECH_CLASS.match(p.name)]
    if not classes:
        found = ", ".join(p.name for p in sorted(root.iterdir())[:5]) or "nothing"
        raise LGDError(
            f"{src} does not look like Caltech-256: expected class folders named like 001.ak47/ in it or in "
            f"{src / CALTECH_DIRNAME}/ (found: {found})"
        )
    return root, classes


def make_caltech_trainval(
    src: str | os.PathLike, dst: str | os.PathLike, per_class: int = 60, seed: int = 0,
    copy: bool = False, force: bool = False,
) -> Summary:
    """``dst/train/<class>/`` with ``per_class`` images drawn per class (seeded), the rest in ``dst/val/``.

    Class folders keep their numbered names (``001.ak47``), so ImageFolder's sorted class order is Caltech's.
    """
    if per_class < 1:
        raise LGDError(f"--per-class must be at least 1, got {per_class}")
    root, classes = find_caltech_classes(src)
    dst = Path(dst)
    _check_disjoint(root, dst)
    summary = Summary(dst, copy)
    plan: list[Entry] = []
    too_small: list[str] = []
    n_train = n_val = 0
    for folder in classes:
        images, ignored = list_images(folder)
        summary.ignored += ignored
        if len(images) <= per_class:
            too_small.append(f"{folder.name} ({len(images)})")
            continue
        train = set(_rng(seed, folder.name).sample(images, per_class))
        for image in images:
            split = "train" if image in train else "val"
            plan.append(Entry(image, dst / split / folder.name / image.name))
        n_train += per_class
        n_val += len(images) - per_class
    if too_small:
        raise LGDError(
            f"--per-class {per_class} leaves no validation image in {len(too_small)} classes with too few "
            f"images: {_listing(too_small)}; use a smaller --per-class"
        )
    summary.splits = [
        f"train: {n_train} images, {per_class} per class, {len(classes)} classes (seed {seed})",
        f"val: {n_val} images (the rest)",
    ]
    managed = [dst / "train", dst / "val"] + [dst / s / c.name for s in ("train", "val") for c in classes]
    return materialise(plan, managed, summary, force)


def caltech_classnames(src: str | os.PathLike) -> list[str]:
    """Prompt-ready class names in ImageFolder order: ``001.ak47`` -> ``ak47``, ``253.faces-easy-101`` ->
    ``faces easy`` (our CLIP's ``clip.zeroshot.clean_classname``)."""
    from clip.zeroshot import clean_classname  # imported here: the data tools do not otherwise need CLIP

    _, classes = find_caltech_classes(src)
    return [clean_classname(p.name) for p in classes]


def write_caltech_classnames(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    """Write the class names one per line (the ``--text`` file format); returns a one-line report."""
    names = caltech_classnames(src)
    out = Path(out)
    text = "".join(f"{n}\n" for n in names)
    preview = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if out.is_file() and out.read_text(encoding="utf-8") == text:
        return f"{out} already lists these {len(names)} class names (kept): {preview}"
    if out.exists() and not force:
        raise LGDError(f"{out} exists with other content; re-run with --force to overwrite it")
    if out.is_dir():
        raise LGDError(f"{out} is a folder; give a file name")
    atomic_write_text(out, text)
    return f"wrote {len(names)} class names to {out}: {preview}"


# ---------------------------------------------------------------------------------------------- ImageNet
def make_imagenet_subset(
    src: str | os.PathLike, dst: str | os.PathLike, shots: int = 128, classes: int = 1000, seed: int = 0,
    copy: bool = False, force: bool = False,
) -> Summary:
    """A k-shot ImageNet: ``shots`` training images per class from ``src/train/<wnid>/`` and the matching val.

    With fewer than all classes, ``classes`` of them are drawn uniformly (seeded) rather than taking the
    first ones in wnid order, which would be nearly all animals. Validation: with all classes and links,
    ``dst/val`` links the whole ``src/val``; otherwise each chosen ``src/val/<wnid>/`` is linked (or its images
    copied), which needs val sorted into class folders.
    """
    src, dst = Path(src), Path(dst)
    if shots < 1 or classes < 1:
        raise LGDError(f"--shots and --classes must be at least 1, got {shots} and {classes}")
    train_root, val_root = src / "train", src / "val"
    if not train_root.is_dir():
        hint = " (it looks like a split folder itself: pass its parent)" if src.is_dir() and src.name in (
            "train", "val") else ""
        raise LGDError(f"{src} has no train/ folder; pass the ImageNet root that holds train/<wnid>/ and val/{hint}")
    if not val_root.is_dir():
        raise LGDError(f"{src} has no val/ folder next to train/; the subset keeps the full validation set")
    _check_disjoint(src, dst)
    all_classes = class_folders(train_root)
    if not all_classes:
        raise LGDError(f"{train_root} has no class folders (expected train/<wnid>/ with images)")
    if classes > len(all_classes):
        raise LGDError(f"--classes {classes} but {train_root} has only {len(all_classes)} class folders")
    chosen = all_classes if classes == len(all_classes) else sorted(
        _rng(seed, "classes").sample(all_classes, classes))

    summary = Summary(dst, copy)
    plan: list[Entry] = []
    too_small: list[str] = []
    for folder in chosen:
        images, ignored = list_images(folder)
        summary.ignored += ignored
        if len(images) < shots:
            too_small.append(f"{folder.name} ({len(images)})")
            continue
        plan += [Entry(p, dst / "train" / folder.name / p.name) for p in sorted(_rng(seed, folder.name).sample(
            images, shots))]
    if too_small:
        raise LGDError(f"--shots {shots} exceeds the images of {len(too_small)} classes: {_listing(too_small)}")
    managed = [dst / "train"] + [dst / "train" / c.name for c in chosen]
    summary.splits = [f"train: {len(plan)} images, {shots} per class, {len(chosen)} of {len(all_classes)} "
                      f"classes (seed {seed})"]

    if not copy and len(chosen) == len(all_classes):
        plan.append(Entry(val_root, dst / "val", is_dir=True))
        summary.splits.append(f"val: linked to the whole {val_root}")
    else:
        missing = [c.name for c in chosen if not (val_root / c.name).is_dir()]
        if missing:
            raise LGDError(
                f"{val_root} lacks class folders for {len(missing)} chosen classes ({_listing(missing)}); "
                "sort the validation images into val/<wnid>/ folders first"
            )
        managed.append(dst / "val")
        if copy:
            n_val = 0
            for c in chosen:
                images, ignored = list_images(val_root / c.name)
                summary.ignored += ignored
                plan += [Entry(p, dst / "val" / c.name / p.name) for p in images]
                managed.append(dst / "val" / c.name)
                n_val += len(images)
            summary.splits.append(f"val: {n_val} images of the chosen classes")
        else:
            plan += [Entry(val_root / c.name, dst / "val" / c.name, is_dir=True) for c in chosen]
            summary.splits.append(f"val: {len(chosen)} class folders linked")
    return materialise(plan, managed, summary, force)
