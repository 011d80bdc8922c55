"""Recipes: one flat-ish yaml file -> typed, nested dataclasses.

A recipe is read into a dataclass tree (`from_dict`), overridden from the command line with
`section.key=value` strings (`apply_overrides`), and saved beside every output (`save_recipe`).
An unknown key is an error that lists the valid ones. No inheritance, no registries: what the yaml
says is what runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_text

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str, source: str | None) -> Any:
    """Check and convert one value to the annotated type."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{where} must not be null", path=source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{where} must be a mapping", path=source)
        return from_dict(tp, value, source=source, prefix=where + ".")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, got {value!r}", path=source)
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise InputError(f"{where} must be one of {list(allowed)}, got {value!r}", path=source)
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where} must be true or false, got {value!r}", path=source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{where} must be a number, got {value!r}", path=source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{where} must be an integer, got {value!r}", path=source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise InputError(f"{where} must be a string, got {value!r}", path=source)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise InputError(f"{where} has unsupported value {value!r}", path=source)


def from_dict(cls: type[T], data: dict, *, source: str | Path | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors listing the valid ones."""
    source = None if source is None else str(source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(
            f"unknown key {prefix}{unknown[0]}; valid keys: {', '.join(prefix + k for k in fields)}",
            path=source,
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a recipe of type `cls` accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def apply_overrides(recipe: T, overrides: list[str]) -> T:
    """Apply `a.b.c=value` overrides (values parsed as yaml) and re-validate the whole recipe."""
    data = to_dict(recipe)
    valid = all_keys(type(recipe))
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise InputError(f"unknown key {key}; valid keys: {', '.join(valid)}", record="override")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InputError(f"cannot parse value {raw!r} ({exc})", record=f"override {key}") from exc
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return from_dict(type(recipe), data, source="command line")


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    path = Path(path)
    if not path.is_file():
        raise InputError("recipe not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"malformed yaml ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise InputError("a recipe must be a mapping of sections", path=path)
    recipe = from_dict(cls, data, source=path)
    return apply_overrides(recipe, overrides or [])


def save_recipe(recipe: Any, path: str | Path) -> None:
    """Write the resolved recipe (after overrides) beside an output."""
    atomic_write_text(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
