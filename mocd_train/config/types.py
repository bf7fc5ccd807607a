"""Config values against their dataclass annotations: type checks with one-line errors, help text, the range checks
the stage configs share, and `--help`. Knows nothing of the stages themselves."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from mocd_train.errors import ConfigError


def doc(text: str, group: str | None = None) -> dict[str, Any]:
    """A field's metadata: its help line and, optionally, the `--help` group it is listed under."""
    return {"help": text, **({"group": group} if group else {})}


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own message names the problem better
            raise errors[0]
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {type_name(tp)}.{hint}")
    if origin is list or tp is list:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}. Write it as [a, b] in YAML or on the command "
                              "line.")
        (item_tp,) = args or (Any,)
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}. Quote it in YAML.")
    raise ConfigError(f"{key}: unsupported type {type_name(tp)}")


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"unknown key {key!r} in {where}.{hint}")


def fraction(cfg: Any, key: str) -> None:
    if not 0.0 < getattr(cfg, key) < 1.0:
        raise ConfigError(f"{key}: {getattr(cfg, key)} must lie strictly between 0 and 1.")


def positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {getattr(cfg, key)}.")


def describe(cls: type) -> str:
    """`--help`: every key with its type, default and help, grouped by the fields' `group` (first-seen order)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        groups.setdefault(f.metadata.get("group", "keys"), []).extend(
            [f"  --{f.name} ({type_name(hints[f.name])}, default {default!r})", f"      {f.metadata.get('help', '')}"])
    lines = [f"{cls.__name__}: {cls.__doc__.strip()}", "",
             "--key value on the command line, or key: value in the YAML recipe."]
    for group, rows in groups.items():
        lines += ["", f"{group}:", *rows]
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
