"""Zero-shot classification with a pre-trained student: ``python -m lgd.zscls``.

The student classifies like CLIP: ``100 * normalize(head(backbone(x))) @ TSB.T``. The TSB is the
checkpoint's own (its training class names) unless another class-name set or template set is asked for;
then it is rebuilt by the checkpoint's teacher (and cached). The teacher is evaluated on the same images in
the same run for reference. Same transform, TSB and code path as training's evaluation, so the numbers
equal what training reported for the same checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

import clip
from clip.zeroshot import TEMPLATE_SETS, read_templates_file

from . import distributed as du
from .banks import class_text, load_or_build_tsb
from .checkpoint import atomic_write_json, load_checkpoint
from .config import opt, parse_config
from .data import NORMALIZATIONS, eval_transform, image_folder, loader_workers
from .errors import LGDError, cli_entry
from .evaluate import align_classes, class_mismatch_warning, embed_dataset, topk_accuracy, zero_shot_logits
from .lincls import TOY_HINT, resolve_data
from .models import build_student
from .toyworld import default_home, ensure_toy_world
from .train import FrozenTeacher, amp_dtype, teacher_dtype


@dataclass
class ZsclsConfig:
    """Everything not given is taken from the checkpoint (class names, TSB, teacher, resolution)."""

    checkpoint: str = field(default="", metadata=opt("LGD checkpoint (checkpoint_last.pth of lgd.train)"))
    data: str = field(default="", metadata=opt("dataset root holding the split folder, or 'toy'"))
    split: str = field(default="val", metadata=opt("ImageFolder under data to evaluate ('' = data itself)"))
    text: str = field(default="", metadata=opt("class-name set: '' = the checkpoint's, or a set name (imagenet, "
                                                "caltech256, ...), a text file, 'folder' (the split's folders), 'toy'"))
    templates: str = field(default="", metadata=opt("prompt templates: '' = the checkpoint's, a set name, a text file, 'toy'"))
    teacher: bool = field(default=True, metadata=opt("also evaluate the teacher, for reference (--no-teacher: skip)"))
    teacher_model: str = field(default="", metadata=opt("CLIP teacher: '' = the checkpoint's, an official name, a path, 'toy'"))
    clip_root: str = field(default="", metadata=opt("download folder for official CLIP weights ('' = the checkpoint's)"))
    cache_dir: str = field(default="", metadata=opt("TSB cache root ('' = the checkpoint's, else $LGD_HOME)"))
    image_size: int = field(default=0, metadata=opt("evaluation resolution (0 = the checkpoint's training resolution)"))
    norm: str = field(default="clip", metadata=opt("input normalisation (LGD students and CLIP: clip)",
                                                    choices=sorted(NORMALIZATIONS)))
    batch_size: int = field(default=256, metadata=opt("evaluation batch size"))
    workers: int = field(default=8, metadata=opt("data-loading processes"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    amp: str = field(default="auto", metadata=opt("autocast of the student: auto (bf16 on GPU, fp16 before Ampere; off on CPU), "
                                                   "bf16, fp16, off",
                                                   choices=["auto", "bf16", "fp16", "off"]))
    show: int = field(default=5, metadata=opt("rows of the best/worst class tables and of the confusion summary (>= 1)"))
    output: str = field(default="runs/zscls", metadata=opt("folder for zscls_metrics.json"))


def _templates(spec: str) -> list[str]:
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    try:
        return read_templates_file(Path(spec).expanduser())
    except (ValueError, OSError) as err:
        raise LGDError(f"templates {spec!r}: use one of {', '.join(TEMPLATE_SETS)} or a text file with one template "
                       f"per line ({err})") from None


def text_specs(cfg: ZsclsConfig, folder: Path) -> tuple[str, str]:
    """``--text`` / ``--templates`` with 'toy' and 'folder' resolved to files and folders ('' stays '')."""
    text, templates = cfg.text, cfg.templates
    if "toy" in (text, templates):
        world = ensure_toy_world(verbose=True)
        text = str(world.classnames) if text == "toy" else text
        templates = str(world.templates) if templates == "toy" else templates
    return (str(folder) if text == "folder" else text), templates


def resolve_teacher(spec: str) -> str:
    """The teacher to load: 'toy' is the toy world's; a path recorded in a checkpoint may have moved away."""
    if spec == "toy":
        return str(ensure_toy_world(verbose=True).teacher)
    if spec not in clip.available_models() and not Path(spec).expanduser().is_file():
        raise LGDError(f"the teacher {spec} does not exist (any more?); pass --teacher-model PATH (or 'toy' for the "
                       "toy world's), or --no-teacher to evaluate the student with the checkpoint's own TSB")
    return spec


def load_student(ckpt: dict[str, Any], path: str) -> torch.nn.Module:
    """The full student (backbone + head) of an LGD checkpoint, in eval mode."""
    student = build_student(ckpt["arch"], ckpt["embed_dim"])
    try:
        student.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise LGDError(f"{path} says arch={ckpt['arch']!r} but its weights do not fit that student: "
                       f"{' '.join(first[:3])[:400]}") from None
    return student.eval()


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 (%) of each class (ImageFolder guarantees every class has images)."""
    hits = torch.zeros(num_classes).index_add_(0, labels, (pred == labels).float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    return 100.0 * hits / counts


def confused_pairs(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, n: int) -> list[tuple[int, int, int]]:
    """The ``n`` most frequent (true class, predicted class, count) errors.

    Counts only the pairs that occur (a dense C x C matrix is 3.8 GB of int64 for ImageNet-21k)."""
    wrong = pred != labels
    pairs, counts = torch.unique(labels[wrong] * num_classes + pred[wrong], return_counts=True)
    order = sorted(range(len(pairs)), key=lambda k: (-int(counts[k]), int(pairs[k])))[:n]
    return [(int(pairs[k]) // num_classes, int(pairs[k]) % num_classes, int(counts[k])) for k in order]


def print_report(names: Sequence[str], counts: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None,
                 confused: list[tuple[int, int, int]], n: int) -> None:
    width = max(12, *(len(name) for name in names))
    header = f"  {'class':<{width}} {'images':>6} {'student':>8}" + (f" {'teacher':>8}" if teacher is not None else "")
    order = sorted(range(len(names)), key=lambda c: (-student[c].item(), names[c]))
    sections = [("best", order[:n])] + ([("worst", order[-n:][::-1])] if len(names) > n else [])
    for title, rows in sections:
        print(f"\nper-class zero-shot top-1 (%), {title} {len(rows)}:")
        print(header)
        for c in rows:
            line = f"  {names[c]:<{width}} {int(counts[c]):>6} {student[c].item():>8.1f}"
            print(line + (f" {teacher[c].item():>8.1f}" if teacher is not None else ""))
    if confused:
        print("\nmost confused (student): true -> predicted: images (share of the true class)")
        for true, pred, count in confused:
            print(f"  {names[true]} -> {names[pred]}: {count} ({100.0 * count / counts[true].item():.0f}%)")


def zscls(cfg: ZsclsConfig) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of the student (and teacher) on one ImageFolder; writes ``zscls_metrics.json``."""
    start_time = time.time()
    if not cfg.checkpoint:
        raise LGDError("no --checkpoint given: pass an LGD checkpoint "
                       "(`bash scripts/zscls.sh` with no arguments evaluates the toy-world run)")
    if not cfg.data:
        raise LGDError("no --data given: pass a dataset root (its val/ is evaluated; --split '' for the folder itself) "
                       "or 'toy'")
    if cfg.show < 1:
        raise LGDError(f"--show must be at least 1, got {cfg.show}")
    if not Path(cfg.checkpoint).is_file():
        raise LGDError(f"checkpoint not found: {cfg.checkpoint}" + (f"; {TOY_HINT}" if cfg.data == "toy" else ""))
    device = du.init_distributed(cfg.device)
    if du.is_dist():
        raise LGDError("lgd.zscls runs in one process: launch it with python, not torchrun")
    try:
        ckpt = load_checkpoint(cfg.checkpoint)
    except LGDError as err:
        raise LGDError(f"{err}; zero-shot needs lgd.train's full checkpoint (student head and TSB); a backbone-only "
                       "state_dict can be evaluated with lgd.lincls or lgd.knn") from None
    train_cfg = ckpt.get("config", {})
    student = load_student(ckpt, cfg.checkpoint).to(device)
    image_size = cfg.image_size or train_cfg.get("image_size", 224)
    root = resolve_data(cfg.data)
    folder_path = root / cfg.split if cfg.split else root
    dataset = image_folder(folder_path)
    dataset.transform = eval_transform(image_size, cfg.norm)

    text, templates = text_specs(cfg, folder_path)
    names = class_text(text, "simple")[0] if text else list(ckpt["classnames"])
    prompts = _templates(templates) if templates else list(ckpt["templates"])
    if len(names) != len(dataset.classes):
        source = f"--text {cfg.text}" if cfg.text else "the checkpoint's class names"
        raise LGDError(f"class count mismatch: {source} has {len(names)} classes but {folder_path} has "
                       f"{len(dataset.classes)} class folders; pass a --text set with {len(dataset.classes)} names in "
                       "sorted-folder order (e.g. --text folder)")

    rebuild = bool(text or templates)
    clip_model = None
    teacher_name = cfg.teacher_model or ckpt["teacher"]
    cache = Path(cfg.cache_dir or train_cfg.get("cache_dir") or default_home()) / "tsb"
    foreign = False  # a --teacher-model other than the one the student was distilled from
    if rebuild or cfg.teacher:
        teacher_name = resolve_teacher(teacher_name)
        clip_root = cfg.clip_root or train_cfg.get("clip_root") or None
        clip_model, _ = clip.load(teacher_name, device="cpu", download_root=clip_root)
        clip_model = clip_model.to(device)  # fp32 on the device: a 1000-class TSB is 80k prompts
        if cfg.teacher_model:  # the same model (e.g. moved to a new path) reproduces the checkpoint's TSB
            own = load_or_build_tsb(clip_model, ckpt["classnames"], ckpt["templates"], cache)
            foreign = own.shape != ckpt["tsb"].shape or not torch.allclose(own, ckpt["tsb"].float(), atol=1e-4)
    if rebuild and foreign:
        raise LGDError(f"the student was distilled from {ckpt['teacher']}; its text bank must come from that teacher's "
                       f"text tower, and {teacher_name} is another model (its TSB of the checkpoint's classes differs). "
                       "Drop --teacher-model, or pass the checkpoint's teacher (e.g. at its new path)")
    tsb = load_or_build_tsb(clip_model, names, prompts, cache) if rebuild else ckpt["tsb"]
    # The reference teacher is scored against its own text tower's bank, whichever teacher it is.
    teacher_tsb = load_or_build_tsb(clip_model, names, prompts, cache) if foreign else tsb
    if tsb.shape[1] != ckpt["embed_dim"]:
        raise LGDError(f"the TSB of teacher {teacher_name} has dimension {tsb.shape[1]}, the student embeds into "
                       f"{ckpt['embed_dim']}; use the teacher the student was distilled from")
    order, class_match = align_classes(dataset.classes, names)
    if class_match == "name":
        print(f"note: the class folders of {folder_path} hold the class names in another order; matched by name")
        tsb, teacher_tsb, names = tsb[order], teacher_tsb[order], [names[i] for i in order]
    elif class_match.startswith("position,"):
        print(class_mismatch_warning(dataset.classes, names, class_match, str(folder_path)))

    autocast = amp_dtype(cfg, device)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=loader_workers(cfg.workers), pin_memory=device.type == "cuda")
    # A CLIP tower takes only its own input resolution (fixed positional embeddings): the reference teacher sees
    # the same images at that size when --image-size or a --teacher-model of another resolution differs.
    teacher_size = getattr(clip_model.visual, "input_resolution", image_size) if cfg.teacher else image_size
    teacher_loader = loader
    if teacher_size != image_size:
        print(f"note: the teacher {teacher_name} takes {teacher_size}px images: it is evaluated at {teacher_size}px, "
              f"the student at {image_size}px")
        teacher_set = image_folder(folder_path)
        teacher_set.transform = eval_transform(teacher_size, cfg.norm)
        teacher_loader = DataLoader(teacher_set, batch_size=cfg.batch_size, num_workers=loader_workers(cfg.workers),
                                    pin_memory=device.type == "cuda")
    tsb_source = f"rebuilt by {teacher_name}" if rebuild else "of the checkpoint"
    if foreign:
        tsb_source += f"; the reference teacher {teacher_name} is not the student's and uses its own text bank"
    print(f"zero-shot: {ckpt['arch']} student of {cfg.checkpoint} on {folder_path} ({len(dataset)} images, "
          f"{len(names)} classes, {image_size}px); TSB {tsb_source}")
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        feats, labels = embed_dataset(student, loader, device, desc="zero-shot (student)")
    logits = zero_shot_logits(feats, tsb)
    acc = topk_accuracy(logits, labels)
    pred = logits.argmax(1)
    student_per_class = per_class_accuracy(pred, labels, len(names))

    teacher_acc: dict[int, float | None] = {1: None, 5: None}
    teacher_per_class = None
    if cfg.teacher:
        teacher = FrozenTeacher(clip_model.visual, teacher_dtype(autocast, device)).to(device)
        t_feats, _ = embed_dataset(teacher, teacher_loader, device, desc="zero-shot (teacher)")
        t_logits = zero_shot_logits(t_feats, teacher_tsb)
        teacher_acc = topk_accuracy(t_logits, labels)
        teacher_per_class = per_class_accuracy(t_logits.argmax(1), labels, len(names))

    counts = torch.bincount(labels, minlength=len(names))
    confused = confused_pairs(pred, labels, len(names), cfg.show)
    print_report(names, counts, student_per_class, teacher_per_class, confused, cfg.show)
    result = {
        "student_top1": acc[1], "student_top5": acc[5], "teacher_top1": teacher_acc[1], "teacher_top5": teacher_acc[5],
        "num_classes": len(names), "num_images": len(dataset), "text": cfg.text or "checkpoint",
        "templates": cfg.templates or "checkpoint", "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "teacher": teacher_name, "dataset": str(folder_path.resolve()), "image_size": image_size,
        "teacher_image_size": teacher_size if cfg.teacher else None,
        "class_match": class_match,
        "per_class": [{"label": c, "folder": dataset.classes[c], "name": name, "images": int(counts[c]),
                       "student": student_per_class[c].item(),
                       "teacher": None if teacher_per_class is None else teacher_per_class[c].item()}
                      for c, name in enumerate(names)],
        "confused": [{"true": names[t], "predicted": names[p], "images": n} for t, p, n in confused],
        "seconds": round(time.time() - start_time, 1),
    }
    out = Path(cfg.output)
    atomic_write_json(out / "zscls_metrics.json", result)
    print("\n== zero-shot summary ==")
    print(f"student top-1: {acc[1]:.2f}%  top-5: {acc[5]:.2f}%")
    if teacher_acc[1] is not None:
        print(f"teacher top-1: {teacher_acc[1]:.2f}%  top-5: {teacher_acc[5]:.2f}%")
    print(f"metrics: {out / 'zscls_metrics.json'}")
    return result


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(ZsclsConfig, argv, description="Zero-shot classification with an LGD student (and its teacher)")
    return zscls(cfg)


if __name__ == "__main__":
    main()
