"""The training engine: the toy-world learning requirement, resume exactness, signals, DDP, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lgd import distributed as du
from lgd.checkpoint import load_checkpoint
from lgd.data import eval_transform, image_folder
from lgd.evaluate import embed_dataset, topk_accuracy, zero_shot_logits
from lgd.models import build_student
from lgd.train import FrozenTeacher, TrainConfig, amp_dtype, check_config, lr_at, main
from lgd.zscls import load_student

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mini_world(toy_world, tmp_path_factory) -> Path:
    """A small ImageFolder of toy-world links (8 train / 4 val images per class) for fast engine tests."""
    root = tmp_path_factory.mktemp("mini_world")
    for split, count in (("train", 8), ("val", 4)):
        for class_dir in sorted((toy_world.data / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    return root


def mini_args(toy_world, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--teacher", str(toy_world.teacher), "--text", str(toy_world.classnames),
        "--templates", str(toy_world.templates), "--image-size", "32", "--batch-size", "32", "--epochs", "2",
        "--warmup-epochs", "1", "--optimizer", "adamw", "--base-lr", "0.004", "--workers", "0",
        "--log-interval", "1", "--val-interval", "1", "--output", str(out), *extra,
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"vsb.{k}": v for k, v in ckpt["vsb"].items()}}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.slow
def test_toy_world_lgd_student_learns(toy_run, toy_world):
    """The built-in default: teacher >= 90 %, LGD student >= 75 % zero-shot, far above a random-init student."""
    assert toy_run["teacher_top1"] >= 90.0
    assert toy_run["student_top1"] >= 75.0
    ckpt = load_checkpoint(toy_run["output"] / "checkpoint_last.pth")
    val = image_folder(toy_world.data / "val")
    val.transform = eval_transform(32)
    torch.manual_seed(123)
    random_student = build_student(ckpt["arch"], ckpt["embed_dim"]).eval()
    feats, labels = embed_dataset(random_student, DataLoader(val, batch_size=200), torch.device("cpu"))
    random_top1 = topk_accuracy(zero_shot_logits(feats, ckpt["tsb"]), labels)[1]
    assert toy_run["student_top1"] >= random_top1 + 40.0
    out = toy_run["output"]
    assert (out / "config.yaml").is_file() and (out / "tb").is_dir()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"train", "val"}
    assert set(toy_run) >= {"teacher_top1", "student_top1", "epochs", "seconds", "checkpoint"}


def test_fp16_teacher_keeps_batchnorm_in_fp32(toy_world):
    """The GPU teacher under AMP runs as OpenAI runs CLIP: fp16 convolutions, fp32 BatchNorm statistics."""
    import clip

    visual = clip.load(str(toy_world.teacher))[0].visual
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = FrozenTeacher(visual, torch.float32)(images)
    teacher = FrozenTeacher(visual, torch.float16)
    assert teacher.visual.conv1.weight.dtype == torch.float16
    assert teacher.visual.bn1.running_var.dtype == teacher.visual.bn1.weight.dtype == torch.float32
    try:
        t = teacher(images)
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 is not supported on this CPU: {err}")
    assert t.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(t, reference).min() > 0.999


def test_resume_after_an_epoch_is_bit_identical(toy_world, mini_world, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    main(mini_args(toy_world, mini_world, full))
    main(mini_args(toy_world, mini_world, split, "--stop-after", "1"))
    assert load_checkpoint(split / "checkpoint_last.pth")["epoch"] == 1
    # What a crash half-way through epoch 2 leaves: records past the checkpoint, the last one torn.
    full_records = (full / "log.jsonl").read_text().splitlines()
    crashed = [line for line in full_records if json.loads(line)["step"] > 6][:3]
    with open(split / "log.jsonl", "a") as f:
        f.write("\n".join(crashed) + "\n" + crashed[-1][:20])
    main(mini_args(toy_world, mini_world, split, "--resume", "auto"))
    assert load_checkpoint(split / "checkpoint_last.pth")["epoch"] == 2
    assert_identical(final_weights(full), final_weights(split))
    # The log reads as one run: each step once, with the values of the uninterrupted run.
    split_records = (split / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]
    assert strip(split_records) == strip(full_records)
    assert (split / "log.dropped.jsonl").read_text().splitlines() == [*crashed, crashed[-1][:20]]  # kept aside


def test_resume_is_bit_identical_with_a_random_student_and_loader_workers(toy_world, mini_world, tmp_path):
    """EfficientNet's stochastic depth draws from the global RNG, so the loader must not: a resumed run makes its
    loader iterator anew where the uninterrupted run (persistent workers) does not."""
    full, split = tmp_path / "full", tmp_path / "split"
    extra = ("--arch", "efficientnet_b0", "--workers", "2", "--val-interval", "0")
    main(mini_args(toy_world, mini_world, full, *extra))
    main(mini_args(toy_world, mini_world, split, *extra, "--stop-after", "1"))
    main(mini_args(toy_world, mini_world, split, *extra, "--resume", "auto"))
    assert_identical(final_weights(full), final_weights(split))


def test_sigterm_mid_epoch_saves_and_resumes_exactly(toy_world, mini_world, tmp_path):
    """Pre-emption as torchrun and SLURM deliver it: SIGTERM to the whole process group, loader workers included."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    main(mini_args(toy_world, mini_world, reference, "--epochs", "3"))
    cmd = [sys.executable, "-m", "lgd.train", *mini_args(toy_world, mini_world, stopped, "--epochs", "3", "--workers", "2")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = stopped / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if any(r["type"] == "train" and r["step"] >= 8 for r in steps):  # mid-way through epoch 2
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    ckpt = load_checkpoint(stopped / "checkpoint_last.pth")
    assert 0 < ckpt["batch_in_epoch"] < 6 and ckpt["epoch"] == 1, (ckpt["epoch"], ckpt["batch_in_epoch"])
    main(mini_args(toy_world, mini_world, stopped, "--epochs", "3", "--resume", "auto"))
    assert_identical(final_weights(reference), final_weights(stopped))


def test_repeated_sigterm_still_saves_but_a_second_ctrl_c_quits():
    """Under SLURM a rank gets the scheduler's SIGTERM and torchrun's forwarded copy before it reaches the step
    where it saves: the copy must not kill it. Ctrl-C twice is the way out without saving."""
    script = (
        "import os, signal, sys, time\n"
        "from lgd.train import StopRequested\n"
        "stop = StopRequested()\n"
        "sig = getattr(signal, sys.argv[1])\n"
        "for _ in range(2):\n"
        "    os.kill(os.getpid(), sig)\n"
        "    time.sleep(0.2)  # the handler has run before the next signal comes\n"
        "print('alive', stop.signum, flush=True)\n"
    )
    term = subprocess.run([sys.executable, "-c", script, "SIGTERM"], cwd=REPO, capture_output=True, text=True)
    assert term.returncode == 0 and term.stdout.strip() == f"alive {int(signal.SIGTERM)}", term
    ctrl_c = subprocess.run([sys.executable, "-c", script, "SIGINT"], cwd=REPO, capture_output=True, text=True)
    assert ctrl_c.returncode != 0 and "alive" not in ctrl_c.stdout and "KeyboardInterrupt" in ctrl_c.stderr


def test_ranks_that_resumed_differently_are_stopped(tmp_path):
    """2 gloo processes: a rank that found no checkpoint (a node without the shared filesystem) and one that did
    both get a clear error naming what each restored; agreeing ranks go on."""
    script = tmp_path / "resume_check.py"
    script.write_text(
        "from lgd import distributed as du\n"
        "from lgd.errors import LGDError\n"
        "device = du.init_distributed('cpu')\n"
        "du.require_resumed_alike((3, 1, 40), 'run/checkpoint_last.pth', device)\n"
        "try:\n"
        "    du.require_resumed_alike((3, 1, 40) if du.rank() == 0 else (0, 0, 0), 'run/checkpoint_last.pth', device)\n"
        "except LGDError as err:\n"
        "    print(f'rank {du.rank()} refused: {err}', flush=True)\n"
        "du.cleanup()\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in (0, 1):
        assert f"rank {rank} refused: the ranks resumed from different states (rank 0: (3, 1, 40), rank 1: (0, 0, 0))" \
            in done.stdout


def test_two_process_gloo_run(toy_world, mini_world, tmp_path):
    """torchrun with 2 CPU processes: VSB identical on both ranks after every step and equal to one process
    over the same global batch; then a full engine run where only rank 0 writes."""
    dump = tmp_path / "vsb"
    script = REPO / "tests" / "ddp_vsb_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*run, str(script), str(toy_world.teacher), str(mini_world), str(dump)], check=True, cwd=REPO, env=env)
    subprocess.run([sys.executable, str(script), str(toy_world.teacher), str(mini_world), str(dump / "single")],
                   check=True, cwd=REPO, env=env)
    steps = sorted(p.name for p in (dump / "single").iterdir())
    assert len(steps) == 4
    for name in steps:
        rank0, rank1 = (torch.load(dump / f"rank{r}" / name, weights_only=True) for r in (0, 1))
        single = torch.load(dump / "single" / name, weights_only=True)
        assert torch.equal(rank0["bank"], rank1["bank"]) and torch.equal(rank0["seen"], rank1["seen"])
        torch.testing.assert_close(rank0["bank"], single["bank"], rtol=0, atol=1e-6)
        assert torch.equal(rank0["seen"], single["seen"])

    out = tmp_path / "ddp_run"
    cmd = [*run, "-m", "lgd.train", *mini_args(toy_world, mini_world, out, "--epochs", "1")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("== LGD run summary ==") == 1
    train_records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 7))  # 192 images / 32 per step, logged once
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pth", "config.yaml", "log.jsonl", "tb", "train_metrics.json"]
    # Each rank scored its share of val/ and the hits were summed: the result is the saved checkpoint's
    # zero-shot accuracy over the whole of val/, computed here in one process.
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    val = image_folder(mini_world / "val")
    val.transform = eval_transform(32)
    feats, labels = embed_dataset(load_student(ckpt, "ddp"), DataLoader(val, batch_size=64), torch.device("cpu"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["student_top1"] == pytest.approx(topk_accuracy(zero_shot_logits(feats, ckpt["tsb"]), labels)[1])


def test_lr_schedule():
    peak, total, warmup = 0.3, 100, 10
    assert lr_at(0, total, warmup, peak) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, total, warmup, peak) == pytest.approx(peak)
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)
    assert lr_at(55, total, warmup, peak) == pytest.approx(peak / 2)
    assert lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, total, warmup, peak) >= lr_at(s + 1, total, warmup, peak) for s in range(warmup, total))


def expect_user_error(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_bad_input_errors(toy_world, mini_world, tmp_path, capsys):
    expect_user_error(capsys, [], "no --data given")
    expect_user_error(capsys, mini_args(toy_world, tmp_path / "missing", tmp_path / "o1"), "image folder not found")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    expect_user_error(capsys, mini_args(toy_world, tmp_path / "empty", tmp_path / "o2"), "is not an ImageFolder")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, tmp_path / "o3"), "--text", "klingon"], "klingon")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, tmp_path / "o4"), "--teacher", "RN51"], "RN51")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, tmp_path / "o5"), "--batch-size", "1000"],
                      "fewer than one batch")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, tmp_path / "o7"), "--image-size", "48"],
                      "whose input resolution is 32px; pass --image-size 32")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, tmp_path / "o8"), "--val-interval", "-1"],
                      "val_interval must be >= 0")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "o1").exists()  # refused before writing anything
    with pytest.raises(SystemExit):
        main([*mini_args(toy_world, mini_world, tmp_path / "o6"), "--arch", "alexnet"])
    assert "invalid choice" in capsys.readouterr().err


def test_resume_from_another_arch_is_refused(toy_world, mini_world, tmp_path, capsys):
    out = tmp_path / "run"
    main(mini_args(toy_world, mini_world, out, "--stop-after", "1", "--val-interval", "0"))  # 0: only at the end
    assert "zero-shot top-1" not in capsys.readouterr().out
    saved_config = (out / "config.yaml").read_text()
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, out, "--resume", "auto"), "--arch", "mobilenet_v2"],
                      "holds a resnet18 student")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, out, "--resume", "auto"), "--optimizer", "sgd"],
                      "was trained with adamw, this run asks for sgd")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, out, "--resume", "auto"), "--epochs", "10"],
                      "was trained with epochs=2 (this run: 10)")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, out, "--resume", "auto"), "--alpha", "0.7"],
                      "alpha=0.5 (this run: 0.7)")
    assert (out / "config.yaml").read_text() == saved_config  # a refused start leaves the run's config alone
    reordered = tmp_path / "reordered.txt"  # same TSB shape, rows in another order: the VSB rows would lie
    reordered.write_text("\n".join(reversed(toy_world.classnames.read_text().split("\n")[:-1])) + "\n")
    expect_user_error(capsys, [*mini_args(toy_world, mini_world, out, "--resume", "auto"), "--text", str(reordered)],
                      "the TSB of")
    fewer = tmp_path / "fewer"  # the sampler's permutations would index another image list
    for class_dir in sorted((mini_world / "train").iterdir()):
        (fewer / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:7]:
            (fewer / "train" / class_dir.name / image.name).symlink_to(image.resolve())
    expect_user_error(capsys, mini_args(toy_world, fewer, out, "--resume", "auto"),
                      "was trained on 192 images of 24 classes, this run's train/ has 168 of 24")


def test_amp_auto_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda")
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype(TrainConfig(amp="auto"), cuda) == expected, capability
        assert amp_dtype(TrainConfig(amp="bf16"), cuda) == torch.bfloat16  # asked for by name: as asked
    assert amp_dtype(TrainConfig(amp="auto"), torch.device("cpu")) is None


def test_batch_must_divide_by_world_size(monkeypatch):
    monkeypatch.setattr(du, "world_size", lambda: 2)
    with pytest.raises(Exception, match="not divisible by the world size 2"):
        check_config(TrainConfig(batch_size=33))


def test_unreadable_images_are_skipped_and_counted(toy_world, mini_world, tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for class_dir in (mini_world / split).iterdir():
            (data / split / class_dir.name).mkdir(parents=True)
            for image in class_dir.iterdir():
                (data / split / class_dir.name / image.name).symlink_to(image.resolve())
    broken = sorted((data / "train").iterdir())[0] / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image"):  # the kNN bank leaves it out too
        main([*mini_args(toy_world, data, tmp_path / "ok"), "--epochs", "1", "--knn-interval", "1"])
    assert "kNN top-1" in capsys.readouterr().out
    for class_dir in list((data / "train").iterdir())[:6]:
        for i in range(3):
            (class_dir / f"broken{i}.png").write_bytes(b"")
    with pytest.warns(UserWarning):
        expect_user_error(capsys, [*mini_args(toy_world, data, tmp_path / "bad"), "--epochs", "1"], "unreadable images")


def test_launcher_picks_the_rendezvous(tmp_path):
    """scripts/train.sh: one node gets a free port (--standalone), several nodes must name node 0 and their rank,
    and arguments that choose a config or data replace the toy-world default."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("torchrun", "python"):
        (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        (fake / tool).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("DATA", "CONFIG", "OUTPUT", "NNODES", "NODE_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    base["PATH"] = f"{fake}{os.pathsep}{os.environ['PATH']}"

    def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), *args], env={**base, **env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    single = launch(NPROC="2", DATA="d")
    assert single.stdout.splitlines()[-1] == "torchrun --standalone --nproc_per_node 2 -m lgd.train --data d"
    pinned = launch(NPROC="2", DATA="d", MASTER_PORT="29555")
    assert "--master_port 29555" in pinned.stdout and "--standalone" not in pinned.stdout
    lost = launch(NPROC="8", NNODES="2", DATA="d")
    assert lost.returncode == 2 and "needs MASTER_ADDR" in lost.stderr and "torchrun" not in lost.stdout
    nodes = launch(NPROC="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", DATA="d")
    assert "--nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500" in nodes.stdout
    toy = launch(NPROC="1")
    assert toy.stdout.splitlines()[-1] == (f"python -m lgd.train --output {REPO / 'runs' / 'toyworld'} "
                                           f"--config {REPO / 'configs' / 'toyworld.yaml'}")
    assert launch("--config", "mine.yaml", NPROC="1").stdout.splitlines()[-1] == "python -m lgd.train --config mine.yaml"
