"""Building the config tree (``sparserm.config``) from dicts, YAML and ``key.sub=value`` overrides, with pydantic.

Holds ``ConfigError``, ``build`` (a config dataclass from a mapping, strict types, errors naming the dotted key),
``to_dict``/``replace``, ``parse_override`` and ``load_config``; ``sparserm.config`` re-exports every one, so
``from sparserm.config import ...`` is the way in. The dataclasses live there and nowhere else: ``strict`` marks
them for pydantic, and ``load_config`` reads ``Config`` from there when it runs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import pydantic_core
import yaml

if TYPE_CHECKING:
    from sparserm.config import Config


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


_Loader = type("_Loader", (yaml.SafeLoader,), {})  # YAML 1.1 reads 5e-3 and 1.5e3 as strings; this one: floats
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))
# YAML 1.1 reads 010 as octal 8 and 1:30 as 90: with a leading zero or a colon a number stays text (pydantic then
# names the key that wants a number), put ahead of the int resolver so it is tried first
_Loader.add_implicit_resolver("tag:yaml.org,2002:str", re.compile(r"^[-+]?(?:0[0-9_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+)$"),
                              list("-+0123456789"))
for _first in "-+0123456789":
    _Loader.yaml_implicit_resolvers[_first].insert(0, _Loader.yaml_implicit_resolvers[_first].pop())
_adapter = functools.cache(pydantic.TypeAdapter)


def strict(namespace: dict[str, Any]) -> None:
    """Every dataclass of ``namespace`` (a module's globals) refuses unknown keys and loose types (a bool is no
    int); called by ``sparserm.config`` once its classes exist, before any ``build``."""
    for cls in [c for c in list(namespace.values()) if isinstance(c, type) and dataclasses.is_dataclass(c)]:
        cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid", strict=True)


def _section(tp: Any, lists: bool = True) -> dict[str, Any] | None:
    """Field types of the dataclass a ``tp`` holds: ``X``, ``X | None`` (``tuple[X, ...]`` if ``lists``); or None."""
    inner = [a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return typing.get_type_hints(inner[0]) if inner and (lists or typing.get_origin(tp) is not tuple) else None


def _message(cls: type, prefix: str, e: dict) -> str:
    """One pydantic error as text, its ``loc`` as our dotted key (``data.sources[0].path``)."""
    key = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])).lstrip(".")
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = functools.reduce(lambda f, p: f if isinstance(p, int) else _section(f.get(p)) or {}, e["loc"][:-1],
                                 _section(cls))
        return f"unknown config key {key} (known: {', '.join(sorted(known))})"
    got = "" if e["type"] == "missing" else f"={e['input']!r} ({type(e['input']).__name__})"
    return f"{key or cls.__name__}{got} is invalid: {e['msg']}"


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """``cls`` from a mapping (YAML, ``to_dict`` output), by pydantic's strict JSON rules: arrays to tuples, objects
    to dataclasses, an int is a float, absent keys at their defaults. ``prefix`` names ``values`` in errors."""
    try:
        return _adapter(cls).validate_json(pydantic_core.to_json(values, inf_nan_mode="constants"))
    except pydantic_core.PydanticSerializationError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: not a config value ({exc})") from None
    except pydantic.ValidationError as exc:
        raise ConfigError("; ".join(_message(cls, prefix, e) for e in exc.errors())) from None


to_dict = pydantic_core.to_jsonable_python  # config object -> plain dicts, lists and scalars; `build` reads them back
replace = dataclasses.replace


def _is_text(tp: Any) -> bool:
    """A field that holds a string: ``str`` or ``str | None``."""
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and set(typing.get_args(tp)) == {str, type(None)})


def _set_path(tree: dict, dotted: str, value: Any, raw: str | None = None) -> None:
    """Put ``value`` at ``a.b.c`` of a YAML tree; ``a.b`` must be config sections (pydantic checks the rest). Each
    mapping on the way is copied (YAML aliases share them); a None (an unset ``serve.autoscaling``) becomes one.
    A string field takes the override's ``raw`` text as it was typed (YAML would read ``run #2`` as ``run`` and
    a comment, ``a: b`` as a mapping), but for a quoted string (YAML's reading stands) and for ``null`` in one
    that may be unset."""
    from sparserm.config import Config

    *parents, last = dotted.split(".")
    node, fields = tree, _section(Config)
    for i, part in enumerate(parents):
        if (fields := _section(fields.get(part), lists=False)) is None:
            raise ConfigError(f"unknown config key {dotted}: {'.'.join(parents[:i + 1])} is not a config section")
        node[part] = node = dict(node[part]) if isinstance(node.get(part), dict) else {}
    tp, text = fields.get(last), None if raw is None else raw.strip()
    quoted = text is not None and text[:1] in ("'", '"')  # YAML's own quoting: its string stands
    if text is not None and _is_text(tp) and not quoted and not (tp is not str and text in _NULLS):
        value = text
    if isinstance(value, _Unparsed):
        raise ConfigError(f"override {dotted}: cannot parse value {raw!r}: {value.error}")
    node[last] = value


_NULLS = ("null", "Null", "NULL", "~")  # YAML's


@dataclasses.dataclass(frozen=True)
class _Unparsed:
    """A value YAML could not read: an error unless it goes to a string field, which takes the text as typed."""

    error: str


def parse_override(text: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        return key.strip(), (yaml.load(raw, Loader=_Loader) if raw else "")
    except yaml.YAMLError as exc:
        return key.strip(), _Unparsed(str(exc).replace("\n", " "))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config (e.g. one a manifest recorded) with ``key.sub=value`` overrides on top, validated."""
    from sparserm.config import Config

    tree = to_dict(cfg)
    for item in overrides:
        _set_path(tree, *parse_override(item), raw=item.partition("=")[2])
    return build(Config, tree).validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, validated; relative paths are from the current folder."""
    from sparserm.config import Config

    tree: Any = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.load(Path(path).read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        _set_path(tree, *parse_override(item), raw=item.partition("=")[2])
    return build(Config, tree).validate()
