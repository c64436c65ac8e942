#!/usr/bin/env python
"""torchvision MobileNetV2 backbone (state_dict or LGD checkpoint) -> mmdet layout.

Target: the MMDetection 3.x MobileNetV2 (``expand_conv``/``depthwise_conv``/``linear_conv`` blocks, with ``conv2``).
Writes {"state_dict": ..., "meta": {"source", "arch", "layout", "dropped"}} and re-checks it with
``python -m lgd.convert check --layout mmdet --arch mobilenet_v2``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lgd.convert import add_to_mm_args, run_to_mm  # noqa: E402
from lgd.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_to_mm_args(parser, layout="mmdet")
    run_to_mm(parser.parse_args(argv))


if __name__ == "__main__":
    main()
