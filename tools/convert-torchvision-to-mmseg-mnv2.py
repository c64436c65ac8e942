#!/usr/bin/env python
"""torchvision MobileNetV2 backbone (state_dict or LGD checkpoint) -> mmseg layout.

Target: the MMSegmentation 1.x MobileNetV2 (``conv.0/1/2`` blocks; no ``conv2``: the final 1x1 conv is dropped).
Writes {"state_dict": ..., "meta": {"source", "arch", "layout", "dropped"}} and re-checks it with
``python -m lgd.convert check --layout mmseg --arch mobilenet_v2``.
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
    add_to_mm_args(parser, layout="mmseg")
    run_to_mm(parser.parse_args(argv))


if __name__ == "__main__":
    main()
