"""Checkpoint conversion for transfer: LGD -> torchvision -> OpenMMLab layouts, and the pre-flight check."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from lgd.checkpoint import atomic_torch_save, safe_load
from lgd.convert import (
    MM_MOBILENET_V2_LAYERS,
    check_mm_checkpoint,
    convert_to_mm,
    convert_to_torchvision,
    expected_mm_keys,
    main,
    mobilenet_v2_key_map,
    mobilenet_v2_stages,
    torchvision_to_mm,
)
from lgd.errors import LGDError
from lgd.models import build_student, classifier_name
from openmmlab_stand_in import import_openmmlab_models

REPO = Path(__file__).resolve().parents[1]


def randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so that a BN tensor landing in the wrong place changes the output."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def save_lgd_checkpoint(path: Path, arch: str, embed_dim: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    student = build_student(arch, embed_dim)
    randomise_bn(student)
    atomic_torch_save(
        {"format": "lgd", "version": 1, "arch": arch, "embed_dim": embed_dim, "model": student.state_dict()}, path
    )
    return student.eval()


@pytest.fixture(scope="module")
def mnv2_tv(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision mobilenet_v2 backbone state_dict on disk (random init, randomised BN)."""
    path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2_tv.pth"
    model = torchvision.models.mobilenet_v2()
    randomise_bn(model)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_round_trip_to_torchvision_gives_identical_features(tmp_path, arch):
    ckpt, out = tmp_path / "checkpoint_last.pth", tmp_path / "out dir" / "backbone.pth"
    student = save_lgd_checkpoint(ckpt, arch)
    report = convert_to_torchvision(ckpt, out)

    attr = classifier_name(arch)
    sd = safe_load(out)
    assert not any(k.startswith(("head.", "backbone.", f"{attr}.")) for k in sd)
    model = torchvision.models.get_model(arch, weights=None)
    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == [k for k in model.state_dict() if k.startswith(f"{attr}.")]
    assert report.startswith(f"loads into torchvision {arch}: all {len(sd)} backbone tensors matched")
    assert ", ".join(result.missing_keys) in report

    setattr(model, attr, torch.nn.Identity())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), student.features(x), rtol=0, atol=0)


def test_to_torchvision_checks_the_arch(tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    save_lgd_checkpoint(ckpt, "resnet18")
    with pytest.raises(LGDError, match="holds a resnet18 backbone, not mobilenet_v2"):
        convert_to_torchvision(ckpt, tmp_path / "out.pth", arch="mobilenet_v2")
    tv = tmp_path / "tv.pth"
    convert_to_torchvision(ckpt, tv)
    with pytest.raises(LGDError, match="pass --arch"):
        convert_to_torchvision(tv, tmp_path / "again.pth")
    assert convert_to_torchvision(tv, tmp_path / "again.pth", arch="resnet18").startswith("loads into")


def test_to_torchvision_refuses_a_wrong_state_dict(tmp_path, mnv2_tv):
    path, sd = mnv2_tv
    with pytest.raises(LGDError, match="does not load into torchvision resnet18"):
        convert_to_torchvision(path, tmp_path / "out.pth", arch="resnet18")
    truncated = dict(sd)
    del truncated["features.3.conv.1.0.weight"]
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(LGDError, match=r"missing backbone tensors: features\.3\.conv\.1\.0\.weight"):
        convert_to_torchvision(tmp_path / "truncated.pth", tmp_path / "out.pth", arch="mobilenet_v2")
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("num_classes", [1000, 10])
def test_a_full_torchvision_model_loses_its_classifier(tmp_path, arch, num_classes):
    """ImageNet weights as a baseline, or a model fine-tuned to 10 classes, come with their classifier:
    converted, it is dropped and said so, whatever its shape."""
    full = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    report = convert_to_torchvision(tmp_path / "full.pth", tmp_path / "out.pth", arch=arch)
    attr = classifier_name(arch)
    head = [k for k in full.state_dict() if k.startswith(f"{attr}.")]
    sd = safe_load(tmp_path / "out.pth")
    assert head and not any(k in sd for k in head)
    assert set(sd) == {k for k in full.state_dict() if k not in head}
    assert f"all {len(sd)} backbone tensors matched" in report and "dropped the classifier" in report
    if arch == "mobilenet_v2":
        for layout in ("mmdet", "mmseg"):
            lines = convert_to_mm(tmp_path / "full.pth", tmp_path / f"{layout}.pth", layout)
            assert "dropped the classifier (classifier.1.weight, classifier.1.bias)" in lines
            check_mm_checkpoint(tmp_path / f"{layout}.pth", layout, arch)


def test_mobilenet_v2_stages_follow_openmmlab_arch_settings():
    for layout in ("mmdet", "mmseg"):
        stages = mobilenet_v2_stages(layout)
        layers = [s for s in stages if s.name.startswith("layer")]
        assert [(s.out_channels, len(s.features)) for s in layers] == [(c, n) for _, c, n in MM_MOBILENET_V2_LAYERS]
        assert stages[0].name == "conv1" and stages[0].features == (0,)
    assert mobilenet_v2_stages("mmdet")[-1].name == "conv2"
    assert mobilenet_v2_stages("mmdet")[-1].out_channels == 1280
    assert [s.name for s in mobilenet_v2_stages("mmseg")][-1] == "layer7"


@pytest.mark.parametrize("layout", ["mmdet", "mmseg"])
def test_mobilenet_v2_layout_uses_every_key_once(layout, mnv2_tv):
    _, sd = mnv2_tv
    converted, dropped = torchvision_to_mm(sd, layout)
    key_map = mobilenet_v2_key_map(layout)
    targets = [v for v in key_map.values() if v is not None]
    assert len(targets) == len(set(targets))
    assert set(key_map) == set(sd)
    conv2 = [k for k in sd if k.startswith("features.18.")]
    if layout == "mmdet":
        assert dropped == [] and len(converted) == len(sd)
    else:
        assert dropped == conv2 and len(converted) == len(sd) - len(conv2) == len(sd) - 6
    expected = expected_mm_keys(layout, "mobilenet_v2")
    assert {k: v.shape for k, v in converted.items()} == expected
    for tv_key, mm_key in key_map.items():  # the tensors themselves move, untouched
        if mm_key is not None:
            assert converted[mm_key] is sd[tv_key]


def test_mmdet_mobilenet_v2_key_names():
    keys = expected_mm_keys("mmdet", "mobilenet_v2")
    assert keys["conv1.conv.weight"] == (32, 3, 3, 3)
    assert keys["layer1.0.depthwise_conv.conv.weight"] == (32, 1, 3, 3)
    assert keys["layer1.0.linear_conv.conv.weight"] == (16, 32, 1, 1)
    assert not any(k.startswith("layer1.0.expand_conv") for k in keys)  # expand ratio 1: no expand conv
    assert keys["layer2.0.expand_conv.conv.weight"] == (96, 16, 1, 1)
    assert keys["layer7.0.expand_conv.bn.running_var"] == (960,)
    assert keys["layer7.0.depthwise_conv.conv.weight"] == (960, 1, 3, 3)
    assert keys["layer7.0.linear_conv.conv.weight"] == (320, 960, 1, 1)
    assert keys["conv2.conv.weight"] == (1280, 320, 1, 1)
    assert keys["conv2.bn.num_batches_tracked"] == ()
    assert "layer7.1.linear_conv.conv.weight" not in keys


def test_mmseg_mobilenet_v2_key_names():
    keys = expected_mm_keys("mmseg", "mobilenet_v2")
    assert keys["layer1.0.conv.0.conv.weight"] == (32, 1, 3, 3)  # depthwise first: no expand conv
    assert keys["layer1.0.conv.1.conv.weight"] == (16, 32, 1, 1)
    assert "layer1.0.conv.2.conv.weight" not in keys
    assert keys["layer2.1.conv.0.conv.weight"] == (144, 24, 1, 1)
    assert keys["layer7.0.conv.1.bn.weight"] == (960,)
    assert keys["layer7.0.conv.2.conv.weight"] == (320, 960, 1, 1)
    assert not any(k.startswith("conv2.") for k in keys)


def test_resnet_layout_is_torchvision_without_classifier():
    tv = torchvision.models.resnet18().state_dict()
    for layout in ("mmdet", "mmseg"):
        keys = expected_mm_keys(layout, "resnet18")
        assert keys == {k: v.shape for k, v in tv.items() if not k.startswith("fc.")}
        assert "layer2.0.downsample.1.num_batches_tracked" in keys


@pytest.mark.parametrize("layout", ["mmdet", "mmseg"])
def test_convert_to_mm_writes_state_dict_and_meta(tmp_path, layout, mnv2_tv):
    path, sd = mnv2_tv
    out = tmp_path / f"{layout}.pth"
    report = convert_to_mm(path, out, layout)
    obj = safe_load(out)
    assert set(obj) == {"state_dict", "meta"}
    assert obj["meta"]["arch"] == "mobilenet_v2" and obj["meta"]["layout"] == layout
    assert obj["meta"]["source"] == str(path)
    assert obj["meta"]["dropped"] == ([] if layout == "mmdet" else [k for k in sd if k.startswith("features.18.")])
    assert ("dropped 6 tensors" in report) == (layout == "mmseg")
    torch.testing.assert_close(obj["state_dict"]["layer3.2.conv.2.bn.running_mean" if layout == "mmseg"
                                                  else "layer3.2.linear_conv.bn.running_mean"],
                               sd["features.6.conv.3.running_mean"])


def test_convert_to_mm_accepts_an_lgd_checkpoint_and_refuses_resnet(tmp_path):
    ckpt = tmp_path / "mnv2.pth"
    save_lgd_checkpoint(ckpt, "mobilenet_v2")
    convert_to_mm(ckpt, tmp_path / "out.pth", "mmdet")
    assert check_mm_checkpoint(tmp_path / "out.pth", "mmdet", "mobilenet_v2").endswith("expected shapes")
    r18 = tmp_path / "r18.pth"
    save_lgd_checkpoint(r18, "resnet18")
    with pytest.raises(LGDError, match="holds a resnet18 backbone, not mobilenet_v2; this conversion is for "
                                       "MobileNetV2 students only .*convert-pretrain-to-torchvision.py"):
        convert_to_mm(r18, tmp_path / "bad.pth", "mmdet")


def test_check_accepts_what_mmengine_accepts(tmp_path, mnv2_tv):
    _, sd = mnv2_tv
    converted, _ = torchvision_to_mm(sd, "mmseg")
    no_counters = {k: v for k, v in converted.items() if not k.endswith("num_batches_tracked")}
    torch.save({f"module.{k}": v for k, v in no_counters.items()}, tmp_path / "plain.pth")
    assert "fits the mmseg mobilenet_v2 backbone" in check_mm_checkpoint(tmp_path / "plain.pth", "mmseg",
                                                                         "mobilenet_v2")


def test_check_names_what_does_not_fit(tmp_path, mnv2_tv):
    tv_path, sd = mnv2_tv
    with pytest.raises(LGDError, match="It matches the torchvision layout of mobilenet_v2"):
        check_mm_checkpoint(tv_path, "mmdet", "mobilenet_v2")
    convert_to_mm(tv_path, tmp_path / "det.pth", "mmdet")
    with pytest.raises(LGDError, match="It matches the mmdet layout of mobilenet_v2") as err:
        check_mm_checkpoint(tmp_path / "det.pth", "mmseg", "mobilenet_v2")
    assert "missing: layer1.0.conv.0.conv.weight" in str(err.value)
    assert "unexpected: layer1.0.depthwise_conv.conv.weight" in str(err.value)

    converted, _ = torchvision_to_mm(sd, "mmseg")
    converted["layer4.0.conv.0.conv.weight"] = torch.zeros(1)
    del converted["conv1.bn.weight"]
    torch.save({"state_dict": converted}, tmp_path / "broken.pth")
    with pytest.raises(LGDError) as err:
        check_mm_checkpoint(tmp_path / "broken.pth", "mmseg", "mobilenet_v2")
    assert "1 missing: conv1.bn.weight" in str(err.value)
    assert "1 with a wrong shape: layer4.0.conv.0.conv.weight (1,) (expected (192, 32, 1, 1))" in str(err.value)

    lgd = tmp_path / "lgd.pth"
    save_lgd_checkpoint(lgd, "resnet18")
    with pytest.raises(LGDError, match="is an LGD training checkpoint"):
        check_mm_checkpoint(lgd, "mmdet", "resnet18")


def test_cli_check_exit_status(tmp_path, mnv2_tv, capsys):
    tv_path, _ = mnv2_tv
    main(["to-mm", "--layout", "mmseg", str(tv_path), str(tmp_path / "seg.pth")])
    main(["check", "--layout", "mmseg", "--arch", "mobilenet_v2", str(tmp_path / "seg.pth")])
    assert "fits the mmseg mobilenet_v2 backbone" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--layout", "mmdet", "--arch", "mobilenet_v2", str(tmp_path / "seg.pth")])
    assert exit_info.value.code == 2
    assert "It matches the mmseg layout of mobilenet_v2" in capsys.readouterr().err


def load_tool(name: str):
    """A tools/*.py script as a module (hyphenated names cannot be imported)."""
    return runpy.run_path(str(REPO / "tools" / name), run_name="tool_under_test")


@pytest.mark.parametrize(
    "tool", ["convert-pretrain-to-torchvision.py", "convert-torchvision-to-mmdet-mnv2.py",
             "convert-torchvision-to-mmseg-mnv2.py"],
)
def test_tools_have_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool)["main"](["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_tool_errors_exit_2(tmp_path, mnv2_tv, capsys):
    tv_path, _ = mnv2_tv
    with pytest.raises(SystemExit) as exit_info:
        load_tool("convert-torchvision-to-mmdet-mnv2.py")["main"]([str(tmp_path / "missing.pth"), str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")


def test_mnv2_tool_runs_as_a_script(tmp_path, mnv2_tv, monkeypatch, capsys):
    """The script as `python tools/...` runs it (its __main__ block, sys.argv), paths with spaces included."""
    tv_path, _ = mnv2_tv
    out = tmp_path / "dir with space" / "seg.pth"
    tool = REPO / "tools" / "convert-torchvision-to-mmseg-mnv2.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(tv_path), str(out)])
    runpy.run_path(str(tool), run_name="__main__")
    assert "no conv2" in capsys.readouterr().out
    assert check_mm_checkpoint(out, "mmseg", "mobilenet_v2")


def _openmmlab_mobilenet_v2(layout: str):
    """OpenMMLab's own MobileNetV2 (the test extra installs mmdet and mmsegmentation, with mmcv-lite)."""
    import_openmmlab_models(layout)
    if layout == "mmdet":
        from mmdet.models.backbones import MobileNetV2
    else:
        from mmseg.models.backbones import MobileNetV2
    return MobileNetV2


@pytest.mark.parametrize("layout", ["mmdet", "mmseg"])
def test_openmmlab_mobilenet_v2_oracle(layout, mnv2_tv):
    """Strict load into the real OpenMMLab backbone and equal outputs to torchvision at every stage."""
    backbone_cls = _openmmlab_mobilenet_v2(layout)
    _, sd = mnv2_tv
    stages = [s for s in mobilenet_v2_stages(layout) if s.name != "conv1"]
    mm = backbone_cls(out_indices=tuple(range(len(stages))))
    mm.load_state_dict(torchvision_to_mm(sd, layout)[0], strict=True)
    mm.eval()
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(sd, strict=False)
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    ends, h, refs = {s.features[-1] for s in stages}, x, []
    with torch.no_grad():
        for i, block in enumerate(tv.features):
            h = block(h)
            if i in ends:
                refs.append(h)
        outs = mm(x)
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref)
