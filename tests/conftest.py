"""Shared fixtures: the toy world and one full toy-world LGD run, built once per test session.

Set ``LGD_HOME`` to reuse a toy world across sessions (it is deterministic and versioned); by default a
fresh one is built in a temporary folder, as CI does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def lgd_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = os.environ.get("LGD_HOME") or str(tmp_path_factory.mktemp("lgd_home"))
    os.environ["LGD_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def toy_world(lgd_home: Path):
    """The built-in toy world (images, tiny CLIP teacher, class names, templates)."""
    from lgd.toyworld import ensure_toy_world

    return ensure_toy_world(lgd_home, verbose=False)


@pytest.fixture(scope="session")
def toy_run(toy_world, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One full run of ``configs/toyworld.yaml`` (what ``bash scripts/train.sh`` runs by default).

    Returns the run's ``train_metrics.json`` plus ``output`` (the run folder).
    """
    from lgd.train import main

    out = tmp_path_factory.mktemp("toy_run")
    main(["--config", str(REPO / "configs" / "toyworld.yaml"), "--output", str(out), "--resume", ""])
    metrics = json.loads((out / "train_metrics.json").read_text())
    return {**metrics, "output": out}
