#!/usr/bin/env python
"""k-shot ImageNet: SHOTS training images per class from SRC/train/<wnid>/ into DST/train/, plus DST/val/.

Classes: all of them by default; with --classes N < all, N classes are drawn uniformly with the seed (not
the first N wnids, which are nearly all animals). Images per class are drawn with the same seed. Val: with
all classes DST/val links the whole SRC/val; otherwise each chosen SRC/val/<wnid>/ is linked (or copied),
which needs the validation images sorted into class folders. --shots 13 / 128 give about 1 % / 10 % of the
labels; these are seeded draws, not the fixed 1 %/10 % image lists of the semi-supervised literature.

Symbolic links by default (--copy to copy); re-running keeps correct entries and refuses to overwrite
others unless --force (which removes links and the tool's own unchanged copies, never a file it did not make
unless identical to its source).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lgd.datasets_prep import make_imagenet_subset  # noqa: E402
from lgd.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ImageNet root holding train/<wnid>/ and val/")
    parser.add_argument("dst", help="output folder (gets train/ and val/)")
    parser.add_argument("--shots", type=int, default=128, help="training images per class (default 128)")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class and image draws (default 0)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--force", action="store_true", help="replace conflicting files/links, remove stale ones")
    args = parser.parse_args(argv)
    print(make_imagenet_subset(args.src, args.dst, args.shots, args.classes, args.seed, args.copy, args.force))


if __name__ == "__main__":
    main()
