#!/usr/bin/env python
"""LGD checkpoint -> torchvision state_dict of the student backbone (MLP head and classifier dropped).

The written file is read back and loaded into ``torchvision.models.get_model(arch)``; the tool fails unless
only the classifier (``fc.*`` / ``classifier.*``) is missing and nothing is unexpected.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lgd.convert import add_to_torchvision_args, run_to_torchvision  # noqa: E402
from lgd.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_to_torchvision_args(parser)
    run_to_torchvision(parser.parse_args(argv))


if __name__ == "__main__":
    main()
