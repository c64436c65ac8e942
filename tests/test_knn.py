"""Weighted kNN monitor: the vote against a plain-loop reference, and the CLI on the toy world."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lgd.evaluate import topk_accuracy
from lgd.knn import knn_accuracy, knn_scores, main, merge_nearest, nearest, vote
from lgd.models import build_backbone


def _reference_scores(train, labels, test, num_classes, k, temperature, shift=True):
    """Per query, in float64: cosine to every training sample, the k best vote exp(cos / T) for their class;
    with ``shift``, each query's scores are divided by exp(best cos / T), as lgd.knn reports them."""
    train, test = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for q in range(len(test)):
        sims = sorted([(float(test[q] @ train[i]), int(labels[i])) for i in range(len(train))], reverse=True)[:k]
        best = sims[0][0] if shift else 0.0
        for sim, label in sims:
            scores[q, label] += torch.exp(torch.tensor((sim - best) / temperature, dtype=torch.float64))
    return scores


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_scores_match_reference(k):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_scores(train, labels, test, 4, k=k, temperature=0.5, chunk_size=4)  # chunks must not matter
    want = _reference_scores(train, labels, test, 4, k, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_small_temperature_does_not_overflow():
    """exp(cos / 0.005) is inf in float32; the votes still rank the classes as float64 does unshifted."""
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_scores(train, labels, test, 4, k=20, temperature=0.005)
    want = _reference_scores(train, labels, test, 4, 20, 0.005, shift=False)
    assert torch.isfinite(got).all() and torch.equal(got.argmax(1), want.argmax(1))
    assert torch.isinf((F.normalize(test, dim=1) @ F.normalize(train, dim=1).T / 0.005).exp()).any()


def test_sharded_bank_merges_to_the_whole_bank():
    """What DDP ranks do: neighbours per bank shard (one smaller than k), merged, vote like the whole bank."""
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    parts = [nearest(train[a:b], labels[a:b], test, k=5) for a, b in ((0, 30), (30, 33), (33, 60))]
    sims, neighbour_labels = merge_nearest(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), 5)
    whole = knn_scores(train, labels, test, 4, k=5, temperature=0.1)
    torch.testing.assert_close(vote(sims, neighbour_labels, 4, 0.1), whole)


def test_knn_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=1) * 10
    labels = torch.arange(5).repeat_interleave(30)
    train = centres[labels] + torch.randn(150, 16, generator=g)
    test_labels = torch.arange(5).repeat(4)
    test = centres[test_labels] + torch.randn(20, 16, generator=g)
    assert topk_accuracy(knn_scores(train, labels, test, 5), test_labels)[1] == 100.0


def test_top5_credits_only_classes_among_the_neighbours():
    """Two tight clusters of classes 8 and 9 in a 10-class bank: each query meets one class, so a plain top-5 over
    the class scores also lists four zero-vote classes; queries of those classes must still be misses."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, 16, generator=g), dim=1) * 10
    bank_labels = torch.tensor([8, 9]).repeat_interleave(20)
    bank = centres[bank_labels - 8] + 0.1 * torch.randn(40, 16, generator=g)
    queries = centres[torch.tensor([0, 1, 0])] + 0.1 * torch.randn(3, 16, generator=g)
    sims, labels = nearest(bank, bank_labels, queries, k=20)
    scores = vote(sims, labels, 10, 0.07)
    free_rider = scores[2].topk(5).indices[-1]  # listed in query 2's top-5 with no vote
    assert scores[2, free_rider] == 0
    query_labels = torch.stack([torch.tensor(8), torch.tensor(9), free_rider])
    assert topk_accuracy(scores, query_labels)[5] == 100.0  # the plain top-5 credits query 2
    assert knn_accuracy(sims, labels, query_labels, 10, 0.07) == pytest.approx({1: 200 / 3, 5: 200 / 3})


@pytest.mark.slow
def test_knn_cli_lgd_student_beats_random_init(toy_run, tmp_path):
    ckpt = str(toy_run["output"] / "checkpoint_last.pth")
    common = ["--data", "toy", "--train-fraction", "0.25", "--workers", "0"]  # a bank of 25 images per class
    lgd = main(["--checkpoint", ckpt, *common, "--output", str(tmp_path / "lgd")])
    assert json.loads((tmp_path / "lgd" / "knn_metrics.json").read_text())["top1"] == lgd["top1"]
    assert lgd["k"] == 20 and lgd["temperature"] == 0.07 and lgd["num_train_images"] == 600
    torch.manual_seed(0)
    random_init, _ = build_backbone("resnet18")
    torch.save(random_init.state_dict(), tmp_path / "random.pth")
    baseline = main(["--checkpoint", str(tmp_path / "random.pth"), "--arch", "resnet18", "--image-size", "32", *common,
                     "--output", str(tmp_path / "random")])
    assert lgd["top1"] >= baseline["top1"] + 20, (lgd["top1"], baseline["top1"])


def test_ranks_with_empty_shards_take_part(tmp_path):
    """3 gloo processes over a 2-image bank and a 3-image query set: a rank with no bank image (and one
    with no query) still joins every collective, and the result equals one process's."""
    torch.manual_seed(0)
    random_init, _ = build_backbone("resnet18")
    torch.save(random_init.state_dict(), tmp_path / "random.pth")
    g = torch.Generator().manual_seed(0)
    for split, names in (("train", ["a/0", "b/0"]), ("val", ["a/1", "b/1", "b/2"])):
        for name in names:
            (tmp_path / "data" / split / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / split / f"{name}.png")
    args = ["--checkpoint", str(tmp_path / "random.pth"), "--arch", "resnet18", "--image-size", "32", "--data",
            str(tmp_path / "data"), "--workers", "0", "--device", "cpu"]
    single = main([*args, "--output", str(tmp_path / "single")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m", "lgd.knn",
           *args, "--output", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ddp = json.loads((tmp_path / "ddp" / "knn_metrics.json").read_text())
    assert (ddp["top1"], ddp["top5"]) == (single["top1"], single["top5"]) and ddp["num_val_images"] == 3
