"""Config dataclasses shared by the job commands: YAML gives defaults, CLI flags override, unknown keys are errors.

A config class is a dataclass whose fields carry their help text (`opt(default, "help")`) and which may define
`validate()` raising `CllmError`. `add_arguments(parser, Cls)` makes one `--field-name` flag per field, and
`resolve(Cls, args)` merges the class defaults, the YAML file given by `--config` and the flags actually given.

A class may forward another library's options instead of re-declaring them: `pass_through()` returns the name of
its dict field and the dataclass whose fields it accepts (TrainConfig: `trainer`, transformers' TrainingArguments).
A key the class does not declare then goes into that dict if it is a field there, and is an error otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from cllm.errors import CllmError


def opt(default, help: str, choices: tuple | None = None, pass_through: bool = False, flag: bool = True):
    """A config field with its help text (and allowed values); `pass_through` marks the dict that collects another
    library's options (see the module doc); `flag=False`: set by code, no CLI flag or YAML key."""
    meta = {"help": help, "choices": choices, "pass_through": pass_through, "flag": flag}
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
    skip = _pass_through_field(cls)
    if skip and hasattr(cls, "add_pass_through_arguments"):  # the other options' own flags
        cls.add_pass_through_arguments(parser)
    for f in dataclasses.fields(cls):
        if f.name == skip:  # its keys come as the other library's own flags (see `pass_through_flags`)
            continue
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


def _pass_through_field(cls) -> str | None:
    """The name of the dict field that collects passed-through options, without importing their library."""
    fields = [f.name for f in dataclasses.fields(cls) if f.metadata.get("pass_through")]
    return fields[0] if fields else None


def pass_through_flags(cls, argv: list[str]) -> dict:
    """Flags the class does not declare, parsed by the other library's own parser (transformers' `HfArgumentParser`
    for TrainingArguments: its types, its booleans, `--name` or `--name_with_underscores`); only the flags given are
    returned. A flag it does not know either is an error naming it."""
    from transformers import HfArgumentParser

    _, target = cls.pass_through()
    parser = HfArgumentParser(target, add_help=False, exit_on_error=False)
    for action in parser._actions:  # a flag not given stays out of the namespace (our defaults differ from theirs)
        action.default = argparse.SUPPRESS
    try:
        ns, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise CllmError(str(e)) from None
    if unknown:
        raise CllmError(f"unrecognized arguments: {' '.join(unknown)} (neither an option of this command nor a "
                        f"{target.__name__} field)")
    return vars(ns)


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


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML or another shape is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CllmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CllmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CllmError(f"{path}: expected a mapping of keys to values")
    return data


def read_yaml(cls, path: str | Path) -> dict:
    data = read_yaml_mapping(path)
    own, forwarded = _split_keys(cls, data, str(path))
    values = {k: _check_type(cls, k, v, str(path)) for k, v in own.items()}
    if forwarded:
        values[cls.pass_through()[0]] = _check_forwarded(cls, forwarded, str(path))
    return values


def _check_forwarded(cls, forwarded: dict, where: str) -> dict:
    """Type-check passed-through values where the class declares their flags itself (the decoding options);
    another library's (TrainingArguments) are checked by that library."""
    if not hasattr(cls, "add_pass_through_arguments"):
        return forwarded
    target = cls.pass_through()[1]
    return {k: _check_type(target, k, v, where) for k, v in forwarded.items()}


def _split_keys(cls, data: dict, where: str) -> tuple[dict, dict]:
    """(the class's own keys, the keys it passes through), the passed-through dict merged with them; an unknown key
    is an error naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    target = cls.pass_through() if hasattr(cls, "pass_through") else None
    accepted = {f.name for f in dataclasses.fields(target[1])} if target else set()
    own, forwarded = {}, {}
    for key, value in data.items():
        if target and key == target[0]:
            if not isinstance(value, dict):
                raise CllmError(f"{where}: '{key}' must be a mapping of {target[1].__name__} fields")
            for k in value:
                if k not in accepted:
                    raise CllmError(f"{where}: '{key}.{k}' is not a {target[1].__name__} field")
            forwarded.update(value)
        elif key in known:
            own[key] = value
        elif key in accepted:
            forwarded[key] = value
        else:
            also = f" or a {target[1].__name__} field" if target else ""
            raise CllmError(f"{where}: unknown key '{key}' (known keys: {', '.join(sorted(known))}{also})")
    return own, forwarded


def resolve(cls, args: argparse.Namespace | dict | None = None, config_path: str | None = None):
    """Build `cls` from its defaults, then the YAML file, then explicitly given flags; then validate."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    config_path = given.pop("config", None) or config_path
    values = read_yaml(cls, config_path) if config_path else {}
    own, forwarded = _split_keys(cls, given, "options")
    for k, v in own.items():
        values[k] = _check_type(cls, k, v, f"--{k.replace('_', '-')}")
    if forwarded:  # flags override the YAML's passed-through keys one by one, not as a whole mapping
        field = cls.pass_through()[0]
        values[field] = {**values.get(field, {}), **_check_forwarded(cls, forwarded, "options")}
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
