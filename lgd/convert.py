"""Weights for transfer: LGD checkpoint -> torchvision backbone -> OpenMMLab backbone layouts.

Every step verifies what it wrote instead of trusting names: OpenMMLab's ``Pretrained`` init loads
*non-strictly*, so a checkpoint in the wrong key layout trains from random weights with only a warning.
``python -m lgd.convert check`` is the pre-flight that ``mmdetection/run.sh`` and ``mmsegmentation/run.sh``
run before launching; it fails on any missing, unexpected or mis-shaped backbone tensor.

Layouts (what an OpenMMLab backbone's ``state_dict`` looks like):

* ResNet: mmdet 3.x ``ResNet`` and mmseg 1.x ``ResNet`` (v1b: ``deep_stem=False``, ``avg_down=False``) name
  their modules exactly like torchvision (``conv1``, ``bn1``, ``layerN.M.{conv,bn}K``, ``downsample.{0,1}``),
  so the torchvision state_dict loads as it is (no ``state_dict`` wrapper is needed: mmengine uses the
  top-level dict when there is none). mmseg's default ``ResNetV1c`` has a three-conv stem that these
  weights do not fit.
* MobileNetV2 (layout read from mmdet 3.3.0 ``mmdet/models/backbones/mobilenet_v2.py`` +
  ``mmdet/models/layers/inverted_residual.py`` and mmseg 1.2.2 ``mmseg/models/backbones/mobilenet_v2.py`` +
  ``mmseg/models/utils/inverted_residual.py``): stem ConvModule ``conv1``; ``layer1``..``layer7``, one per
  row of :data:`MM_MOBILENET_V2_LAYERS`; mmdet adds ``conv2`` (1x1 conv to 1280 channels), mmseg has none.
  A ConvModule holds ``conv`` and ``bn``. An mmdet block has ``expand_conv`` (absent when the expand ratio
  is 1), ``depthwise_conv`` and ``linear_conv``; an mmseg block has a Sequential ``conv`` of ConvModules
  numbered in order, so ``conv.0`` is the depthwise conv of a block without expand conv.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from .checkpoint import atomic_torch_save, backbone_state_dict, is_lgd_checkpoint, safe_load
from .errors import LGDError, cli_entry
from .models import STUDENTS, classifier_name

MM_LAYOUTS = ("mmdet", "mmseg")
MOBILENET_V2 = "mobilenet_v2"
RESNETS = tuple(a for a in STUDENTS if a.startswith("resnet"))
MM_ARCHES = (*RESNETS, MOBILENET_V2)

# The environment variable our OpenMMLab configs read the backbone checkpoint from
# (mmengine substitutes ``{{$LGD_BACKBONE_CKPT:}}`` in config files; parsing fails loudly when it is unset).
CKPT_ENV = "LGD_BACKBONE_CKPT"

# (expand ratio, output channels, blocks) of OpenMMLab's MobileNetV2 ``layer1``..``layer7`` (its
# ``arch_settings``); the torchvision walk below must reproduce it, which pins the two layouts together.
MM_MOBILENET_V2_LAYERS = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))

Shapes = dict[str, torch.Size]
StateDict = dict[str, torch.Tensor]


def _check_layout(layout: str) -> None:
    if layout not in MM_LAYOUTS:
        raise LGDError(f"unknown OpenMMLab layout {layout!r}; choose one of {', '.join(MM_LAYOUTS)}")


def _check_mm_arch(arch: str) -> None:
    if arch not in MM_ARCHES:
        raise LGDError(f"no OpenMMLab layout for {arch!r}; supported: {', '.join(MM_ARCHES)}")


@functools.cache
def _backbone_shapes(arch: str) -> tuple[tuple[str, torch.Size], ...]:
    attr = classifier_name(arch)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = torchvision.models.get_model(arch, weights=None)
    return tuple((k, v.shape) for k, v in model.state_dict().items() if not k.startswith(f"{attr}."))


def torchvision_backbone_shapes(arch: str) -> Shapes:
    """Names and shapes of a torchvision model's tensors without its classifier."""
    return dict(_backbone_shapes(arch))


@dataclass(frozen=True)
class MMStage:
    """One top-level OpenMMLab MobileNetV2 module and the torchvision ``features`` indices it covers."""

    name: str
    features: tuple[int, ...]
    out_channels: int


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, nn.Conv2d, str]]:
    """``(conv name, conv, bn name)`` in forward order: torchvision follows every conv by its BatchNorm."""
    convs = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != len(bns):
        raise LGDError(f"unexpected torchvision structure: {len(convs)} convs but {len(bns)} BatchNorms")
    return [(cn, conv, bn) for (cn, conv), bn in zip(convs, bns)]


def _block_units(block: InvertedResidual, layout: str) -> list[tuple[str, str, str]]:
    """``(tv conv name, tv bn name, mm ConvModule name)`` for one inverted residual block."""
    pairs = _conv_bn_pairs(block)
    depthwise = [i for i, (_, conv, _) in enumerate(pairs) if conv.groups > 1]
    if len(depthwise) != 1 or depthwise[0] not in (0, 1) or len(pairs) != depthwise[0] + 2:
        raise LGDError("unexpected torchvision InvertedResidual: expected [expand] -> depthwise -> linear convs")
    roles = (["expand_conv"] if depthwise[0] == 1 else []) + ["depthwise_conv", "linear_conv"]
    names = roles if layout == "mmdet" else [f"conv.{i}" for i in range(len(roles))]
    return [(cn, bn, mm) for (cn, _, bn), mm in zip(pairs, names)]


@functools.cache
def _mobilenet_v2_mapping(layout: str) -> tuple[tuple[MMStage, ...], tuple[tuple[str, str | None], ...]]:
    """OpenMMLab stages and ``(torchvision key, mm key or None if dropped)`` for every backbone tensor.

    Derived by walking ``torchvision.models.mobilenet_v2().features``: a new ``layerN`` starts where the
    block width changes (each (t, c, n, s) row of MobileNetV2 has its own width).
    """
    _check_layout(layout)
    with torch.device("meta"):  # structure only
        features = torchvision.models.mobilenet_v2(weights=None).features
    stem, *blocks, last = features
    if not (isinstance(stem, Conv2dNormActivation) and isinstance(last, Conv2dNormActivation)):
        raise LGDError("unexpected torchvision mobilenet_v2: features must start and end with a conv-BN-ReLU6")
    if not all(isinstance(b, InvertedResidual) for b in blocks):
        raise LGDError("unexpected torchvision mobilenet_v2: features[1:-1] must be InvertedResidual blocks")

    units: list[tuple[int, str, str, str]] = []  # (features index, tv conv, tv bn, mm ConvModule path)
    stem_conv_name, stem_conv, stem_bn_name = _conv_bn_pairs(stem)[0]
    units.append((0, stem_conv_name, stem_bn_name, "conv1"))
    stages = [MMStage("conv1", (0,), stem_conv.out_channels)]

    layers: list[tuple[int, int, list[int]]] = []  # (expand ratio, width, features indices)
    for index, block in enumerate(blocks, start=1):
        pairs = _conv_bn_pairs(block)
        width = pairs[-1][1].out_channels
        if not layers or width != layers[-1][1]:
            expand = pairs[1][1].out_channels // pairs[0][1].in_channels if len(pairs) == 3 else 1
            layers.append((expand, width, []))
        layers[-1][2].append(index)
        prefix = f"layer{len(layers)}.{len(layers[-1][2]) - 1}"
        units += [(index, conv, bn, f"{prefix}.{mm}") for conv, bn, mm in _block_units(block, layout)]
    settings = tuple((expand, width, len(indices)) for expand, width, indices in layers)
    if settings != MM_MOBILENET_V2_LAYERS:
        raise LGDError(
            f"torchvision mobilenet_v2 stages {settings} differ from OpenMMLab's {MM_MOBILENET_V2_LAYERS}"
        )
    stages += [MMStage(f"layer{i + 1}", tuple(ix), width) for i, (_, width, ix) in enumerate(layers)]

    last_index = len(features) - 1
    last_conv_name, last_conv, last_bn_name = _conv_bn_pairs(last)[0]
    # mmdet keeps the final 1x1 conv as ``conv2``; mmseg has no such module (mapped to "": dropped)
    units.append((last_index, last_conv_name, last_bn_name, "conv2" if layout == "mmdet" else ""))
    if layout == "mmdet":
        stages.append(MMStage("conv2", (last_index,), last_conv.out_channels))

    shapes = torchvision_backbone_shapes(MOBILENET_V2)
    pairs_out: list[tuple[str, str | None]] = []
    for index, conv, bn, mm in units:
        for tv_module, mm_module in ((conv, "conv"), (bn, "bn")):
            prefix = f"features.{index}.{tv_module}."
            for key in (k for k in shapes if k.startswith(prefix)):
                pairs_out.append((key, f"{mm}.{mm_module}.{key[len(prefix):]}" if mm else None))
    return tuple(stages), tuple(pairs_out)


def mobilenet_v2_stages(layout: str) -> tuple[MMStage, ...]:
    """OpenMMLab MobileNetV2's top-level modules in forward order (``out_indices`` count ``layer1`` as 0)."""
    return _mobilenet_v2_mapping(layout)[0]


def mobilenet_v2_key_map(layout: str) -> dict[str, str | None]:
    """torchvision ``mobilenet_v2`` backbone key -> OpenMMLab key (``None``: no such module, dropped)."""
    return dict(_mobilenet_v2_mapping(layout)[1])


def expected_mm_keys(layout: str, arch: str) -> Shapes:
    """The backbone tensors (names and shapes) that an OpenMMLab backbone of our configs has.

    BatchNorm ``num_batches_tracked`` buffers are listed (OpenMMLab has them) although mmengine does not
    require them when loading.
    """
    _check_layout(layout)
    _check_mm_arch(arch)
    shapes = torchvision_backbone_shapes(arch)
    if arch != MOBILENET_V2:
        return shapes
    return {mm: shapes[tv] for tv, mm in mobilenet_v2_key_map(layout).items() if mm is not None}


def _tensor_state_dict(obj: Any, what: str) -> StateDict:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LGDError(f"{what} is not a state_dict of tensors")
    return dict(obj)


def _shape_problems(sd: StateDict, expected: Shapes) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape descriptions) of ``sd`` against ``expected``."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in sd and sd[k].shape != expected[k]
    ]
    return missing, unexpected, wrong


def _listing(label: str, items: Sequence[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"


# --------------------------------------------------------------------------------------------- torchvision
def split_classifier(arch: str, sd: StateDict) -> tuple[StateDict, list[str]]:
    """``sd`` without the torchvision classifier of ``arch``, and the dropped keys.

    A full torchvision model (e.g. ImageNet weights as a baseline) carries its classifier; no backbone
    consumer wants it, and OpenMMLab's key check would call it unexpected.
    """
    head = f"{classifier_name(arch)}."
    dropped = [k for k in sd if k.startswith(head)]
    return {k: v for k, v in sd.items() if not k.startswith(head)}, dropped


def verify_torchvision_load(arch: str, sd: StateDict, what: str = "the state_dict") -> str:
    """Load ``sd`` into ``torchvision.models.get_model(arch)`` and require that every backbone tensor matches.

    The classifier may be present or absent, for any number of classes (a fine-tuned model's is set aside
    unread). Returns the one-line report the tools print.
    """
    backbone, classifier = split_classifier(arch, sd)
    model = torchvision.models.get_model(arch, weights=None)
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise LGDError(f"{what} does not load into torchvision {arch}: {err}") from None
    head = f"{classifier_name(arch)}."
    not_classifier = [k for k in result.missing_keys if not k.startswith(head)]
    if not_classifier or result.unexpected_keys:
        problems = []
        if not_classifier:
            problems.append(_listing("missing backbone tensors", not_classifier))
        if result.unexpected_keys:
            problems.append(_listing("unexpected tensors", result.unexpected_keys))
        raise LGDError(f"{what} does not load into torchvision {arch}: " + "; ".join(problems))
    if classifier:
        tail = f"its classifier ({', '.join(classifier)}) is not part of the backbone"
    else:
        tail = f"missing only {', '.join(result.missing_keys)} (classifier, expected)"
    return f"loads into torchvision {arch}: all {len(backbone)} backbone tensors matched; {tail}"


def _resolve_arch(found: str | None, requested: str | None, path: str | os.PathLike, advice: str = "") -> str:
    if found and requested and found != requested:
        raise LGDError(f"{path} holds a {found} backbone, not {requested}; "
                       + (advice or f"pick the config/--arch for {found}"))
    arch = found or requested
    if arch is None:
        raise LGDError(f"{path} is a plain state_dict that does not name its architecture; pass --arch")
    classifier_name(arch)
    return arch


def convert_to_torchvision(src: str | os.PathLike, out: str | os.PathLike, arch: str | None = None) -> str:
    """LGD checkpoint (or torchvision state_dict) -> plain torchvision backbone state_dict at ``out``.

    ``out`` is written atomically, then read back and loaded into torchvision; returns that report.
    """
    found, sd = backbone_state_dict(src)
    arch = _resolve_arch(found, arch, src)
    sd = _tensor_state_dict(sd, str(src))
    verify_torchvision_load(arch, sd, str(src))  # refuse to write a file that would not load
    sd, dropped = split_classifier(arch, sd)
    atomic_torch_save(sd, out)
    report = verify_torchvision_load(arch, _tensor_state_dict(safe_load(out), str(out)), str(out))
    if dropped:
        report += f"\ndropped the classifier of {src} ({', '.join(dropped)}): OUT holds the backbone only"
    return report


# ------------------------------------------------------------------------------------------------ OpenMMLab
def torchvision_to_mm(sd: StateDict, layout: str, source: str = "the state_dict") -> tuple[StateDict, list[str]]:
    """A torchvision ``mobilenet_v2`` backbone state_dict in OpenMMLab ``layout``, and the dropped keys.

    Every source key must be a backbone key (exactly the torchvision set without the classifier: strip it
    with :func:`split_classifier`) with the right shape, and every OpenMMLab key is produced exactly once.
    """
    _check_layout(layout)
    key_map = mobilenet_v2_key_map(layout)
    _problems(sd, torchvision_backbone_shapes(MOBILENET_V2), f"{source} is not a torchvision mobilenet_v2 backbone")
    out: StateDict = {}
    dropped: list[str] = []
    for tv_key, tensor in sd.items():
        mm_key = key_map[tv_key]
        if mm_key is None:
            dropped.append(tv_key)
            continue
        if mm_key in out:
            raise LGDError(f"internal error: two torchvision tensors map to {mm_key}")
        out[mm_key] = tensor
    return out, dropped


def convert_to_mm(src: str | os.PathLike, out: str | os.PathLike, layout: str) -> str:
    """torchvision ``mobilenet_v2`` state_dict or LGD checkpoint -> OpenMMLab checkpoint at ``out``.

    Writes ``{"state_dict": ..., "meta": {"source", "arch", "layout", "dropped"}}`` atomically, re-checks the
    written file with :func:`check_mm_checkpoint` and returns a summary.
    """
    found, sd = backbone_state_dict(src)
    _resolve_arch(found, MOBILENET_V2, src, advice="this conversion is for MobileNetV2 students only (a ResNet "
                  "needs none: use tools/convert-pretrain-to-torchvision.py)")
    sd, classifier = split_classifier(MOBILENET_V2, _tensor_state_dict(sd, str(src)))
    converted, dropped = torchvision_to_mm(sd, layout, str(src))
    meta = {"source": os.path.abspath(src), "arch": MOBILENET_V2, "layout": layout, "dropped": dropped}
    atomic_torch_save({"state_dict": converted, "meta": meta}, out)
    check_mm_checkpoint(out, layout, MOBILENET_V2)
    names = ", ".join(s.name for s in mobilenet_v2_stages(layout))
    lines = [f"converted {len(converted)} tensors of torchvision mobilenet_v2 to the {layout} layout ({names})"]
    if classifier:
        lines.append(f"dropped the classifier ({', '.join(classifier)}): not part of the backbone")
    if dropped:
        lines.append(
            f"dropped {len(dropped)} tensors of the final 1x1 conv to 1280 channels "
            f"({layout}'s MobileNetV2 has no conv2): {', '.join(dropped)}"
        )
    else:
        lines.append("dropped: nothing")
    return "\n".join(lines)


def mm_visible_state_dict(obj: Any, what: str) -> StateDict:
    """What mmengine's ``load_checkpoint`` hands to the model: ``obj['state_dict']`` if present, else ``obj``,
    with a leading ``module.`` stripped (its default ``revise_keys``)."""
    if is_lgd_checkpoint(obj):
        raise LGDError(
            f"{what} is an LGD training checkpoint: OpenMMLab would load none of its tensors; convert it first "
            "(tools/convert-pretrain-to-torchvision.py, then for mobilenet_v2 "
            "tools/convert-torchvision-to-mm{det,seg}-mnv2.py)"
        )
    sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    sd = _tensor_state_dict(sd, what)
    return {re.sub(r"^module\.", "", k): v for k, v in sd.items()}


def _layout_guess(sd: StateDict) -> str | None:
    """Which known layout ``sd`` matches (``num_batches_tracked`` aside), for a hint when it is the wrong one."""
    candidates = [(f"the torchvision (= OpenMMLab) layout of {arch}", torchvision_backbone_shapes(arch))
                  for arch in RESNETS]
    candidates += [(f"the {layout} layout of {MOBILENET_V2}", expected_mm_keys(layout, MOBILENET_V2))
                   for layout in MM_LAYOUTS]
    candidates.append((f"the torchvision layout of {MOBILENET_V2}", torchvision_backbone_shapes(MOBILENET_V2)))
    for name, expected in candidates:
        missing, unexpected, wrong = _shape_problems(sd, expected)
        if not unexpected and not wrong and all(k.endswith("num_batches_tracked") for k in missing):
            return name
    return None


def _problems(sd: StateDict, expected: Shapes, what: str, ignore_missing_counters: bool = False) -> None:
    """Raise one LGDError naming missing, unexpected and mis-shaped tensors (and the layout ``sd`` has)."""
    missing, unexpected, wrong = _shape_problems(sd, expected)
    if ignore_missing_counters:
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or wrong:
        problems = [
            _listing(label, items)
            for label, items in (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong))
            if items
        ]
        guess = _layout_guess(sd)
        hint = f" It matches {guess}." if guess else ""
        raise LGDError(f"{what}: " + "; ".join(problems) + "." + hint)


def check_mm_checkpoint(path: str | os.PathLike, layout: str, arch: str,
                        config: str | os.PathLike | None = None) -> str:
    """Fail unless ``path`` fills every tensor of the OpenMMLab ``layout`` backbone ``arch`` of our configs.

    Mirrors what mmengine will see; a missing ``num_batches_tracked`` is allowed (mmengine ignores it). With
    ``config``, the expected tensors are those of the backbone that the installed OpenMMLab builds from it, so
    the check does not rest on our own key mapping alone (a module renamed by a new release is caught).
    """
    expected = expected_mm_keys(layout, arch)
    against = "expected"
    if config is not None:
        expected, against = openmmlab_backbone_shapes(config, layout), f"{layout}'s own, as {config} builds it,"
    sd = mm_visible_state_dict(safe_load(path), str(path))
    _problems(sd, expected, f"{path} does not fit the {layout} {arch} backbone (OpenMMLab would silently keep "
              "random weights for what is missing)", ignore_missing_counters=True)
    return f"{path} fits the {layout} {arch} backbone: all {len(expected)} tensors present with the {against} shapes"


def openmmlab_backbone_shapes(config: str | os.PathLike, layout: str) -> Shapes:
    """The tensors (names and shapes) of the backbone that ``config`` builds with the installed ``layout``
    package (weights not loaded: ``init_cfg`` and ``pretrained`` are dropped, nothing is read from disk)."""
    _check_layout(layout)
    backbone = _mm_backbone(config, layout)[1]  # a config of ours: Pretrained from $LGD_BACKBONE_CKPT, known arch
    backbone.pop("init_cfg", None)
    backbone.pop("pretrained", None)
    try:
        from mmengine.registry import DefaultScope
        registry = importlib.import_module(f"{layout}.registry").MODELS
        importlib.import_module(f"{layout}.models")  # registers the backbones
    except Exception as err:  # ImportError, or a version assert of mmcv inside the package
        raise LGDError(f"building the backbone of {config} needs an importable {layout} (with mmcv): "
                       f"{type(err).__name__}: {err}") from None
    with contextlib.redirect_stdout(sys.stderr), DefaultScope.overwrite_default_scope(layout):
        module = registry.build(backbone)
    return {key: value.shape for key, value in module.state_dict().items()}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def arch_from_mm_config(config: str | os.PathLike, layout: str | None = None) -> str:
    """The student arch whose weights an OpenMMLab config's backbone takes, checked to be loaded from
    ``$LGD_BACKBONE_CKPT`` (and, given ``layout``, to be a config of that package). Parses with mmengine,
    which comes with OpenMMLab."""
    return _mm_backbone(config, layout)[0]


def _mm_backbone(config: str | os.PathLike, layout: str | None) -> tuple[str, dict[str, Any]]:
    """``(arch, model.backbone)`` of an OpenMMLab config of ours (see :func:`arch_from_mm_config`)."""
    try:
        from mmengine.config import Config
    except ImportError:
        raise LGDError("reading an OpenMMLab config needs mmengine: pip install mmengine") from None
    if not Path(config).is_file():
        raise LGDError(f"config not found: {config}")
    if Path(config).suffix != ".py":
        raise LGDError(f"{config} is not an OpenMMLab config (a .py file, e.g. one in mmdetection/configs/); "
                       "CONFIG of run.sh names the detection or segmentation config, not a pre-training YAML")
    sentinel = "/lgd-backbone-checkpoint-placeholder.pth"
    # mmengine logs to stdout; keep stdout for the answer (run.sh captures it)
    with _env(CKPT_ENV, sentinel), contextlib.redirect_stdout(sys.stderr):
        try:
            cfg = Config.fromfile(str(config))
        except Exception as err:  # mmengine raises many types for broken or unresolvable configs
            raise LGDError(f"cannot parse {config}: {type(err).__name__}: {err}") from None
    scope = cfg.get("default_scope")
    if layout is not None and scope not in (None, layout):
        raise LGDError(f"{config} is an {scope} config, not an {layout} one; use the run.sh of its package")
    model = cfg.get("model", {})
    backbone = model.get("backbone", {})
    init_cfg = backbone.get("init_cfg") or {}
    if init_cfg.get("type") != "Pretrained" or init_cfg.get("checkpoint") != sentinel:
        raise LGDError(f"{config}: model.backbone.init_cfg must be Pretrained from ${CKPT_ENV}, got {init_cfg}")
    if model.get("pretrained"):
        raise LGDError(f"{config}: model.pretrained={model['pretrained']!r} would override the LGD weights")
    kind = backbone.get("type")
    if kind == "ResNet":
        arch = f"resnet{backbone.get('depth')}"
        if backbone.get("deep_stem") or backbone.get("avg_down") or backbone.get("stem_channels", 64) != 64 \
                or backbone.get("base_channels", 64) != 64:
            raise LGDError(f"{config}: only a torchvision-shaped ResNet (v1b, 64-channel stem) fits these weights")
        if backbone.get("style", "pytorch") != "pytorch":  # caffe style strides the 1x1 conv: same shapes, other maths
            raise LGDError(f"{config}: ResNet style={backbone.get('style')!r}; torchvision weights need style='pytorch'")
    elif isinstance(kind, str) and kind.startswith("ResNetV1"):
        raise LGDError(f"{config}: {kind} has a three-conv stem that torchvision weights do not fit; use type='ResNet'")
    elif kind == "MobileNetV2":
        arch = MOBILENET_V2
        if backbone.get("widen_factor", 1.0) != 1.0:
            raise LGDError(f"{config}: MobileNetV2 widen_factor must be 1.0 for torchvision mobilenet_v2 weights")
    else:
        raise LGDError(f"{config}: backbone type {kind!r} has no LGD conversion (ResNet or MobileNetV2)")
    _check_mm_arch(arch)
    return arch, dict(backbone)


def prepare_for_mm(
    ckpt: str | os.PathLike, config: str | os.PathLike, layout: str, out_dir: str | os.PathLike
) -> tuple[str, Path, list[str]]:
    """Convert ``ckpt`` for the backbone that OpenMMLab ``config`` builds: ``(arch, checkpoint, reports)``.

    LGD -> torchvision (``out_dir/backbone_torchvision.pth``, which OpenMMLab's ResNet loads as it is) and,
    for MobileNetV2, -> ``out_dir/backbone_<layout>.pth``.
    """
    _check_layout(layout)
    arch = arch_from_mm_config(config, layout)
    out_dir = Path(out_dir)
    torchvision_ckpt = out_dir / "backbone_torchvision.pth"
    reports = [convert_to_torchvision(ckpt, torchvision_ckpt, arch)]
    if arch != MOBILENET_V2:
        return arch, torchvision_ckpt, reports
    mm_ckpt = out_dir / f"backbone_{layout}.pth"
    reports.append(convert_to_mm(torchvision_ckpt, mm_ckpt, layout))
    return arch, mm_ckpt, reports


# -------------------------------------------------------------------------------------------------- CLI
def add_to_torchvision_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="LGD checkpoint (checkpoint_last.pth) or a torchvision state_dict")
    parser.add_argument("out", help="output .pth: a plain torchvision state_dict of the backbone (no classifier)")
    parser.add_argument("--arch", choices=sorted(STUDENTS),
                        help="expected architecture (required for a plain state_dict; checked for an LGD one)")


def run_to_torchvision(args: argparse.Namespace) -> None:
    print(convert_to_torchvision(args.ckpt, args.out, args.arch))
    print(f"wrote {args.out}")


def add_to_mm_args(parser: argparse.ArgumentParser, layout: str | None = None) -> None:
    parser.add_argument("tv", help="torchvision mobilenet_v2 state_dict, or an LGD checkpoint of mobilenet_v2")
    parser.add_argument("out", help='output .pth: {"state_dict": ..., "meta": ...} in the OpenMMLab layout')
    if layout is None:
        parser.add_argument("--layout", required=True, choices=MM_LAYOUTS)
    else:
        parser.set_defaults(layout=layout)


def run_to_mm(args: argparse.Namespace) -> None:
    print(convert_to_mm(args.tv, args.out, args.layout))
    print(f"wrote {args.out}")


def add_check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="the checkpoint the OpenMMLab config will load")
    parser.add_argument("--layout", required=True, choices=MM_LAYOUTS)
    parser.add_argument("--arch", required=True, choices=MM_ARCHES)
    parser.add_argument("--config", help="also build this config's backbone with the installed OpenMMLab and "
                                         "check against its real tensors (what run.sh does)")


def run_check(args: argparse.Namespace) -> None:
    print(check_mm_checkpoint(args.ckpt, args.layout, args.arch, args.config))


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="LGD checkpoint or torchvision state_dict")
    parser.add_argument("--layout", required=True, choices=MM_LAYOUTS)
    parser.add_argument("--config", required=True, help="the OpenMMLab config to train (its backbone decides)")
    parser.add_argument("--out-dir", required=True, help="folder for the converted checkpoint(s)")


def run_prepare(args: argparse.Namespace) -> None:
    arch, path, reports = prepare_for_mm(args.ckpt, args.config, args.layout, args.out_dir)
    print("\n".join(reports), file=sys.stderr)
    print(f"{arch}\t{path}")  # the one stdout line, for run.sh


COMMANDS = {
    "to-torchvision": (add_to_torchvision_args, run_to_torchvision,
                       "LGD checkpoint -> torchvision backbone state_dict"),
    "to-mm": (add_to_mm_args, run_to_mm, "torchvision mobilenet_v2 -> OpenMMLab (mmdet/mmseg) layout"),
    "check": (add_check_args, run_check, "pre-flight: does a checkpoint fill an OpenMMLab backbone exactly?"),
    "prepare": (add_prepare_args, run_prepare,
                "convert a checkpoint for an OpenMMLab config's backbone; prints '<arch><TAB><checkpoint>'"),
}


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lgd.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main(sys.argv[1:])
