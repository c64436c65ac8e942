"""Students: a registry of torchvision backbones with LGD's MLP projection head.

The backbone keeps torchvision's module names (only its classifier is replaced by ``Identity``), so
``student.backbone.state_dict()`` loads into ``torchvision.models.<arch>()`` with just the classifier missing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import LGDError

# arch -> name of the torchvision attribute that holds the ImageNet classifier.
STUDENTS: dict[str, str] = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "resnet101": "fc",
    "mobilenet_v2": "classifier",
    "mobilenet_v3_small": "classifier",
    "mobilenet_v3_large": "classifier",
    "efficientnet_b0": "classifier",
    "efficientnet_b1": "classifier",
    "efficientnet_b2": "classifier",
    "shufflenet_v2_x1_0": "fc",
    "regnet_y_400mf": "fc",
}


def available_students() -> list[str]:
    return sorted(STUDENTS)


def classifier_name(arch: str) -> str:
    """Name of the torchvision classifier attribute (``fc`` or ``classifier``) that LGD strips."""
    if arch not in STUDENTS:
        raise LGDError(f"unknown student arch {arch!r}; available: {', '.join(available_students())}")
    return STUDENTS[arch]


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision model without its classifier, and its pooled feature width."""
    attr = classifier_name(arch)
    model = torchvision.models.get_model(arch, weights=None)
    classifier = getattr(model, attr)
    first_linear = next(m for m in classifier.modules() if isinstance(m, nn.Linear))
    setattr(model, attr, nn.Identity())
    return model, first_linear.in_features


class LGDStudent(nn.Module):
    """Backbone + ``Linear(d, d) - ReLU - Linear(d, D)`` head; ``forward`` returns the L2-normalised embedding."""

    def __init__(self, arch: str, embed_dim: int) -> None:
        super().__init__()
        self.arch = arch
        self.backbone, self.feature_dim = build_backbone(arch)
        d = self.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, embed_dim))
        self.embed_dim = embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: what linear probes, kNN and transfer use."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=-1)


def build_student(arch: str, embed_dim: int) -> LGDStudent:
    """The student factory (one function behind the registry, like ``timm.create_model``)."""
    return LGDStudent(arch, embed_dim)
