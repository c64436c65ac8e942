"""Thin helpers over ``torch.distributed`` for torchrun jobs; everything degrades to a no-op in one process."""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .errors import LGDError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: str = "auto") -> torch.device:
    """Join the torchrun job if launched by torchrun (NCCL on GPU, gloo on CPU); return this rank's device."""
    if device != "auto" and device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LGDError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise LGDError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu or auto")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        if use_cuda:
            torch.cuda.set_device(local_rank())
        # Rank 0 alone downloads the teacher and builds the TSB on a first run while the others wait in a
        # collective: allow that longer than NCCL's 10-minute default.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    if use_cuda:
        if is_dist():
            return torch.device("cuda", local_rank())
        return torch.device(device) if ":" in device else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Let local rank 0 run the block first (downloads, caches), then the other ranks of the node."""
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors of all ranks in rank order (no gradient)."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def require_resumed_alike(position: tuple[int, ...], path: object, device: torch.device) -> None:
    """Every rank must have resumed to the same ``position`` (epoch, step, ...). Each rank reads the resume file
    itself: a node that cannot see it (no shared filesystem) would silently start afresh and diverge."""
    if not is_dist():
        return
    every = all_gather_cat(torch.tensor([position], dtype=torch.long, device=device)).cpu()
    if not bool((every == every[0]).all()):
        found = ", ".join(f"rank {r}: {tuple(row.tolist())}" for r, row in enumerate(every))
        raise LGDError(f"the ranks resumed from different states ({found}) of {path or 'no checkpoint'}; every rank "
                       "reads the resume file itself, so it must be on a filesystem all nodes share (or copied to "
                       "the same path on each)")


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(tensor, src)
    return tensor


def shard_indices(n: int) -> list[int]:
    """This rank's share of ``range(n)`` for evaluation: strided, disjoint, and covering every index exactly once
    (unlike ``DistributedSampler``, which pads with duplicates and would bias the counts)."""
    return list(range(rank(), n, world_size()))


def shard(dataset: Dataset) -> Subset:
    """This rank's :func:`shard_indices` of a map-style dataset."""
    return Subset(dataset, shard_indices(len(dataset)))  # type: ignore[arg-type]
