"""Parameterised MoCo-v2 views: sample the augmentation parameters first, render them second.

Splitting the two lets the teacher-embedding cache (``lgd.cache``) store the exact parameters of a view
next to the teacher's embedding of it, and re-render that same view for the student in a later epoch.
``sample`` draws from torch's global RNG with the same calls, in the same order, as the torchvision
transforms of :func:`lgd.data.moco_v2_transform`, and ``render`` applies the same functional ops, so
``MocoV2View(size)(image)`` equals ``moco_v2_transform(size)(image)`` bit for bit under the same seed
(``tests/test_cache.py`` checks it): training live or from the cache sees the same kind of views.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import functional as TF

from .data import VIEW_INTERPOLATION, normalization
from .errors import LGDError

JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue strengths
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)

# One view's parameters as a fixed-size record (what the cache stores per view).
PARAMS_DTYPE = np.dtype(
    [
        ("box", "<i4", (4,)),  # crop top, left, height, width in the source image
        ("jitter", "u1"),  # colour jitter applied?
        ("order", "u1", (4,)),  # order of brightness (0), contrast (1), saturation (2), hue (3)
        ("factors", "<f4", (4,)),  # brightness, contrast, saturation, hue factors
        ("gray", "u1"),
        ("blur", "u1"),
        ("sigma", "<f4"),  # Gaussian blur sigma
        ("flip", "u1"),
    ]
)


def check_teacher_resolution(visual: nn.Module, image_size: int, teacher: str) -> None:
    """CLIP towers have fixed positional embeddings: the view size must be the teacher's input resolution."""
    expected = getattr(visual, "input_resolution", image_size)
    if image_size != expected:
        raise LGDError(f"image_size {image_size} does not fit the teacher {teacher}, whose input resolution is "
                       f"{expected}px; pass --image-size {expected}")

def blur_kernel(size: int) -> int:
    """About 10% of the side, odd, at least 3 (as in MoCo v2 and ``moco_v2_transform``)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


@dataclass(frozen=True)
class ViewParams:
    """Everything that decides one MoCo-v2 view of an image. Factors are float32 values (as sampled)."""

    box: tuple[int, int, int, int]
    jitter: bool = False
    order: tuple[int, int, int, int] = (0, 1, 2, 3)
    factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    gray: bool = False
    blur: bool = False
    sigma: float = 0.0
    flip: bool = False

    def to_record(self) -> np.void:
        record = np.zeros((), dtype=PARAMS_DTYPE)
        for name in PARAMS_DTYPE.names:
            record[name] = getattr(self, name)
        return record[()]

    @classmethod
    def from_record(cls, record: np.void) -> "ViewParams":
        """Inverse of ``to_record``; float32 factors come back as the exact Python floats sampled."""
        return cls(
            box=tuple(int(v) for v in record["box"]),
            jitter=bool(record["jitter"]),
            order=tuple(int(v) for v in record["order"]),
            factors=tuple(float(v) for v in record["factors"]),
            gray=bool(record["gray"]),
            blur=bool(record["blur"]),
            sigma=float(record["sigma"]),
            flip=bool(record["flip"]),
        )


class MocoV2View:
    """MoCo-v2 augmentation with CLIP normalisation, as ``sample`` (parameters) + ``render`` (pixels)."""

    def __init__(self, size: int, norm: str = "clip", min_scale: float = 0.2) -> None:
        self.size, self.norm, self.min_scale = size, norm, min_scale
        self.kernel = blur_kernel(size)
        # torchvision's own modules hold the parameter ranges; only their static samplers are called.
        self._crop = transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=VIEW_INTERPOLATION)
        self._jitter = transforms.ColorJitter(*JITTER)
        self._normalize = normalization(norm)

    def __repr__(self) -> str:
        return f"MocoV2View(size={self.size}, norm={self.norm!r}, min_scale={self.min_scale})"

    def sample(self, image: Image.Image) -> ViewParams:
        """Draw one view's parameters from torch's global RNG (seed it first for a reproducible view)."""
        box = transforms.RandomResizedCrop.get_params(image, self._crop.scale, self._crop.ratio)
        params: dict = {"box": tuple(int(v) for v in box)}
        if not P_JITTER < torch.rand(1):  # RandomApply's test, kept literally for identical RNG use
            order, *factors = transforms.ColorJitter.get_params(
                self._jitter.brightness, self._jitter.contrast, self._jitter.saturation, self._jitter.hue
            )
            params.update(jitter=True, order=tuple(int(v) for v in order), factors=tuple(factors))
        params["gray"] = bool(torch.rand(1) < P_GRAY)
        if not P_BLUR < torch.rand(1):
            params.update(blur=True, sigma=transforms.GaussianBlur.get_params(*BLUR_SIGMA))
        params["flip"] = bool(torch.rand(1) < P_FLIP)
        return ViewParams(**params)

    def render(self, image: Image.Image, params: ViewParams) -> torch.Tensor:
        """The normalised [3, size, size] view of ``image`` that ``params`` describe (deterministic)."""
        x = TF.resized_crop(image, *params.box, [self.size, self.size], VIEW_INTERPOLATION, antialias=True)
        if params.jitter:
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for fn_id in params.order:
                x = adjust[fn_id](x, params.factors[fn_id])
        if params.gray:
            x = TF.rgb_to_grayscale(x, num_output_channels=TF.get_dimensions(x)[0])
        if params.blur:
            x = TF.gaussian_blur(x, [self.kernel, self.kernel], [params.sigma, params.sigma])
        if params.flip:
            x = TF.hflip(x)
        return self._normalize(TF.to_tensor(x))

    def sample_and_render(self, image: Image.Image) -> tuple[torch.Tensor, ViewParams]:
        params = self.sample(image)
        return self.render(image, params), params

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.render(image, self.sample(image))
