"""Configs, the student registry and the TSB."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml

import clip
from lgd.banks import build_tsb, load_or_build_tsb
from lgd.config import load_yaml, parse_config, save_config
from lgd.data import loader_workers
from lgd.errors import LGDError
from lgd.models import STUDENTS, build_student, classifier_name
from lgd.distributed import init_distributed
from lgd.train import TrainConfig, check_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("lgd_*.yaml")) + [
    Path(__file__).resolve().parents[1] / "configs" / "toyworld.yaml"
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = parse_config(TrainConfig, ["--config", str(path)])
    assert cfg.arch in STUDENTS
    if path.name != "toyworld.yaml":  # the paper's recipe
        assert (cfg.teacher, cfg.batch_size, cfg.base_lr, cfg.student_temp, cfg.teacher_temp) == ("RN50", 2048, 0.03, 0.2, 0.01)
        assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs) == ("sgd", 0.9, 1e-4, 5)
        assert (cfg.alpha, cfg.vsb_momentum, cfg.min_crop_scale, cfg.image_size) == (0.5, 0.999, 0.2, 224)
        assert cfg.epochs == int(path.stem.rsplit("_", 1)[1].removesuffix("ep"))  # 90 or 200, as the name says
        assert cfg.arch == {"r18": "resnet18", "mnv2": "mobilenet_v2"}[path.stem.split("_")[1]]


def test_config_precedence_and_saving(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nbase_lr: 1\nweight_decay: 5e-5\narch: mobilenet_v2\n")
    cfg = parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml"), "--epochs", "3", "--no-compile"])
    assert (cfg.epochs, cfg.base_lr, cfg.arch, cfg.batch_size) == (3, 1.0, "mobilenet_v2", 2048)
    assert cfg.weight_decay == 5e-5  # YAML 1.1 reads `5e-5` as a string; it is still a float key
    assert parse_config(TrainConfig, ["--batch_size", "64"]).batch_size == 64
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["epochs"] == 3
    umask = os.umask(0o027)
    try:  # written atomically, yet with the mode a plain open() gives (shared run folders stay readable)
        save_config(cfg, tmp_path / "out" / "config.yaml")
        assert (tmp_path / "out" / "config.yaml").stat().st_mode & 0o777 == 0o640
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]  # no temp file left behind
    finally:
        os.umask(umask)


def test_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("epoch: 7\n")
    with pytest.raises(LGDError, match="unknown config key.*epoch"):
        load_yaml(tmp_path / "bad.yaml", TrainConfig)
    (tmp_path / "type.yaml").write_text("epochs: many\n")
    with pytest.raises(LGDError, match="expects int"):
        load_yaml(tmp_path / "type.yaml", TrainConfig)
    (tmp_path / "float.yaml").write_text("base_lr: fast\n")
    with pytest.raises(LGDError, match="expects float"):
        load_yaml(tmp_path / "float.yaml", TrainConfig)
    with pytest.raises(LGDError, match="not found"):
        load_yaml(tmp_path / "missing.yaml", TrainConfig)
    (tmp_path / "bool.yaml").write_text("epochs: true\n")  # bool is an int in Python, not in a config
    with pytest.raises(LGDError, match="expects int, got True"):
        load_yaml(tmp_path / "bool.yaml", TrainConfig)
    (tmp_path / "off.yaml").write_text("amp: off\n")  # YAML 1.1: unquoted off is False
    with pytest.raises(LGDError, match="quote it"):
        load_yaml(tmp_path / "off.yaml", TrainConfig)


@pytest.mark.parametrize("text, key", [("amp: fp32\n", "amp"), ("optimizer: SGD\n", "optimizer"),
                                       ("arch: alexnet\n", "arch")])
def test_yaml_values_are_held_to_the_choices_of_their_flags(tmp_path, text, key):
    """argparse checks choices of flags only; a YAML value must not slip into a fallback branch."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(LGDError, match=f"config key '{key}' must be one of"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml")])
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml"), f"--{key}", TrainConfig.__dataclass_fields__[key].default])


@pytest.mark.parametrize("change, message", [
    ({"teacher_temp": 0.0}, "teacher_temp must be positive"),
    ({"vsb_momentum": 1.0}, r"vsb_momentum must be in \[0, 1\)"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"min_crop_scale": 0.0}, r"min_crop_scale must be in \(0, 1\]"),
    ({"max_bad_images": 2.0}, "max_bad_images is a fraction"),
])
def test_train_values_out_of_range_are_refused_up_front(change, message):
    with pytest.raises(LGDError, match=message):
        check_config(TrainConfig(**change))


def test_device_names_are_checked():
    with pytest.raises(LGDError, match="device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        init_distributed("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LGDError, match="sees no CUDA GPU"):
            init_distributed("cuda")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"])
def test_student_backbone_loads_into_torchvision(arch):
    student = build_student(arch, embed_dim=32).eval()
    reference = torchvision.models.get_model(arch, weights=None)
    result = reference.load_state_dict(student.backbone.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(classifier_name(arch) + ".") for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    emb = student(x)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert student.features(x).shape == (2, student.feature_dim)
    head = student.head
    assert isinstance(head[0], torch.nn.Linear) and isinstance(head[1], torch.nn.ReLU) and isinstance(head[2], torch.nn.Linear)
    assert head[0].in_features == head[0].out_features == student.feature_dim and head[2].out_features == 32


def test_unknown_student():
    with pytest.raises(LGDError, match="unknown student arch 'vgg11'"):
        build_student("vgg11", 8)


def test_tsb_matches_per_prompt_loop_and_is_cached(toy_world, tmp_path):
    model, _ = clip.load(str(toy_world.teacher))
    names, templates = ["red circle", "blue cross", "green square"], ["a photo of a {}.", "a drawing of a {}."]
    tsb = build_tsb(model, names, templates)
    with torch.no_grad():
        rows = []
        for name in names:
            prompts = [F.normalize(model.encode_text(clip.tokenize([t.format(name)], context_length=16))[0], dim=0)
                       for t in templates]
            rows.append(F.normalize(torch.stack(prompts).mean(0), dim=0))
    torch.testing.assert_close(tsb, torch.stack(rows), rtol=0, atol=1e-6)

    cached = load_or_build_tsb(model, names, templates, tmp_path)
    files = list(tmp_path.glob("tsb-*.pt"))
    assert len(files) == 1 and torch.equal(cached, tsb)
    entry = torch.load(files[0], weights_only=True)
    torch.save({**entry, "tsb": entry["tsb"] * 2}, files[0])  # a hit returns the file, a rebuild would not
    assert torch.equal(load_or_build_tsb(model, names, templates, tmp_path), tsb * 2)
    load_or_build_tsb(model, names[:2], templates, tmp_path)
    assert len(list(tmp_path.glob("tsb-*.pt"))) == 2  # another class-name set gets another entry


def test_loader_workers_are_capped_at_the_usable_cpus(monkeypatch):
    """Config defaults written for GPU servers (8 workers) must not oversubscribe a 2-core laptop."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(8) == 2
    assert loader_workers(1) == 1
    assert loader_workers(0) == 0
