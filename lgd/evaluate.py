"""Embedding and top-k scoring shared by training's zero-shot check, ``lgd.zscls``, ``lgd.knn`` and ``lgd.lincls``."""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip.zeroshot import clean_classname

from . import distributed as du


@torch.no_grad()
def embed_dataset(
    embed: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device, desc: str = "embedding"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 embeddings [N, D] and labels [N] of a whole loader, in loader order ([0, 0] if empty)."""
    feats, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if du.is_main() else True):
        images, target = batch[0], batch[1]
        feats.append(F.normalize(embed(images.to(device, non_blocking=True)).float(), dim=-1).cpu())
        labels.append(target)
    if not feats:  # a rank whose evaluation shard is empty (fewer images than ranks)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """float64 ``[hits@k for k in ks] + [samples]``: counts, so that ranks can sum them before dividing."""
    counts = torch.zeros(len(ks) + 1, dtype=torch.float64)
    counts[-1] = len(labels)
    if len(labels):
        maxk = min(max(ks), logits.shape[1])
        hits = logits.topk(maxk, dim=1).indices.eq(labels.to(logits.device).unsqueeze(1))
        counts[:-1] = torch.stack([hits[:, : min(k, maxk)].any(1).sum() for k in ks]).cpu().double()
    return counts


def accuracy_from_hits(counts: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent per k from :func:`topk_hits` counts (0 for an empty set)."""
    total = max(1.0, counts[-1].item())
    return {k: 100.0 * counts[i].item() / total for i, k in enumerate(ks)}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent; k larger than the class count counts every sample as correct."""
    return accuracy_from_hits(topk_hits(logits, labels, ks), ks)


def zero_shot_logits(embeddings: torch.Tensor, tsb: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot classifier: ``100 * normalize(embedding) @ TSB.T``."""
    return 100.0 * F.normalize(embeddings.float(), dim=-1) @ tsb.float().T.to(embeddings.device)


_WORDNET_ID = re.compile(r"n\d{8}")


def _name_key(name: str) -> str:
    """Spelling-insensitive form of a class name: ``American_Bulldog``, ``american bulldog`` -> ``americanbulldog``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def align_classes(folders: Sequence[str], names: Sequence[str]) -> tuple[list[int], str]:
    """Which class name each ImageFolder label is: ``(order, how)`` with label i <-> ``names[order[i]]``.

    Zero-shot pairs labels with class names; an ImageFolder sorts its folders by byte order, so a dataset whose
    folders are sorted differently from the name list (Pets' capitalised cat breeds, a Caltech copy without the
    ``NNN.`` prefixes) would score near chance without any error. ``how`` says what was relied on:
    'position' (folder names agree with the class names in order), 'wordnet ids' (ImageNet folders, whose sorted
    order is the one of every ImageNet class list), 'name' (the same names in another order: reordered), or
    'position, N of C folder names differ' (kept in order; callers warn with examples).
    """
    if len(folders) != len(names):
        raise ValueError(f"{len(folders)} class folders but {len(names)} class names")
    identity = list(range(len(names)))
    if all(_WORDNET_ID.fullmatch(folder) for folder in folders):
        return identity, "wordnet ids"
    folder_keys = [_name_key(clean_classname(folder)) for folder in folders]
    name_keys = [_name_key(name) for name in names]
    if folder_keys == name_keys:
        return identity, "position"
    index = {key: i for i, key in enumerate(name_keys)}
    if len(index) == len(names) and sorted(folder_keys) == sorted(name_keys):
        return [index[key] for key in folder_keys], "name"
    differ = sum(a != b for a, b in zip(folder_keys, name_keys))
    return identity, f"position, {differ} of {len(names)} folder names differ"


def class_mismatch_warning(folders: Sequence[str], names: Sequence[str], how: str, source: str) -> str:
    """The warning for :func:`align_classes`' last case, with the first few differing pairs."""
    pairs = [(f, n) for f, n in zip(folders, names) if _name_key(clean_classname(f)) != _name_key(n)]
    shown = ", ".join(f"{f!r} <-> {n!r}" for f, n in pairs[:3])
    return (f"warning: the class folders of {source} do not all match the class names ({how.split(', ', 1)[1]}, "
            f"e.g. {shown}); labels are paired with names by position (sorted folder i = name i). If that is not "
            "your order, pass a --text file in sorted-folder order, or --text folder")
