"""Run four real ``lgd_step``s and dump the VSB after each (helper of tests/test_train.py).

Under ``torchrun --nproc_per_node 2`` each rank takes its half of a fixed global batch of 16 images and
writes ``OUT/rank{r}/stepN.pt``; run as a plain script it takes the whole global batch and writes
``OUT/stepN.pt``. Usage: ddp_vsb_check.py TEACHER DATA OUT
"""
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import clip
from lgd import distributed as du
from lgd.banks import VisualSemanticsBank, build_tsb, class_text
from lgd.data import SeededImageFolder, image_folder, moco_v2_transform
from lgd.models import build_student
from lgd.train import FrozenTeacher, State, TrainConfig, lgd_step

GLOBAL_BATCH, STEPS = 16, 4


def main() -> None:
    teacher_path, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    device = du.init_distributed("cpu")
    target = out / f"rank{du.rank()}" if du.is_dist() else out
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip_model, _ = clip.load(teacher_path)
    classnames, templates = class_text(str(data / "train"), "simple")
    tsb = build_tsb(clip_model, classnames, templates)
    teacher = FrozenTeacher(clip_model.visual, torch.float32)
    student = build_student("resnet18", tsb.shape[1])
    vsb = VisualSemanticsBank(len(classnames), tsb.shape[1], momentum=0.9)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    state = State(student, vsb, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    model = DistributedDataParallel(student) if du.is_dist() else student
    dataset = SeededImageFolder(image_folder(data / "train"), moco_v2_transform(32), seed=0)
    local = GLOBAL_BATCH // du.world_size()
    for step in range(STEPS):
        first = step * GLOBAL_BATCH + du.rank() * local
        images = torch.stack([dataset[(i, 0)][0] for i in range(first, first + local)])
        lgd_step(images, state, model, teacher, tsb.to(device), TrainConfig(), None)
        torch.save({"bank": vsb.bank.clone(), "seen": vsb.seen.clone()}, target / f"step{step}.pt")
    du.cleanup()


if __name__ == "__main__":
    main()
