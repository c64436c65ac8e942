"""Experiment configs: a dataclass of defaults, a YAML file over it, command-line flags over both.

Every field of a config dataclass becomes a flag (``batch_size`` -> ``--batch-size`` or ``--batch_size``),
so any key of a YAML file in ``configs/`` can be overridden on the command line without extra code.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .checkpoint import atomic_write_text
from .errors import LGDError

C = TypeVar("C")


def opt(help_text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata for a config key: its ``--help`` text, plus e.g. ``choices``."""
    return {"help": help_text, **extra}


def _field_type(cls: type, field: dataclasses.Field) -> type:
    """The concrete scalar type of a field, with ``X | None`` unwrapped."""
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, bool) and kind is not bool:  # bool is an int subclass: `epochs: true` is a mistake
        hint = " (YAML reads unquoted off/on/no/yes as booleans: quote it, e.g. 'off')" if kind is str else ""
        raise LGDError(f"config key {key!r} expects {kind.__name__}, got {value!r}{hint}")
    if value is None or isinstance(value, kind):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `3e-2` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise LGDError(f"config key {key!r} expects {kind.__name__}, got {value!r}")


def load_yaml(path: str | os.PathLike, cls: type[C]) -> dict[str, Any]:
    """Read a YAML config and check its keys and value types against ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise LGDError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise LGDError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LGDError(f"{path}: unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
    return {k: _coerce(v, _field_type(cls, fields[k]), k) for k, v in data.items()}


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str = "") -> C:
    """Defaults of ``cls`` < ``--config FILE`` < explicit flags. ``argv`` defaults to ``sys.argv[1:]``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    overrides = load_yaml(known.config, cls) if known.config else {}

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of config keys (flags override it)")
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        default = overrides.get(field.name, field.default)
        names = sorted({f"--{field.name.replace('_', '-')}", f"--{field.name}"})
        help_text = field.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*names, dest=field.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = field.metadata.get("choices")
            parser.add_argument(*names, dest=field.name, type=kind, default=default, choices=choices, help=help_text)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    for field in dataclasses.fields(cls):  # argparse checks choices of flags only, not of YAML-given defaults
        choices = field.metadata.get("choices")
        if choices is not None and args[field.name] not in choices:
            raise LGDError(f"config key {field.name!r} must be one of {list(choices)}, got {args[field.name]!r}")
    return cls(**args)


def save_config(cfg: object, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML next to the run's outputs (what was really run)."""
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
