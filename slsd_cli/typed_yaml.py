"""Typed yaml: one yaml file -> nested dataclasses, checked before any work is done.

A recipe is read into a dataclass tree (`from_dict`), changed from the command line by
`section.key=value` strings (`apply_overrides`) or by typed flag values (`apply_flags`), and saved
beside every output (`save_recipe`). No inheritance, no registries: what the yaml says is what runs.

Checks, all raising `InputError` (one line, exit 2):
- types: every value must match its annotation; a float field also takes yaml 1.1's `1e-4`
  (read as a string by yaml 1.1) and refuses inf / NaN;
- ranges: a field declared with `ranged(default, "[0, 1]")` (interval notation: `[`/`]` closed,
  `(`/`)` open, `inf` for no bound) is checked on every load; for a list field each item is checked;
- invariants between fields: a dataclass may define `check(self)` that raises `ValueError("field
  message")`; the message is reported under the dataclass's dotted prefix;
- unknown keys name the nearest valid keys (difflib), never the whole list;
- limits before anything is built: anchors and aliases are refused (a "billion laughs" file
  would expand exponentially), so are duplicate keys (the last one would silently win) and
  integers beyond 64 bits (checked on the digits, before python converts a 5000-digit number).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_text

T = TypeVar("T")

RANGE_KEY = "range"
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same results, faster
INT64 = (-2 ** 63, 2 ** 63 - 1)


class _RecipeError(yaml.MarkedYAMLError):
    """A recipe rule broken while the yaml is read (reported with its line and column)."""


class _Limits:
    """yaml's safe loader with the recipe limits: no duplicate keys, integers within 64 bits
    (anchors and aliases are refused before, by `_load`)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen:
                    raise _RecipeError(None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                                       key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):  # type: ignore[no-untyped-def]
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > 25:  # int64 has 19 digits (more in binary / octal spelling): refused before converting
            raise _RecipeError(None, None, f"integer of {digits} digits is beyond 64 bits", node.start_mark)
        value = super().construct_yaml_int(node)
        if not INT64[0] <= value <= INT64[1]:
            raise _RecipeError(None, None, f"integer {value} is beyond 64 bits", node.start_mark)
        return value


class _SafeLoader(_Limits, _BaseLoader):  # type: ignore[misc, valid-type]
    """Files: libyaml's parser when installed."""


class _TextLoader(_Limits, yaml.SafeLoader):
    """Override values: the pure-python parser (its error positions read better on one short value)."""


for _loader in (_SafeLoader, _TextLoader):
    _loader.add_constructor("tag:yaml.org,2002:int", _Limits.construct_yaml_int)


def _load(text: str, loader: type = _SafeLoader) -> Any:
    """Parse yaml text under the recipe limits. Anchors and aliases are refused on the event stream,
    before any node is composed (libyaml composes in C, where a loader cannot intercept them)."""
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RecipeError(None, None, "anchors and aliases (&name, *name) are not allowed in a recipe: "
                               "write each value out", event.start_mark)
    return yaml.load(text, Loader=loader)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A closed/open interval of allowed numbers, written as in maths: "[0, 1)", "(0, inf)"."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        body = text.strip()
        if len(body) < 5 or body[0] not in "[(" or body[-1] not in "])" or "," not in body:
            raise ValueError(f"interval {text!r} must look like '[0, 1)' or '(0, inf)'")
        low, high = (float(part) for part in body[1:-1].split(","))
        return cls(low, high, body[0] == "(", body[-1] == ")", body)

    def contains(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below


def ranged(default: Any = dataclasses.MISSING, interval: str = "(-inf, inf)", *,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers (or list items) must lie in `interval`, e.g.
    `lr: float = ranged(4e-5, "(0, inf)")`."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE_KEY: Interval.parse(interval)})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _number_from_text(value: str) -> float | None:
    """yaml 1.1 reads `1e-4` (no dot) as a string; a float field accepts it."""
    try:
        return float(value.strip())
    except ValueError:
        return None


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
            raise InputError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}",
                             path=source)
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where} must be true or false, got {value!r}", path=source)
    if tp is float:
        number = _number_from_text(value) if isinstance(value, str) else value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise InputError(f"{where} must be a finite number, got {value!r}", path=source)
            return float(number)
        raise InputError(f"{where} must be a number, got {value!r}", path=source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise InputError(f"{where} must fit in 64 bits, got an integer of {len(str(abs(value)))} digits",
                                 path=source)
            return value
        raise InputError(f"{where} must be an integer, got {value!r}", path=source)
    if tp is str:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str):
            return value
        raise InputError(f"{where} must be a string, got {value!r}", path=source)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise InputError(f"{where} has unsupported value {value!r}", path=source)


def _check_range(value: Any, interval: Interval, where: str, source: str | None) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_range(item, interval, f"{where}[{i}]", source)
        return
    if not interval.contains(value):
        raise InputError(f"{where} must lie in {interval.text}, got {value!r}", path=source)


def check(obj: Any, *, source: str | Path | None = None, prefix: str = "") -> None:
    """Every range and invariant of dataclass `obj` (not its nested dataclasses)."""
    source = None if source is None else str(source)
    for f in dataclasses.fields(obj):
        interval = f.metadata.get(RANGE_KEY)
        if interval is not None:
            _check_range(getattr(obj, f.name), interval, prefix + f.name, source)
    invariants = getattr(obj, "check", None)
    if callable(invariants):
        try:
            invariants()
        except ValueError as exc:
            raise InputError(f"{prefix}{exc}", path=source) from None


def nearest_keys(key: str, valid: list[str], n: int = 3) -> str:
    """'; did you mean a.b or a.c?' for a misspelt key, else the keys of its section (or the sections)."""
    close = difflib.get_close_matches(key, valid, n=n, cutoff=0.6)
    if not close:  # the leaf alone may be close to a key in another section (lr -> train.lr)
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75)]
    if close:
        return f"; did you mean {' or '.join(close)}?"
    section = key.split(".", 1)[0] + "."
    in_section = [k for k in valid if k.startswith(section)]
    if in_section and len(in_section) <= 12:
        return f"; keys in {section[:-1]}: {', '.join(in_section)}"
    sections = sorted({k.split(".", 1)[0] for k in valid if "." in k})
    return f"; sections: {', '.join(sections)} (see `slsd recipe show NAME`)" if sections else ""


def from_dict(cls: type[T], data: dict, *, source: str | Path | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking types, ranges and invariants."""
    source = None if source is None else str(source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            valid = [prefix + k for k in fields]
            raise InputError(f"unknown key {prefix}{key}{nearest_keys(prefix + str(key), valid)}", path=source)
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    obj = cls(**kwargs)
    check(obj, source=source, prefix=prefix)
    return obj


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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a yaml error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _set_values(recipe: T, values: Mapping[str, Any], source: str, record: str) -> T:
    """`recipe` with dotted keys set to python values, re-validated as a whole."""
    data = to_dict(recipe)
    valid = all_keys(type(recipe))
    for key, value in values.items():
        if key not in valid:
            raise InputError(f"unknown key {key}{nearest_keys(key, valid)}", path=source, record=record)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = str(value) if isinstance(value, Path) else value
    return from_dict(type(recipe), data, source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value parsed as yaml)."""
    if "=" not in item:
        raise InputError(f"override {item!r} must look like section.key=value", record="command line")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"override {item!r} has no key before '=' (expected section.key=value)",
                         record="command line")
    try:
        value = _load(raw, _TextLoader)
    except yaml.YAMLError as exc:
        shown = raw if len(raw) <= 60 else raw[:40] + f"... ({len(raw)} characters)"
        raise InputError(f"cannot parse value {shown!r}: {_yaml_problem(exc)}", record=f"override {key}") from None
    return key, value


def apply_overrides(recipe: T, overrides: list[str]) -> T:
    """Apply `a.b.c=value` overrides (values parsed as yaml) and re-validate the whole recipe."""
    values = dict(parse_override(item) for item in overrides)
    return _set_values(recipe, values, "command line", "override") if values else recipe


def apply_flags(recipe: T, flags: Mapping[str, Any]) -> T:
    """Set typed recipe fields from command-line flags (`{"smoothing.epsilon": 0.1}`); a None value
    means the flag was not given. Values are checked like the yaml (type, range), never re-parsed."""
    given = {key: value for key, value in flags.items() if value is not None}
    return _set_values(recipe, given, "command line", "flag") if given else recipe


def read_mapping(path: str | Path) -> dict:
    """A recipe file as a mapping; empty, binary or malformed files are refused with the position."""
    path = Path(path)
    if not path.is_file():
        raise InputError("recipe not found", path=path)
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise InputError("not a yaml text file (binary content)", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not a yaml text file (not utf-8 at byte {exc.start})", path=path) from None
    try:
        data = _load(text)
    except _RecipeError as exc:
        raise InputError(_yaml_problem(exc), path=path) from None
    except yaml.YAMLError as exc:
        raise InputError(f"malformed yaml at {_yaml_problem(exc)}", path=path) from None
    if data is None:
        raise InputError("empty recipe (an empty file would silently mean every default); "
                         "write the sections you use, e.g. from `slsd recipe show NAME`", path=path)
    if not isinstance(data, dict):
        raise InputError("a recipe must be a mapping of sections", path=path)
    return data


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    recipe = from_dict(cls, read_mapping(path), source=path)
    return apply_overrides(recipe, overrides or [])


def dump_recipe(recipe: Any) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def save_recipe(recipe: Any, path: str | Path) -> None:
    """Write the resolved recipe (after overrides) beside an output."""
    atomic_write_text(path, dump_recipe(recipe))
