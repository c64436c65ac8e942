"""The two semantic banks of LGD.

TSB (Textual Semantics Bank): the teacher's text embedding of every class name, averaged over prompt
templates. VSB (Visual Semantics Bank): per class, a momentum average of the teacher image embeddings that
LGKA (language-guided knowledge aggregation) assigns to that class by arg-max similarity to the TSB.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import clip

from .checkpoint import atomic_torch_save
from .errors import LGDError


def class_text(spec: str, templates: str) -> tuple[list[str], list[str]]:
    """Class names and prompt templates for the banks; bad specs become one clear ``LGDError``."""
    try:
        return clip.get_classnames_and_templates(spec, templates)
    except (ValueError, OSError) as err:
        raise LGDError(f"text set {spec!r} / templates {templates!r}: {err}") from None


@torch.no_grad()
def build_tsb(
    clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 512
) -> torch.Tensor:
    """TSB [C, D] in fp32: per class, encode every template, L2-normalise each, average, L2-normalise."""
    if not classnames or not templates:
        raise ValueError("build_tsb needs at least one class name and one template")
    device = next(clip_model.parameters()).device
    texts = [template.format(name) for name in classnames for template in templates]
    tokens = clip.tokenize(texts, context_length=clip_model.context_length, truncate=True)
    chunks = [
        F.normalize(clip_model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1)
        for i in range(0, len(tokens), batch_size)
    ]
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def text_tower_fingerprint(clip_model: nn.Module) -> str:
    """SHA-256 over the text-side weights: the TSB depends on nothing else of the teacher."""
    digest = hashlib.sha256()
    for key, value in sorted(clip_model.state_dict().items()):
        if not key.startswith("visual."):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_or_build_tsb(
    clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str], cache_dir: str | os.PathLike | None
) -> torch.Tensor:
    """Build the TSB once and cache it on disk, keyed by (teacher text tower, class names, templates)."""
    if cache_dir is None:
        return build_tsb(clip_model, classnames, templates)
    key = hashlib.sha256(
        json.dumps([text_tower_fingerprint(clip_model), list(classnames), list(templates)]).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"tsb-{key}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("classnames") == list(classnames) and cached.get("templates") == list(templates):
            return cached["tsb"]
    tsb = build_tsb(clip_model, classnames, templates).cpu()
    atomic_torch_save({"tsb": tsb, "classnames": list(classnames), "templates": list(templates)}, path)
    return tsb


class VisualSemanticsBank(nn.Module):
    """VSB built by LGKA. Buffers: ``bank`` [C, D] and ``seen`` [C] (whether a class was ever hit).

    Rows start as random unit vectors. ``update`` takes the teacher embeddings of the *global* batch (the
    caller gathers them from all ranks, so every rank computes the same bank without communication here).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"VSB momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("bank", F.normalize(torch.randn(num_classes, dim), dim=1))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def assign(self, t: torch.Tensor, tsb: torch.Tensor) -> torch.Tensor:
        """LGKA assignment: the arg-max TSB class of each teacher embedding."""
        return (t.float() @ tsb.float().T).argmax(dim=1)

    @torch.no_grad()
    def update(
        self, t: torch.Tensor, tsb: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> None:
        """Fold a global batch into the bank: first hit ``V_c = z_c``, later ``V_c = m V_c + (1 - m) z_c``.

        ``z_c`` is the mean teacher embedding assigned to class ``c`` (not renormalised). Pass ``labels`` if
        the assignment is already known (the training step shares ``t @ TSB`` with L_TEX). Vectorised and
        sync-free, and only the rows of classes in the batch are read and written: every sample computes
        its class's new row, and samples of one class write identical values.
        """
        if labels is None:
            if tsb is None:
                raise ValueError("VisualSemanticsBank.update needs either tsb or labels")
            labels = self.assign(t, tsb)
        t = t.to(self.bank.dtype)
        ones = torch.ones_like(labels, dtype=t.dtype)
        counts = torch.zeros(self.bank.shape[0], dtype=t.dtype, device=t.device).index_add_(0, labels, ones)
        sums = torch.zeros_like(self.bank).index_add_(0, labels, t)
        z = sums.index_select(0, labels) / counts.index_select(0, labels).unsqueeze(1)  # each sample's class mean
        # lerp(V, z, 1 - m) = m V + (1 - m) z; a weight of 1 gives z exactly (the class's first hit).
        weight = torch.where(self.seen.index_select(0, labels), 1 - self.momentum, 1.0).to(t.dtype).unsqueeze(1)
        self.bank.index_copy_(0, labels, torch.lerp(self.bank.index_select(0, labels), z, weight))
        self.seen.index_fill_(0, labels, True)

    def extra_repr(self) -> str:
        return f"num_classes={self.bank.shape[0]}, dim={self.bank.shape[1]}, momentum={self.momentum}"
