"""Config dataclasses shared by the job commands: YAML gives defaults, CLI flags override, unknown keys are errors.

A config class is a dataclass whose fields carry their help text (`opt(default, "help")`) and which may define
`validate()` raising `CllmError`. `add_arguments(parser, Cls)` makes one `--field-name` flag per field, and
`resolve(Cls, args)` merges the class defaults, the YAML file given by `--config` and the flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from cllm.errors import CllmError


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its help text (and allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """`int | None` -> (int, True); `list[str]` -> (list, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin is not None:
        return origin, False
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML defaults (flags override them)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif tp is list:
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, type=tp if tp in (int, float) else str, **kwargs)


def _check_type(cls, name: str, value, where: str):
    hints = typing.get_type_hints(cls)
    tp, optional = _base_type(hints[name])
    if value is None:
        if optional:
            return None
        raise CllmError(f"{where}: '{name}' must not be null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise CllmError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}")
    if tp in (str, float, list, dict) and not isinstance(value, tp):
        raise CllmError(f"{where}: '{name}' must be {tp.__name__}, got {value!r}")
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("choices")
    if choices and value not in choices:
        raise CllmError(f"{where}: '{name}' must be one of {list(choices)}, got {value!r}")
    return value


def read_yaml(cls, path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CllmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CllmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CllmError(f"{path}: expected a mapping of keys to values")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise CllmError(f"{path}: unknown key '{key}' (known keys: {', '.join(sorted(known))})")
    return {k: _check_type(cls, k, v, str(path)) for k, v in data.items()}


def resolve(cls, args: argparse.Namespace | dict | None = None, config_path: str | None = None):
    """Build `cls` from its defaults, then the YAML file, then explicitly given flags; then validate."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    config_path = given.pop("config", None) or config_path
    values = read_yaml(cls, config_path) if config_path else {}
    known = {f.name for f in dataclasses.fields(cls)}
    for k, v in given.items():
        if k not in known:
            raise CllmError(f"unknown option '{k}'")
        values[k] = _check_type(cls, k, v, f"--{k.replace('_', '-')}")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
