"""torchvision transfer (lgd.transfer): backbone wiring and weights, dilation, data readers, metrics, and
end-to-end runs of both entry points on generated data (single process, resume, and a two-process DDP run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lgd.checkpoint import atomic_torch_save
from lgd.config import parse_config
from lgd.errors import LGDError
from lgd.models import build_student
from lgd.transfer import detect, segment
from lgd.transfer.common import TransferConfig, find_stages, load_backbone, lr_factor
from lgd.transfer.synthetic import CATEGORY_IDS, make_detection_set, make_segmentation_set

REPO = Path(__file__).resolve().parents[1]
# Small heads and images: a detection step costs seconds on a CPU, not minutes.
DETECT_FAST = ["--min-size", "128", "--max-size", "128", "--roi-batch-size", "16", "--proposals-test", "50",
               "--detections-per-image", "10", "--workers", "0", "--warmup-iters", "1", "--log-interval", "1"]
SEGMENT_FAST = ["--crop-size", "64", "--base-size", "64", "--workers", "0", "--log-interval", "1"]


def lgd_checkpoint(path: Path, arch: str) -> Path:
    """An LGD training checkpoint (the format of lgd.train) of a student with non-trivial BN statistics."""
    torch.manual_seed(0)
    student = build_student(arch, 16)
    for m in student.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    atomic_torch_save({"format": "lgd", "version": 1, "arch": arch, "embed_dim": 16, "model": student.state_dict(),
                       "epoch": 0, "config": {}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {arch: lgd_checkpoint(root / f"{arch}.pth", arch) for arch in ("resnet18", "mobilenet_v2")}


@pytest.fixture(scope="module")
def det_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_detection_set(tmp_path_factory.mktemp("det"), train=2, val=2)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmentation_set(tmp_path_factory.mktemp("seg"), train=4, val=2, size=64)


# ------------------------------------------------------------------------------------------------ backbone
@pytest.mark.parametrize("arch, taps, channels", [
    ("mobilenet_v2", ["3", "6", "13", "18"], [24, 32, 96, 1280]),
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    ("resnet50", ["layer1", "layer2", "layer3", "layer4"], [256, 512, 1024, 2048]),
])
def test_pyramid_taps_from_measured_strides(arch: str, taps: list[str], channels: list[int]) -> None:
    with torch.device("meta"):  # structure and shapes only
        model = torchvision.models.get_model(arch, weights=None)
    stages = find_stages(model)
    assert [stages.tap(s) for s in (4, 8, 16, 32)] == taps
    assert [stages.channels(s) for s in (4, 8, 16, 32)] == channels


def test_detector_loads_lgd_weights_and_freezes(ckpts: dict[str, Path]) -> None:
    cfg = detect.DetectConfig(backbone=str(ckpts["resnet18"]), norm="bn", trainable_layers=3)
    arch, model, body, _ = detect.build_detector(cfg, num_classes=4)
    sd = torch.load(ckpts["resnet18"], weights_only=True)["model"]
    assert arch == "resnet18" and body is model.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, sd["backbone.layer3.1.conv2.weight"])
    # stem and layer1 frozen, BN statistics included; layer2 trains with a live BatchNorm
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert torch.equal(body.layer1[0].bn1.running_mean, sd["backbone.layer1.0.bn1.running_mean"])
    assert not body.conv1.weight.requires_grad and not body.layer1[1].conv2.weight.requires_grad
    assert type(body.layer2[0].bn1) is nn.BatchNorm2d and body.layer2[0].conv1.weight.requires_grad
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1]  # /4 ... /32 and the extra pooled level

    # Boxes are decoded in fp32 under bf16 autocast (AMP's default on GPU): zero deltas give back the boxes.
    boxes = torch.tensor([[1000.3, 700.7, 1100.9, 760.2]])
    zero_head = nn.Linear(4, 4 * 5)
    nn.init.zeros_(zero_head.weight)
    nn.init.zeros_(zero_head.bias)
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            codes = zero_head(torch.ones(1, 4))[:, :4]
            decoded = coder.decode(codes, [boxes]).view(1, 4)
            plain = torchvision.models.detection._utils.BoxCoder(coder.weights).decode(codes, [boxes]).view(1, 4)
        assert codes.dtype == torch.bfloat16 and decoded.dtype == torch.float32
        torch.testing.assert_close(decoded, boxes)
        assert (plain.float() - boxes).abs().max() > 1  # what torchvision's own coder gives under bf16


def test_backbone_source_errors(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LGDError, match="holds a resnet18 backbone"):
        load_backbone(str(ckpts["resnet18"]), "resnet50")
    plain = torchvision.models.resnet18().state_dict()
    atomic_torch_save(plain, tmp_path / "tv.pth")
    with pytest.raises(LGDError, match="pass --arch"):
        load_backbone(str(tmp_path / "tv.pth"), "")
    _, model, _ = load_backbone(str(tmp_path / "tv.pth"), "resnet18")  # its classifier keys are dropped
    assert torch.equal(model.layer4[0].conv1.weight, plain["layer4.0.conv1.weight"])
    del plain["layer2.0.bn1.running_var"]
    atomic_torch_save(plain, tmp_path / "broken.pth")
    with pytest.raises(LGDError, match="layer2.0.bn1.running_var"):
        load_backbone(str(tmp_path / "broken.pth"), "resnet18")
    with pytest.raises(LGDError, match="needs --arch"):
        load_backbone("none", "")


# ------------------------------------------------------------------------------------------------ dilation
def test_resnet_dilation_matches_torchvision() -> None:
    """resnet50 at output stride 8 gets exactly the strides/dilations of torchvision's own dilated ResNet."""
    with torch.device("meta"):
        ours = torchvision.models.resnet50()
        segment.dilate(find_stages(ours), 8, contract_first=True)
        reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    geometry = [(m.stride, m.dilation, m.padding) for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert geometry == [(m.stride, m.dilation, m.padding) for m in reference.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_segmenter_output_strides(arch: str, ckpts: dict[str, Path]) -> None:
    x = torch.randn(1, 3, 64, 64)
    plain = torchvision.models.get_model(arch).eval()
    plain.load_state_dict(load_backbone(str(ckpts[arch]), "")[1].state_dict(), strict=False)
    for stride in (8, 32):
        cfg = segment.SegmentConfig(backbone=str(ckpts[arch]), output_stride=stride, aux_weight=0.4)
        _, model, body, _ = segment.build_segmenter(cfg, num_classes=3)
        model.eval()
        with torch.no_grad():
            feats = body(x)
            assert feats["out"].shape[-1] == 64 // stride and feats["aux"].shape[-1] == 64 // min(stride, 16)
            assert model(x)["aux"].shape == (1, 3, 64, 64)
            if stride == 32:  # undilated: the very features of the pre-trained network
                expected = plain.features(x) if arch == "mobilenet_v2" else plain.layer4(plain.layer3(
                    plain.layer2(plain.layer1(plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))))))
                torch.testing.assert_close(feats["out"], expected)


# ------------------------------------------------------------------------------------------------ metrics
def test_confusion_and_iou_with_ignore() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = segment.confusion_matrix(pred, target, 4, 255)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    metrics = segment.iou_metrics(conf, ["a", "b", "c", "d"])
    # IoU a = 1/3, b = 2/3, c = 1/2; class d never occurs nor is predicted: no IoU, not averaged
    assert metrics["IoU_per_class"] == {"a": pytest.approx(100 / 3, abs=1e-3), "b": pytest.approx(200 / 3, abs=1e-3),
                                        "c": 50.0, "d": None}
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-3)
    assert metrics["aAcc"] == pytest.approx(100 * 4 / 6, abs=1e-3)


def test_lr_schedules() -> None:
    cfg = TransferConfig(schedule="step", warmup_iters=10, warmup_ratio=0.001)
    assert lr_factor(0, 120, cfg) == pytest.approx(0.001)
    assert [lr_factor(s, 120, cfg) for s in (10, 79, 80, 109, 110)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    poly = TransferConfig(schedule="poly", warmup_iters=0)
    assert lr_factor(50, 100, poly) == pytest.approx(0.5 ** 0.9) and lr_factor(100, 100, poly) == 0.0
    floored = TransferConfig(schedule="poly", lr=0.01, min_lr=1e-4)  # mmseg: (lr - eta_min)(1 - t/T)^0.9 + eta_min
    assert [0.01 * lr_factor(s, 100, floored) for s in (0, 50, 100)] == pytest.approx(
        [0.01, (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4, 1e-4])
    cosine = TransferConfig(schedule="cosine", lr=0.01, min_lr=1e-3)
    assert [0.01 * lr_factor(s, 100, cosine) for s in (0, 50, 100)] == pytest.approx([0.01, 0.0055, 1e-3])


# ------------------------------------------------------------------------------------------------ data
def test_coco_reader(det_data: Path, tmp_path: Path) -> None:
    ann = det_data / "annotations" / "instances_train2017.json"
    data = detect.CocoInstances(ann, det_data / "train2017", train=True, masks=True)
    doc = json.loads(ann.read_text())
    image, target = data[0]
    first = [a for a in doc["annotations"] if a["image_id"] == data.images[0]["id"]]
    assert data.category_ids == list(CATEGORY_IDS) and image.dtype == torch.float32 and image.max() <= 1
    assert target["labels"].tolist() == [CATEGORY_IDS.index(a["category_id"]) + 1 for a in first]
    assert target["masks"].shape == (len(first), 128, 128)
    # the mask of each instance lies inside its box, and the box is tight (flip-invariant facts)
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]

    doc["annotations"][0]["category_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(LGDError, match="category_id 99"):
        detect.CocoInstances(tmp_path / "bad.json", det_data / "train2017", train=True, masks=False)
    with pytest.raises(LGDError, match="2 of 2 images .* are missing"):
        detect.CocoInstances(ann, det_data / "val2017x", train=True, masks=False)
    with pytest.raises(LGDError, match="annotation file not found"):
        detect.CocoInstances(tmp_path / "none.json", det_data / "train2017", train=True, masks=False)


def test_coco_ap_of_no_detections_is_zero_where_there_is_ground_truth(det_data: Path) -> None:
    ann = det_data / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    ids = [image["id"] for image in doc["images"]]
    truth = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in doc["annotations"]]
    perfect, nothing = detect.coco_ap(ann, ids, {"bbox": truth}), detect.coco_ap(ann, ids, {"bbox": [], "segm": []})
    assert perfect["bbox_AP"] == 100.0 and nothing["bbox_AP"] == nothing["segm_AP"] == 0.0
    assert perfect["bbox_APl"] is nothing["bbox_APl"] is nothing["segm_APl"] is None  # 128 px images: no large objects
    for name in detect.AP_NAMES:
        assert (perfect[f"bbox_{name}"] is None) == (nothing[f"bbox_{name}"] is None) == (nothing[f"segm_{name}"] is None)


def test_segmentation_reader_errors(seg_data: Path, tmp_path: Path) -> None:
    cfg = segment.SegmentConfig(crop_size=48, base_size=64)
    data = segment.SegmentationFolder(cfg, seg_data, "train", 5, train=True)
    image, mask = data[(3, 1)]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64
    assert torch.equal(data[(3, 1)][1], mask)  # the view is a function of (index, epoch)
    with pytest.raises(LGDError, match="num_classes is 3"):
        segment.SegmentationFolder(cfg, seg_data, "train", 3, train=True)

    root = tmp_path / "data"
    for sub in ("images/train", "masks/train"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images/train/a.jpg")
    Image.new("RGB", (8, 8)).save(root / "images/train/b c.jpg")
    Image.new("L", (8, 8)).save(root / "masks/train/a.png")
    Image.new("L", (8, 8)).save(root / "masks/train/x.png")
    with pytest.raises(LGDError, match=r"1 images without a mask .*b c.*1 masks without an image .*x"):
        segment.SegmentationFolder(cfg, root, "train", 5, train=True)
    (root / "masks/train/x.png").unlink()
    Image.new("RGB", (8, 8)).save(root / "masks/train/b c.png")
    with pytest.raises(LGDError, match="mode RGB"):
        segment.SegmentationFolder(cfg, root, "train", 5, train=True)

    Image.fromarray(np.array([[0, 1, 2, 255]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert segment.read_mask(tmp_path / "m.png", 2, 255, reduce_zero_label=True).tolist() == [[255, 0, 1, 255]]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_detect_mask_rcnn_end_to_end(ckpts: dict[str, Path], det_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = detect.main(["--data", str(det_data), "--backbone", str(ckpts["mobilenet_v2"]), "--output", str(out),
                          "--epochs", "1", "--batch-size", "2", *DETECT_FAST])
    assert result["epochs"] == 1 and result["steps"] == 1 and result["arch"] == "mobilenet_v2"
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"):
        assert 0.0 <= on_disk[key] <= 100.0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "val"] and {"loss_mask", "loss_objectness"} <= records[0].keys()
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ckpt["format"] == "lgd-transfer" and ckpt["meta"]["category_ids"] == list(CATEGORY_IDS)
    assert ckpt["model"]["backbone.body.18.0.weight"].shape == (1280, 320, 1, 1)  # the stride-32 tap's conv


@pytest.mark.slow
def test_detect_faster_rcnn_without_pycocotools(ckpts: dict[str, Path], det_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if not installed
    common = ["--data", str(det_data), "--backbone", str(ckpts["resnet18"]), "--epochs", "1", "--batch-size", "2",
              *DETECT_FAST]
    with pytest.raises(SystemExit):
        detect.main([*common, "--output", str(tmp_path / "mask")])
    assert "Mask R-CNN needs pycocotools" in capsys.readouterr().err
    result = detect.main([*common, "--model", "faster_rcnn", "--norm", "frozen", "--trainable-layers", "0",
                          "--min-size", "64", "--output", str(tmp_path / "box")])
    assert result["steps"] == 1 and "bbox_AP" not in result
    assert result["notes"] == [detect.NO_PYCOCOTOOLS]
    assert json.loads((tmp_path / "box" / "metrics.json").read_text())["notes"] == [detect.NO_PYCOCOTOOLS]


@pytest.mark.slow
def test_segment_resume_is_exact(ckpts: dict[str, Path], seg_data: Path, tmp_path: Path) -> None:
    """Two epochs in one go and 1 + 1 epochs with a restart end in the same weights."""
    args = ["--data", str(seg_data), "--backbone", str(ckpts["resnet18"]), "--epochs", "2", "--batch-size", "4",
            "--aux-weight", "0.4", "--output-stride", "32", "--val-interval", "2", *SEGMENT_FAST]
    straight = segment.main([*args, "--output", str(tmp_path / "a")])
    segment.main([*args, "--output", str(tmp_path / "b"), "--stop-after", "1"])
    resumed = segment.main([*args, "--output", str(tmp_path / "b"), "--resume", "auto"])
    assert straight["steps"] == resumed["steps"] == 2 and 0.0 <= resumed["mIoU"] <= 100.0
    assert set(resumed["IoU_per_class"]) == {"background", "circle", "square", "triangle", "cross"}
    a = torch.load(tmp_path / "a" / "checkpoint_last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint_last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # another backbone cannot continue this run
        segment.main([*args, "--output", str(tmp_path / "b"), "--resume", "auto",
                      "--backbone", str(ckpts["mobilenet_v2"])])
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["backbone"] == str(ckpts["resnet18"])
    with pytest.raises(LGDError, match=r"recipe changed \(norm 'syncbn' -> 'frozen'; epochs 2 -> 3\)"):
        segment.segment(parse_config(segment.SegmentConfig, [*args, "--output", str(tmp_path / "b"), "--resume",
                                                             "auto", "--norm", "frozen", "--epochs", "3"]))
    # Killed during the final evaluation: the checkpoint saved before it has no numbers of the last epoch.
    last = tmp_path / "b" / "checkpoint_last.pth"
    atomic_torch_save({**torch.load(last, weights_only=True), "metrics": {}}, last)
    again = segment.main([*args, "--output", str(tmp_path / "b"), "--resume", "auto"])
    assert again["metrics_epoch"] == 2 and again["mIoU"] == resumed["mIoU"] and again["steps"] == 2


def test_detection_evaluation_scores_every_image_once_under_ddp(tmp_path: Path) -> None:
    """Three val images over two ranks (a padding sampler would score one twice): the perfect detector of
    tests/ddp_detect_eval_check.py must reach AP 100 from the gathered detections."""
    data = make_detection_set(tmp_path / "det", train=1, val=3)
    script = str(REPO / "tests" / "ddp_detect_eval_check.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for launcher in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
                     [sys.executable]):
        out = tmp_path / f"out{len(launcher)}"
        done = subprocess.run([*launcher, script, str(data), str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["images"] == 3 and metrics["world_size"] == (2 if len(launcher) > 1 else 1)
        assert metrics["bbox_AP"] == metrics["segm_AP"] == 100.0, metrics


@pytest.mark.slow
def test_segment_deeplab_ddp_two_processes(ckpts: dict[str, Path], seg_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "lgd.transfer.segment", "--config", str(REPO / "configs" / "transfer_demo_segment.yaml"),
               "--data", str(seg_data), "--backbone", str(ckpts["mobilenet_v2"]), "--head", "deeplabv3",
               "--output", str(out), "--epochs", "1", "--batch-size", "4", "--resume", "", *SEGMENT_FAST]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 1 and 0.0 <= metrics["mIoU"] <= 100.0
    assert any("SyncBatchNorm needs CUDA" in note for note in metrics["notes"])
