"""One exception type for bad user input, so entry points can print one clear line instead of a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class LGDError(Exception):
    """A problem with the user's input or environment (not a bug): printed as ``error: <message>``."""


class UnreadableImage(LGDError, OSError):
    """An image of an evaluation split that cannot be decoded (an ``OSError`` too, for code that skips them)."""


def _message(err: BaseException) -> str:
    """The user-facing message; an error re-raised from a DataLoader worker carries the worker's whole
    traceback, whose last line is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def cli_entry(main: F) -> F:
    """Wrap a ``main()`` so that user errors end the process with their message and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            # clip's load errors count as user errors too, without making every tool import clip.
            clip_module = sys.modules.get("clip")
            user_errors = (LGDError, getattr(clip_module, "CLIPLoadError", LGDError))
            if not isinstance(err, user_errors):
                raise
            print(f"error: {_message(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
