"""Weighted kNN monitor on frozen backbone features: ``python -m lgd.knn``, or ``knn_monitor`` between epochs.

Each val image votes with its k most cosine-similar training images, weighted by ``exp(sim / T)``
(Wu et al. 2018; k=20, T=0.07 as in InstDisc/DINO). No training and no hyper-parameters to tune, so it is
the cheap check of representation quality that self-supervised runs log every few epochs.

Under DDP every rank embeds its own shard of the bank and of the queries; the queries are gathered, each
rank finds their k nearest neighbours in its bank shard, and the per-shard neighbours are merged. No rank
ever holds the whole bank, and every rank gets the same result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed as du
from .checkpoint import atomic_write_json
from .config import opt, parse_config
from .data import NORMALIZATIONS, eval_transform, loader_workers, train_val_folders
from .errors import LGDError, cli_entry
from .evaluate import embed_dataset, topk_accuracy


@torch.no_grad()
def nearest(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
            chunk_size: int = 1024, max_chunk_elements: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and labels [M, k] of each query's k nearest bank rows, best first.

    A bank with fewer than k rows is padded with similarity -inf (a neighbour that never votes), so that
    the neighbours of bank shards always have the same shape and can be merged. Query chunks shrink so that
    one chunk's similarity matrix stays under ``max_chunk_elements`` floats (1 GiB; an ImageNet bank has 1.28M rows).
    """
    chunk_size = max(1, min(chunk_size, max_chunk_elements // max(1, len(bank))))
    bank = F.normalize(bank.float(), dim=1)
    take = min(k, len(bank))
    sims = torch.full((len(queries), k), float("-inf"), device=bank.device)
    labels = torch.zeros(len(queries), k, dtype=torch.long, device=bank.device)
    for start in range(0, len(queries), chunk_size):
        part = F.normalize(queries[start : start + chunk_size].float().to(bank.device), dim=1) @ bank.T
        top_sim, top_idx = part.topk(take, dim=1)
        sims[start : start + len(part), :take] = top_sim
        labels[start : start + len(part), :take] = bank_labels.to(bank.device)[top_idx]
    return sims, labels


def merge_nearest(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard neighbours [S, M, k] into the k nearest overall [M, k]."""
    flat_sims = sims.permute(1, 0, 2).flatten(1)
    flat_labels = labels.permute(1, 0, 2).flatten(1)
    top_sim, pos = flat_sims.topk(k, dim=1)
    return top_sim, flat_labels.gather(1, pos)


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores [M, C]: the sum of ``exp(sim / T)`` over each query's neighbours of that class, each row
    scaled by ``exp(-best sim / T)`` (the ranking is unchanged, and no weight overflows at small T)."""
    scores = torch.zeros(len(sims), num_classes, device=sims.device)
    best = sims[:, :1].clamp(min=-1.0)  # best first; -inf (no neighbour) stays a zero weight
    return scores.scatter_add_(1, labels, ((sims - best) / temperature).exp())


def knn_accuracy(sims: torch.Tensor, labels: torch.Tensor, query_labels: torch.Tensor, num_classes: int,
                 temperature: float) -> dict[int, float]:
    """Top-1/top-5 (%) of the vote; a query whose class is not among its neighbours is a miss at every k.

    With 20 neighbours a query often meets fewer than 5 classes; a plain top-5 over the class scores would
    fill the rest with zero-vote classes in index order and credit the low-index ones for free.
    """
    voted = (labels == query_labels.unsqueeze(1)) & torch.isfinite(sims)
    scored = torch.where(voted.any(1), query_labels, torch.full_like(query_labels, -1))
    return topk_accuracy(vote(sims, labels, num_classes, temperature).cpu(), scored.cpu())


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores [M, C] of ``test_feats`` against one in-memory bank."""
    return vote(*nearest(train_feats, train_labels, test_feats, k, chunk_size), num_classes, temperature)


def _gather_uneven(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate tensors of different lengths (dim 0) from all ranks, in rank order."""
    if not du.is_dist():
        return x
    sizes = du.all_gather_cat(torch.tensor([len(x)], device=device)).tolist()
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=device)
    padded[: len(x)] = x.to(device)
    parts = du.all_gather_cat(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def knn_monitor(features: Callable[[torch.Tensor], torch.Tensor], bank_loader: DataLoader, query_loader: DataLoader,
                device: torch.device, num_classes: int, k: int = 20, temperature: float = 0.07,
                autocast: torch.dtype | None = None) -> dict[str, float]:
    """kNN top-1/top-5 (%) of the queries against the bank (both un-augmented, labelled by folder).

    ``features`` is e.g. ``student.features`` (the pooled backbone output) with the model in eval mode. Bank items
    labelled -1 (unreadable training images, :class:`lgd.data.SkippingFolder`) are left out.
    Under DDP, call it on every rank with loaders over this rank's :func:`lgd.distributed.shard` of each dataset.
    """
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        bank, bank_labels = embed_dataset(features, bank_loader, device, desc="kNN bank")
        queries, labels = embed_dataset(features, query_loader, device, desc="kNN queries")
    readable = bank_labels >= 0
    bank, bank_labels = bank[readable], bank_labels[readable]
    if du.is_dist():  # a rank with an empty shard (fewer images than ranks) learns the feature width from the others
        dim = int(du.all_gather_cat(torch.tensor([bank.shape[1], queries.shape[1]], device=device)).max())
        bank, queries = (x if len(x) else x.new_empty(0, dim) for x in (bank, queries))
    queries = _gather_uneven(queries.to(device), device)
    labels = _gather_uneven(labels.to(device), device)
    sims, neighbour_labels = nearest(bank.to(device), bank_labels.to(device), queries, k)
    if du.is_dist():
        world = du.world_size()
        sims = du.all_gather_cat(sims).view(world, *sims.shape)
        neighbour_labels = du.all_gather_cat(neighbour_labels).view(world, *neighbour_labels.shape)
        sims, neighbour_labels = merge_nearest(sims, neighbour_labels, k)
    acc = knn_accuracy(sims, neighbour_labels, labels, num_classes, temperature)
    return {"knn_top1": acc[1], "knn_top5": acc[5]}


@dataclass
class KnnConfig:
    checkpoint: str = field(default="", metadata=opt("LGD checkpoint, or a torchvision backbone state_dict (lgd.convert)"))
    arch: str = field(default="", metadata=opt("student architecture; read from an LGD checkpoint, required for a plain state_dict"))
    data: str = field(default="", metadata=opt("ImageFolder root with train/ (the bank) and val/ (the queries), or 'toy'"))
    train_fraction: float = field(default=1.0, metadata=opt("class-balanced seeded fraction of train/ in the bank"))
    k: int = field(default=20, metadata=opt("neighbours per query"))
    temperature: float = field(default=0.07, metadata=opt("vote weight exp(cos / T)"))
    image_size: int = field(default=0, metadata=opt("resolution (0 = the checkpoint's training resolution, or 224)"))
    norm: str = field(default="clip", metadata=opt("input normalisation (LGD students: clip)", choices=sorted(NORMALIZATIONS)))
    batch_size: int = field(default=256, metadata=opt("embedding batch size per process"))
    workers: int = field(default=8, metadata=opt("data-loading processes per process"))
    seed: int = field(default=0, metadata=opt("seed of the train_fraction subset"))
    device: str = field(default="auto", metadata=opt("'auto', 'cpu' or 'cuda'"))
    amp: str = field(default="auto", metadata=opt("autocast: auto (bf16 on GPU, fp16 before Ampere; off on CPU), "
                                                   "bf16, fp16, off",
                                                   choices=["auto", "bf16", "fp16", "off"]))
    output: str = field(default="runs/knn", metadata=opt("folder for knn_metrics.json"))


def knn(cfg: KnnConfig) -> dict[str, Any]:
    """Run the kNN monitor once (one process or torchrun); writes ``knn_metrics.json``."""
    # lgd.lincls imports lgd.train, which imports this module for its knn_interval monitor.
    from .lincls import FrozenBackbone, balanced_subset, load_backbone, resolve_data, restrict
    from .train import amp_dtype

    start_time = time.time()
    if not cfg.checkpoint or not cfg.data:
        raise LGDError("pass --checkpoint (LGD checkpoint or torchvision state_dict) and --data (root with train/ and "
                       "val/, or 'toy')")
    if cfg.k <= 0 or cfg.temperature <= 0 or not 0.0 < cfg.train_fraction <= 1.0:
        raise LGDError(f"need k > 0, temperature > 0 and train_fraction in (0, 1]; got k={cfg.k}, "
                       f"temperature={cfg.temperature}, train_fraction={cfg.train_fraction}")
    device = du.init_distributed(cfg.device)
    loaded = load_backbone(cfg.checkpoint, cfg.arch, cfg.data)
    root = resolve_data(cfg.data)
    image_size = cfg.image_size or loaded.image_size or 224
    bank_set, query_set = train_val_folders(root)
    restrict(bank_set, balanced_subset(bank_set.targets, cfg.train_fraction, cfg.seed))
    bank_set.transform = query_set.transform = eval_transform(image_size, cfg.norm)
    loaders = [DataLoader(du.shard(s), batch_size=cfg.batch_size, num_workers=loader_workers(cfg.workers),
                          pin_memory=device.type == "cuda") for s in (bank_set, query_set)]
    if du.is_main():
        print(f"kNN (k={cfg.k}, T={cfg.temperature}): {loaded.source}\n  bank {len(bank_set)} images of "
              f"{root / 'train'}, queries {len(query_set)} images of {root / 'val'}, {len(bank_set.classes)} classes, "
              f"{image_size}px, {du.world_size()} process(es)")
    backbone = FrozenBackbone(loaded.module).to(device)
    acc = knn_monitor(backbone, *loaders, device, len(bank_set.classes), cfg.k, cfg.temperature, amp_dtype(cfg, device))
    result = {"top1": acc["knn_top1"], "top5": acc["knn_top5"], "k": cfg.k, "temperature": cfg.temperature,
              "num_train_images": len(bank_set), "num_val_images": len(query_set), "train_fraction": cfg.train_fraction,
              "checkpoint": str(Path(cfg.checkpoint).resolve()), "dataset": str(root.resolve()), "arch": loaded.arch,
              "image_size": image_size, "seconds": round(time.time() - start_time, 1)}
    if du.is_main():
        out = Path(cfg.output)
        atomic_write_json(out / "knn_metrics.json", result)
        print(f"\nkNN top-1: {result['top1']:.2f}%  top-5: {result['top5']:.2f}%\nmetrics: {out / 'knn_metrics.json'}")
    du.cleanup()
    return result


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(KnnConfig, argv, description="Weighted kNN (k=20, T=0.07) on frozen backbone features")
    return knn(cfg)


if __name__ == "__main__":
    main()
