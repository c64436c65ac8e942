"""Zero-shot evaluation shared by training (every ``val_interval`` epochs) and ``lgd.zscls``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def embed_dataset(
    embed: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device, desc: str = "embedding"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 embeddings [N, D] and labels [N] of a whole loader, in loader order."""
    feats, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        images, target = batch[0], batch[1]
        feats.append(F.normalize(embed(images.to(device, non_blocking=True)).float(), dim=-1).cpu())
        labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent; k larger than the class count counts every sample as correct."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(labels.unsqueeze(1))
    return {k: 100.0 * hits[:, : min(k, maxk)].any(1).float().mean().item() for k in ks}


def zero_shot_logits(embeddings: torch.Tensor, tsb: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot classifier: ``100 * normalize(embedding) @ TSB.T``."""
    return 100.0 * F.normalize(embeddings.float(), dim=-1) @ tsb.float().T.to(embeddings.device)
