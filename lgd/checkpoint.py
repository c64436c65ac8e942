"""The LGD checkpoint format, written atomically and read without unpickling arbitrary objects.

``checkpoint_last.pth`` (and ``checkpoint_epXXXX.pth``) is a dict of tensors and plain Python values:

=============  ==============================================================================
``format``     ``"lgd"``; ``version``: ``1``
``arch``       student architecture (a key of ``lgd.models.STUDENTS``); ``embed_dim``: teacher dim D
``epoch``      number of completed epochs; ``step``: optimizer steps taken
``model``      ``LGDStudent.state_dict()``: ``backbone.<torchvision names>`` + ``head.{0,2}.{weight,bias}``
``vsb``        ``VisualSemanticsBank.state_dict()`` (``bank`` [C, D], ``seen`` [C])
``tsb``        the TSB [C, D] used for training; ``classnames`` / ``templates``: the text it came from
``teacher``    the teacher as given to ``clip.load`` (official name or path)
``config``     the resolved run config (plain dict)
``optimizer``  / ``scaler`` / ``rng``: what ``--resume`` needs to continue bit-exactly
``metrics``    the latest evaluation (e.g. ``student_top1``), may be empty
=============  ==============================================================================
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from .errors import LGDError

FORMAT = "lgd"
VERSION = 1


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once complete: a temp file in the same folder, flushed
    to disk, then renamed over ``path`` (so neither a crash nor a reader ever sees half a file). The mode
    follows the umask, as a plain ``open`` would (``mkstemp`` alone gives 0600: unreadable to a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened for syncing everywhere (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text through :func:`atomic_file` (configs, manifests, metrics JSON)."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    """Indented JSON through :func:`atomic_file` (metrics, manifests, bench reports)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with one clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise LGDError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise LGDError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def resume_path(resume: str, out: Path, filename: str = "checkpoint_last.pth") -> Path | None:
    """The checkpoint ``--resume`` points at: ``''`` none, ``auto`` the run folder's own if it exists, else a path."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume)
    path = out / filename
    if path.is_file():
        return path
    from . import distributed

    if distributed.is_main():
        print(f"--resume auto: no {filename} in {out}, starting from scratch")
    return None


def is_lgd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an LGD training checkpoint (see the module docstring for its keys)."""
    ckpt = safe_load(path)
    if not is_lgd_checkpoint(ckpt):
        raise LGDError(f"{path} is not an LGD checkpoint (no format='lgd' key); was it written by lgd.train?")
    if ckpt.get("version", 0) > VERSION:
        raise LGDError(f"{path} has checkpoint version {ckpt['version']}; this lgd reads up to {VERSION}")
    return ckpt


def backbone_state_dict(ckpt_or_path: dict[str, Any] | str | os.PathLike) -> tuple[str | None, dict[str, torch.Tensor]]:
    """``(arch, state_dict)`` of the student backbone in torchvision key layout, without the MLP head.

    Accepts an LGD checkpoint (path or loaded dict) or a torchvision-style state_dict file (plain, or
    under ``state_dict``/``model``); ``arch`` is ``None`` when the file does not say.
    """
    obj = ckpt_or_path if isinstance(ckpt_or_path, dict) else safe_load(ckpt_or_path)
    if is_lgd_checkpoint(obj):
        prefix = "backbone."
        return obj["arch"], {k[len(prefix) :]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LGDError(f"{ckpt_or_path} holds neither an LGD checkpoint nor a state_dict of tensors")
    return None, dict(obj)
