"""The OpenMMLab configs in mmdetection/ and mmsegmentation/, and their run.sh.

Our configs inherit their base configs through mmengine's ``mmdet::``/``mmseg::`` scopes. Every check runs
against a *stub* package tree that holds, under the real base-config paths, only the keys our configs
override or must displace (values as in mmdet 3.3.0 / mmseg 1.2.2): it proves the files parse, the scoped
paths have the form mmengine resolves, overrides merge as intended (``_delete_`` leaves no ResNet keys in a
MobileNetV2) and widths match the real torchvision backbones. Where mmdet and mmsegmentation are installed
(the test extra installs them, with mmcv-lite), every check runs again against the real base configs (the
``installed`` parameter), the converted checkpoints are checked against the backbones the real packages
build, and run.sh runs with the real packages and a recording ``mim``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

mmengine_config = pytest.importorskip("mmengine.config")

from lgd.checkpoint import atomic_torch_save  # noqa: E402
from lgd.convert import CKPT_ENV, arch_from_mm_config, check_mm_checkpoint, mobilenet_v2_stages, prepare_for_mm  # noqa: E402
from lgd.errors import LGDError  # noqa: E402
from lgd.models import build_student  # noqa: E402
from openmmlab_stand_in import import_openmmlab_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DET = REPO / "mmdetection" / "configs"
SEG = REPO / "mmsegmentation" / "configs"
CONFIGS = {
    DET / "mask-rcnn_r18_fpn_1x_coco_lgd.py": ("mmdet", "resnet18"),
    DET / "mask-rcnn_mnv2_fpn_1x_coco_lgd.py": ("mmdet", "mobilenet_v2"),
    DET / "mask-rcnn_r18_fpn_sample1e-3_ms-1x_lvis-v1_lgd.py": ("mmdet", "resnet18"),
    DET / "mask-rcnn_mnv2_fpn_sample1e-3_ms-1x_lvis-v1_lgd.py": ("mmdet", "mobilenet_v2"),
    SEG / "fcn_r18-d8_4xb2-80k_cityscapes-512x1024_lgd.py": ("mmseg", "resnet18"),
    SEG / "fcn_mnv2-d8_4xb2-80k_cityscapes-512x1024_lgd.py": ("mmseg", "mobilenet_v2"),
    SEG / "fcn_r18-d8_4xb4-80k_ade20k-512x512_lgd.py": ("mmseg", "resnet18"),
    SEG / "fcn_mnv2-d8_4xb4-80k_ade20k-512x512_lgd.py": ("mmseg", "mobilenet_v2"),
}

# Constructor arguments of the OpenMMLab backbones (mmdet 3.3.0 / mmseg 1.2.2 signatures): a merged
# backbone dict with any other key would fail to build.
BACKBONE_ARGS = {
    ("mmdet", "ResNet"): {"depth", "in_channels", "stem_channels", "base_channels", "num_stages", "strides",
                          "dilations", "out_indices", "style", "deep_stem", "avg_down", "frozen_stages",
                          "conv_cfg", "norm_cfg", "norm_eval", "dcn", "stage_with_dcn", "plugins", "with_cp",
                          "zero_init_residual", "pretrained", "init_cfg"},
    ("mmdet", "MobileNetV2"): {"widen_factor", "out_indices", "frozen_stages", "conv_cfg", "norm_cfg", "act_cfg",
                               "norm_eval", "with_cp", "pretrained", "init_cfg"},
    ("mmseg", "MobileNetV2"): {"widen_factor", "strides", "dilations", "out_indices", "frozen_stages", "conv_cfg",
                               "norm_cfg", "act_cfg", "norm_eval", "with_cp", "pretrained", "init_cfg"},
}
BACKBONE_ARGS[("mmseg", "ResNet")] = BACKBONE_ARGS[("mmdet", "ResNet")] | {"multi_grid", "contract_dilation"}

IMAGENET_MEAN = "[123.675, 116.28, 103.53]"
IMAGENET_STD = "[58.395, 57.12, 57.375]"
STUB_CONFIGS = {
    "mmdet": {
        "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py": f"""
default_scope = 'mmdet'
model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(type='DetDataPreprocessor', mean={IMAGENET_MEAN}, std={IMAGENET_STD},
                           bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch',
                  init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    roi_head=dict(bbox_head=dict(num_classes=80), mask_head=dict(num_classes=80)))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001))
""",
        "lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py": """
_base_ = ['../mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
model = dict(roi_head=dict(bbox_head=dict(num_classes=1203), mask_head=dict(num_classes=1203)))
""",
    },
    "mmseg": {
        "fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py": f"""
default_scope = 'mmseg'
data_preprocessor = dict(type='SegDataPreProcessor', mean={IMAGENET_MEAN}, std={IMAGENET_STD},
                         bgr_to_rgb=True, size=(512, 1024))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained='open-mmlab://resnet50_v1c',
    backbone=dict(type='ResNetV1c', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                  strides=(1, 2, 1, 1), norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False,
                  style='pytorch', contract_dilation=True),
    decode_head=dict(type='FCNHead', in_channels=2048, in_index=3, channels=512, num_classes=19),
    auxiliary_head=dict(type='FCNHead', in_channels=1024, in_index=2, channels=256, num_classes=19))
""",
        "fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py": """
_base_ = ['./fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py']
model = dict(decode_head=dict(num_classes=150), auxiliary_head=dict(num_classes=150))
""",
    },
}
DISTRIBUTIONS = {"mmdet": "mmdet", "mmseg": "mmsegmentation"}


def write_stub_openmmlab(site: Path) -> dict[str, Path]:
    """Stub ``mmdet``/``mmseg`` packages holding only config files, installed as distributions in ``site``."""
    roots = {}
    for module, configs in STUB_CONFIGS.items():
        root = site / module
        for rel, text in configs.items():
            (root / ".mim" / "configs" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / ".mim" / "configs" / rel).write_text(text)
        (root / ".mim" / "model-index.yml").write_text("Import: []\n")
        (root / "__init__.py").write_text("")
        dist = site / f"{DISTRIBUTIONS[module]}-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTIONS[module]}\nVersion: 0.0.0\n")
        (dist / "top_level.txt").write_text(f"{module}\n")
        roots[DISTRIBUTIONS[module]] = root
    return roots


def installed_openmmlab() -> bool:
    """Real mmdet and mmsegmentation config trees, and the pkg_resources that mmengine resolves them with."""
    for module in DISTRIBUTIONS:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not (Path(spec.origin).parent / ".mim" / "configs").is_dir():
            return False
    return importlib.util.find_spec("pkg_resources") is not None


@pytest.fixture(scope="module", params=["stub", "installed"] if installed_openmmlab() else ["stub"])
def openmmlab(request, tmp_path_factory):
    """Make mmengine resolve ``mmdet::``/``mmseg::`` to the stub tree (or to the real packages)."""
    if request.param == "installed":
        yield request.param
        return
    roots = write_stub_openmmlab(tmp_path_factory.mktemp("site"))
    patch = pytest.MonkeyPatch()
    patch.setattr(mmengine_config.config, "is_installed", lambda package: package in roots)
    patch.setattr(mmengine_config.config, "get_installed_path", lambda package: str(roots[package]))
    yield request.param
    patch.undo()


@pytest.fixture(scope="module")
def parsed(openmmlab):
    checkpoint = "/data/lgd run/backbone.pth"  # spaces survive mmengine's substitution
    os.environ[CKPT_ENV] = checkpoint
    try:
        yield checkpoint, {path: mmengine_config.Config.fromfile(str(path)) for path in CONFIGS}
    finally:
        del os.environ[CKPT_ENV]


@functools.cache
def stage_widths(layout: str, arch: str) -> list[int]:
    """Output channels of the backbone stages that ``out_indices`` count, measured on torchvision models."""
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.zeros(1, 3, 32, 32)
    widths = []
    with torch.no_grad():
        if arch.startswith("resnet"):
            h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            for i in range(1, 5):
                h = getattr(model, f"layer{i}")(h)
                widths.append(h.shape[1])
            return widths
        ends = [s.features[-1] for s in mobilenet_v2_stages(layout) if s.name != "conv1"]
        for i, block in enumerate(model.features):
            x = block(x)
            if i in ends:
                widths.append(x.shape[1])
    return widths


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_the_checkpoint_variable(parsed, path):
    checkpoint, cfgs = parsed
    assert cfgs[path].model.backbone.init_cfg == {"type": "Pretrained", "checkpoint": checkpoint}
    assert not cfgs[path].model.get("pretrained")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_backbone_is_the_torchvision_shaped_one(parsed, path):
    layout, arch = CONFIGS[path]
    backbone = dict(parsed[1][path].model.backbone)
    kind = backbone.pop("type")
    assert kind == ("MobileNetV2" if arch == "mobilenet_v2" else "ResNet")  # not mmseg's ResNetV1c
    assert set(backbone) <= BACKBONE_ARGS[(layout, kind)], "keys leaked from the base backbone"
    if kind == "ResNet":
        assert backbone["depth"] == 18 and not backbone.get("deep_stem") and not backbone.get("avg_down")
    assert backbone["norm_cfg"]["type"] == "SyncBN" and backbone["norm_eval"] is False


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_input_widths_match_the_backbone(parsed, path):
    layout, arch = CONFIGS[path]
    model = parsed[1][path].model
    widths = stage_widths(layout, arch)
    outs = [widths[i] for i in model.backbone.out_indices]
    if layout == "mmdet":
        assert model.neck.in_channels == outs
        assert len(outs) == 4  # strides 4..32 for the FPN
    else:
        assert model.decode_head.in_channels == outs[model.decode_head.in_index]
        assert model.auxiliary_head.in_channels == outs[model.auxiliary_head.in_index]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_inputs_use_clip_statistics(parsed, path):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    preprocessor = parsed[1][path].model.data_preprocessor
    assert preprocessor.mean == pytest.approx([255 * v for v in OPENAI_DATASET_MEAN])
    assert preprocessor.std == pytest.approx([255 * v for v in OPENAI_DATASET_STD])
    assert preprocessor.bgr_to_rgb is True


@pytest.mark.parametrize("path", [p for p, (layout, _) in CONFIGS.items() if layout == "mmdet"], ids=lambda p: p.name)
def test_detection_recipe(parsed, path):
    optim = parsed[1][path].optim_wrapper
    assert optim.optimizer == {"type": "AdamW", "lr": 2e-4, "weight_decay": 1e-4}  # no SGD momentum left
    assert optim.paramwise_cfg.custom_keys == {"backbone": {"lr_mult": 0.1}}
    assert optim.clip_grad == {"max_norm": 35, "norm_type": 2}
    classes = parsed[1][path].model.roi_head.bbox_head.num_classes
    assert classes == (1203 if "lvis" in path.name else 80)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_arch_from_config(openmmlab, path):
    layout, arch = CONFIGS[path]
    assert arch_from_mm_config(path, layout) == arch
    other = "mmseg" if layout == "mmdet" else "mmdet"
    with pytest.raises(LGDError, match=f"not an {other} one"):
        arch_from_mm_config(path, other)


def test_config_refuses_to_parse_without_the_variable(openmmlab, monkeypatch):
    monkeypatch.delenv(CKPT_ENV, raising=False)
    with pytest.raises(KeyError, match=CKPT_ENV):
        mmengine_config.Config.fromfile(str(DET / "mask-rcnn_r18_fpn_1x_coco_lgd.py"))


def test_arch_from_config_rejects_configs_that_would_ignore_our_weights(openmmlab, tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']\n")
    with pytest.raises(LGDError, match=f"Pretrained from \\${CKPT_ENV}"):
        arch_from_mm_config(plain)
    v1c = tmp_path / "v1c.py"
    v1c.write_text(
        f"_base_ = ['{SEG / 'fcn_r18-d8_4xb2-80k_cityscapes-512x1024_lgd.py'}']\n"
        "model = dict(backbone=dict(type='ResNetV1c'))\n"
    )
    with pytest.raises(LGDError, match="three-conv stem"):
        arch_from_mm_config(v1c)
    caffe = tmp_path / "caffe.py"  # same tensor shapes, but the stride sits on another conv
    caffe.write_text(
        f"_base_ = ['{SEG / 'fcn_r18-d8_4xb2-80k_cityscapes-512x1024_lgd.py'}']\n"
        "model = dict(backbone=dict(style='caffe'))\n"
    )
    with pytest.raises(LGDError, match="style='pytorch'"):
        arch_from_mm_config(caffe)
    pretraining = tmp_path / "lgd_r18.yaml"  # CONFIG as scripts/train.sh uses it
    pretraining.write_text("arch: resnet18\n")
    with pytest.raises(LGDError, match="not an OpenMMLab config"):
        arch_from_mm_config(pretraining)


def save_lgd(path: Path, arch: str) -> None:
    student = build_student(arch, 16)
    atomic_torch_save({"format": "lgd", "version": 1, "arch": arch, "embed_dim": 16, "model": student.state_dict()},
                      path)


def test_prepare_converts_for_the_config_backbone(openmmlab, tmp_path):
    if openmmlab != "stub":
        pytest.skip("conversion does not depend on the base configs")
    ckpt = tmp_path / "mnv2.pth"
    save_lgd(ckpt, "mobilenet_v2")
    arch, path, reports = prepare_for_mm(ckpt, SEG / "fcn_mnv2-d8_4xb2-80k_cityscapes-512x1024_lgd.py", "mmseg",
                                         tmp_path / "work")
    assert (arch, path) == ("mobilenet_v2", tmp_path / "work" / "backbone_mmseg.pth")
    assert "no conv2" in reports[-1]
    check_mm_checkpoint(path, "mmseg", "mobilenet_v2")
    with pytest.raises(LGDError, match="holds a mobilenet_v2 backbone, not resnet18"):
        prepare_for_mm(ckpt, DET / "mask-rcnn_r18_fpn_1x_coco_lgd.py", "mmdet", tmp_path / "work2")
    assert not (tmp_path / "work2" / "backbone_torchvision.pth").exists()


@pytest.mark.skipif(not installed_openmmlab(), reason="building the backbones needs mmdet and mmsegmentation")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_converted_checkpoint_fits_the_backbone_openmmlab_builds(path, tmp_path):
    """run.sh's pre-flight: the checkpoint against the real backbone of the config, not our own key mapping."""
    layout, arch = CONFIGS[path]
    import_openmmlab_models(layout)
    ckpt = tmp_path / "lgd.pth"
    save_lgd(ckpt, arch)
    _, converted, _ = prepare_for_mm(ckpt, path, layout, tmp_path / "work")
    assert f"{layout}'s own" in check_mm_checkpoint(converted, layout, arch, config=path)
    if arch == "mobilenet_v2":  # the torchvision names would leave OpenMMLab's MobileNetV2 random
        with pytest.raises(LGDError, match="missing"):
            check_mm_checkpoint(tmp_path / "work" / "backbone_torchvision.pth", layout, arch, config=path)


# ----------------------------------------------------------------------------------------------- run.sh
def fake_bin(tmp_path: Path) -> Path:
    """A `mim` that records how it was called instead of training, and this interpreter as `python` (the
    interpreter run.sh checks and converts with, and the one the real `mim` would train with)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mim = bin_dir / "mim"
    mim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$LGD_BACKBONE_CKPT" "$@" > "$MIM_RECORD"\n')
    mim.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return bin_dir


def run_script(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=env["HOME"])


def test_run_sh_explains_how_to_install_openmmlab(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CKPT": __file__}
    for script, package in ((REPO / "mmdetection" / "run.sh", "mmdet>=3.0.0"),
                            (REPO / "mmsegmentation" / "run.sh", "mmsegmentation>=1.0.0")):
        result = run_script(script, env)
        assert result.returncode == 2
        assert "pip install -U openmim" in result.stderr and f'mim install mmengine "mmcv>=2.0.0,<2.2.0" "{package}"' \
            in result.stderr


def test_run_sh_requires_a_checkpoint(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CKPT": str(tmp_path / "nope.pth")}
    result = run_script(REPO / "mmdetection" / "run.sh", env)
    assert result.returncode == 2 and "CKPT not found" in result.stderr


@pytest.mark.slow
def test_run_sh_converts_checks_and_launches(tmp_path):
    """mmsegmentation/run.sh with a MobileNetV2 config and the installed OpenMMLab: it converts, checks against
    the backbone mmseg builds, and calls `mim` (a recording stand-in) as a user's shell would."""
    if not installed_openmmlab():
        pytest.skip("needs mmdet and mmsegmentation installed (the test extra), and pkg_resources")
    import_openmmlab_models("mmseg")
    site = tmp_path / "site"  # the interpreters run.sh starts import the mmcv-lite stand-in first
    site.mkdir()
    (site / "sitecustomize.py").write_text("from openmmlab_stand_in import install_ops_stand_in\n"
                                           "install_ops_stand_in()\n")
    ckpt = tmp_path / "my ckpt.pth"
    save_lgd(ckpt, "mobilenet_v2")
    record = tmp_path / "mim-call.txt"
    env = {
        "PATH": f"{fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent),
                                       *filter(None, [os.environ.get("PYTHONPATH")])]),
        "CKPT": str(ckpt),
        "CONFIG": str(SEG / "fcn_mnv2-d8_4xb4-80k_ade20k-512x512_lgd.py"),
        "GPUS": "2",
        "MIM_RECORD": str(record),
    }
    result = run_script(REPO / "mmsegmentation" / "run.sh", env, "--seed", "0")
    assert result.returncode == 0, result.stderr
    backbone, *args = record.read_text().splitlines()
    work_dir = tmp_path / "work_dirs" / "fcn_mnv2-d8_4xb4-80k_ade20k-512x512_lgd"
    assert backbone == str(work_dir / "backbone_mmseg.pth")
    assert args == ["train", "mmseg", env["CONFIG"], "--gpus", "2", "--launcher", "pytorch", "--work-dir",
                    str(work_dir), "--seed", "0"]
    check_mm_checkpoint(backbone, "mmseg", "mobilenet_v2")
    assert "fits the mmseg mobilenet_v2 backbone" in result.stdout and "mmseg's own" in result.stdout
