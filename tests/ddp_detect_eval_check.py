"""Score a detector that answers with the ground truth through ``lgd.transfer.detect``'s evaluation (helper of
tests/test_transfer.py).

Under ``torchrun`` each rank scores its share of the val images and rank 0 gathers the detections; the perfect
answers reach AP 100 only if every image is scored exactly once (a lost image loses recall, a duplicated one adds
false positives). Rank 0 writes ``OUT/metrics.json``. Usage: ddp_detect_eval_check.py DATA OUT
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from lgd import distributed as du
from lgd.transfer import detect


def pixels_key(image: torch.Tensor) -> str:
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()


class GroundTruthDetector(nn.Module):
    """Answers each val image (found by its pixels) with its own annotations from the COCO file, at score 1."""

    def __init__(self, val_set: detect.CocoInstances) -> None:
        super().__init__()
        self.val_set, self.coco_mask = val_set, detect._pycocotools_mask()
        self.image_ids = {pixels_key(image): target["image_id"] for image, target in (val_set[i] for i in range(len(val_set)))}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            height, width = image.shape[-2:]
            anns = self.val_set.anns[self.image_ids[pixels_key(image)]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
            masks = [torch.from_numpy(self.val_set._mask(a, height, width, self.coco_mask)) for a in anns]
            outputs.append({"boxes": boxes, "labels": torch.tensor([self.val_set.label_of[a["category_id"]] for a in anns]),
                            "scores": torch.ones(len(anns)), "masks": torch.stack(masks)[:, None].float()})
        return outputs


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    du.init_distributed("cpu")
    cfg = detect.DetectConfig(data=str(data), workers=0, val_batch_size=1)
    val_set = detect.CocoInstances(data / cfg.val_ann, data / cfg.val_images, train=False, masks=False)
    metrics = detect.make_evaluate(cfg, val_set)(GroundTruthDetector(val_set), torch.device("cpu"), None)
    if du.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({**metrics, "world_size": du.world_size(),
                                                      "images": len(val_set)}))
    du.cleanup()


if __name__ == "__main__":
    main()
