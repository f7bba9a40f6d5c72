"""Typed settings: dataclasses whose fields carry their help text.

A settings class is a dataclass whose fields are declared with ``option``; the
help given there is the documentation of the YAML key and the help of the
command-line flag. ``from_dict`` builds a (nested) settings object from plain
data and rejects unknown keys and wrong types with a message naming the key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from typing import Any

from marlkd.errors import UserError


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field with help text; mutable defaults are copied per object."""
    metadata = {"help": help}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs
        )
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def help_of(cls, name: str) -> str:
    return next(
        f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name
    )


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict | None, where: str = ""):
    """Build ``cls`` from ``data``, checking every key and type.

    Raises:
        UserError: for a key ``cls`` does not have or a value of the wrong type.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(f"unknown config key '{path}': known keys here are {known}")
        default = _default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A section given in part keeps the rest of this field's default,
            # which may differ from the section class's own defaults.
            value = _merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(hint, value, path: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"'{path}' has a wrong type")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{path}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{path}' must be a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise UserError(
                f"config key '{path}' is {value!r}: choose one of {choices}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"config key '{path}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(
                f"config key '{path}' must be a whole number, got {value!r}"
            )
        return value
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{path}' must be text, got {value!r}")
        return value
    return value


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()):
    """One ``--flag`` per scalar field of ``cls``, defaulting to None (unset)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar(hint)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif kind is not None:
            parser.add_argument(flag, dest=f.name, type=kind, help=help_text)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _scalar(hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar(rest[0]) if len(rest) == 1 else None
    if origin is typing.Literal:
        return str
    return hint if hint in (bool, int, float, str) else None
