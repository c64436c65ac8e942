#!/usr/bin/env python
"""Caltech-256 -> DST/train/<class>/ (PER_CLASS images per class, seeded) and DST/val/<class>/ (the rest).

SRC is the folder of class folders (001.ak47/ ...) or its parent holding 256_ObjectCategories/. The tree is
made of symbolic links (--copy to copy); re-running keeps correct entries and refuses to overwrite others
unless --force (which removes links and the tool's own unchanged copies, never a file it did not make
unless identical to its source). Class folders keep their numbered names, so
ImageFolder's class order is Caltech's and matches tools/get-caltech-classnames.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lgd.datasets_prep import make_caltech_trainval  # noqa: E402
from lgd.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Caltech-256 folder (256_ObjectCategories or its parent)")
    parser.add_argument("dst", help="output folder (gets train/ and val/)")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class draw (default 0)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--force", action="store_true", help="replace conflicting files/links, remove stale ones")
    args = parser.parse_args(argv)
    print(make_caltech_trainval(args.src, args.dst, args.per_class, args.seed, args.copy, args.force))


if __name__ == "__main__":
    main()
