#!/usr/bin/env python
"""Caltech-256 class names, one per line in ImageFolder order, for zero-shot and the text bank (--text OUT).

Names come from the folder names: 001.ak47 -> "ak47", 253.faces-easy-101 -> "faces easy" (number dropped,
"-101" suffix dropped, hyphens and underscores -> spaces). SRC may be the Caltech-256 folder, its parent, or
the train/ folder made by tools/make-caltech-trainval.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lgd.datasets_prep import write_caltech_classnames  # noqa: E402
from lgd.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Caltech-256 folder with 001.ak47/ ... (or its parent)")
    parser.add_argument("out", help="output text file, one class name per line")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it holds other names")
    args = parser.parse_args(argv)
    print(write_caltech_classnames(args.src, args.out, args.force))


if __name__ == "__main__":
    main()
