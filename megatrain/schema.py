"""Typed YAML configuration, the generic part: read YAML, apply `key=value` overrides, and turn
nested dicts into dataclasses with every key and type checked.

Errors name the dotted key and, for a typo, the closest valid one. Fields are documented by the
string literal written under them (an "attribute docstring"), which `field_docs` reads back.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from megatrain.errors import MegatrainError


class ConfigError(MegatrainError):
    """A configuration value is missing, mistyped or inconsistent; the message names the key."""


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the path of a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


# ----------------------------------------------------------------------------- overrides


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (`1e-3`, `[1, 2]`,
    `true`)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        index = int(last) if last.isdigit() else -1
        if index == len(node):
            node.append(value)
        else:
            node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override '{key}': '{part}' should be a list index")
    index = int(part)
    if index == len(node):  # `data.sources.0.path=X` on an empty list creates the entry
        node.append({})
    if index >= len(node):
        raise ConfigError(
            f"override '{key}': index {index} is past the end of a list of {len(node)}"
        )
    return index


# ----------------------------------------------------------------------------- valid ranges


@dataclass(frozen=True)
class Range:
    """The valid values of a number: from `lo` to `hi` (None: unbounded), each end included
    unless `lo_open` / `hi_open`. Always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{lo}, {self.hi:g}{')' if self.hi_open else ']'}"


def check_ranges(obj: Any, ranges: dict[type, dict[str, Range]], where: str = "") -> None:
    """Check every number in a tree of dataclasses: finite, and inside its range when `ranges`
    (by dataclass, then field name) gives one. The error names the dotted key, value and range."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, ranges, key)
        elif isinstance(value, (list, dict)):
            for k, v in value.items() if isinstance(value, dict) else enumerate(value):
                if dataclasses.is_dataclass(v):
                    check_ranges(v, ranges, f"{key}.{k}")
                elif isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"'{key}.{k}' = {v!r}: must be a finite number")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            valid = ranges.get(type(obj), {}).get(f.name)
            if not math.isfinite(value) or (valid is not None and value not in valid):
                what = "a finite number" if isinstance(value, float) else ""
                must = " ".join(w for w in (what, str(valid or "")) if w)
                raise ConfigError(f"'{key}' = {value!r}: must be {must}")


# ----------------------------------------------------------------------------- dict -> dataclasses


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking every key and type; errors name the dotted
    key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{where or 'config'}' should be a mapping of {cls.__name__} fields, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'{where}' = {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' should be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' should be a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' should be true or false, got {value!r}")
    if tp in (int, float):
        # YAML 1.1 reads `6e-4` as a string and `1e9` too: accept numeric strings.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"'{where}' should be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' should be a number, got {value!r}")
        if tp is int:
            if float(value) != int(value):
                raise ConfigError(f"'{where}' should be a whole number, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"'{where}' should be a string, got {value!r}")
        return str(value)
    return value
