"""Embedding and top-k scoring shared by training's zero-shot check, ``lgd.zscls``, ``lgd.knn`` and ``lgd.lincls``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

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
