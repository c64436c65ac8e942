"""OpenMMLab's real model code in the tests: the test extra installs ``mmcv-lite`` (mmcv without compiled ops,
the only mmcv with wheels), but ``mmdet`` and ``mmseg`` import ``mmcv.ops`` when their model packages load.
The backbones under test never call a compiled op, so a stand-in ``mmcv._ext`` whose functions raise if
called lets the real packages import; with a full mmcv installed, nothing is replaced."""
from __future__ import annotations

import importlib
import sys
import types

import pytest


def _compiled_op(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a compiled mmcv op was called: these tests only build backbones, which use none")


def _op(name: str):
    if name.startswith("__"):  # module attributes (__file__, __path__, ...) stay absent
        raise AttributeError(name)
    return _compiled_op


def install_ops_stand_in() -> None:
    """Register the stand-in ``mmcv._ext`` unless a compiled one imports."""
    try:
        importlib.import_module("mmcv._ext")
    except ImportError:
        ext = types.ModuleType("mmcv._ext")
        ext.__getattr__ = _op  # type: ignore[method-assign]
        sys.modules["mmcv._ext"] = ext


def import_openmmlab_models(layout: str) -> None:
    """Import ``layout``'s model code (``mmdet.models`` / ``mmseg.models``) with the stand-in, or skip saying why."""
    install_ops_stand_in()
    try:
        importlib.import_module(f"{layout}.models")
    except Exception as err:  # ImportError, or a version assert of the package
        pytest.skip(f"{layout} is not importable ({type(err).__name__}: {err})")
