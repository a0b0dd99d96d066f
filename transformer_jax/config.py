"""Typed configs: frozen dataclasses with validation, dotted overrides and JSON round-trip.

Every config in the library (model, mesh, optimizer, data, checkpoint, experiment) is a
`Config` subclass. Errors are `ConfigError`, one line naming the setting and the fix:

    >>> cfg.override("model.d_modle", "512")
    ConfigError: unknown key 'model.d_modle'; valid keys of model: d_model, num_heads, ...
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A bad setting. The message is one line: which setting, what is wrong, what to do."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are `@dataclasses.dataclass(frozen=True)` and may define
    `validate(self)`, raising `ConfigError`; it runs on construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(type(self).__name__, f.name, getattr(self, f.name), _hints(type(self))[f.name])
        self.validate()

    def validate(self) -> None:
        pass

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], *, where: str = "") -> C:
        """Builds from plain data (e.g. parsed JSON), recursing into nested configs."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(d).__name__}")
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for k, v in d.items():
            if k not in names:
                raise ConfigError(f"unknown key {_join(where, k)!r}; valid keys: {', '.join(names)}")
            kwargs[k] = _from_plain(hints[k], v, _join(where, k))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], s: str) -> C:
        return cls.from_dict(json.loads(s))

    def replace(self: C, **changes) -> C:
        names = [f.name for f in dataclasses.fields(self)]
        for k in changes:
            if k not in names:
                raise ConfigError(f"unknown key {k!r} for {type(self).__name__}; valid keys: {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def override(self: C, key: str, value: Any, *, _prefix: str = "") -> C:
        """Returns a copy with the dotted `key` set. A string `value` is parsed to the
        field's type ("true", "3", "1e-3", "none", JSON lists), as `--set key=value` gives."""
        head, _, rest = key.partition(".")
        full = _prefix + key
        names = [f.name for f in dataclasses.fields(self)]
        if head not in names:
            raise ConfigError(f"unknown key {full!r}; valid keys: {', '.join(names)}")
        current, hint = getattr(self, head), _hints(type(self))[head]
        if rest:
            if not isinstance(current, Config):
                raise ConfigError(f"{_prefix + head!r} is {_type_name(type(current))}, it has no key {rest!r}")
            return dataclasses.replace(self, **{head: current.override(rest, value, _prefix=f"{_prefix}{head}.")})
        if isinstance(value, str):
            value = _parse_string(hint, value, full)
        return dataclasses.replace(self, **{head: _from_plain(hint, value, full)})

    def apply_overrides(self: C, overrides: list[str]) -> C:
        """Applies `["a.b=1", "c=x"]` in order, then validates once (so settings that must
        agree, like data.task and task.task, can be changed together)."""
        plain = self.to_dict()
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"override {item!r} must look like key.path=value")
            _set_plain(type(self), plain, key.strip().split("."), value.strip(), "")
        return type(self).from_dict(plain)


# -- helpers ---------------------------------------------------------------------------

def _set_plain(cls, plain: dict, parts: list[str], text: str, prefix: str) -> None:
    """Sets plain[parts...] from the `--set` string `text`, parsed by the field's type."""
    head, rest = parts[0], parts[1:]
    names = [f.name for f in dataclasses.fields(cls)]
    if head not in names:
        raise ConfigError(f"unknown key {prefix + '.'.join(parts)!r}; valid keys: {', '.join(names)}")
    _, inner = _is_optional(_hints(cls)[head])
    if not rest:
        value = _parse_string(_hints(cls)[head], text, prefix + head)
        plain[head] = _to_plain(value) if not isinstance(value, tuple) else list(value)
        return
    if not (isinstance(inner, type) and issubclass(inner, Config)):
        raise ConfigError(f"{prefix + head!r} is {_type_name(inner)}, it has no key {'.'.join(rest)!r}")
    if plain.get(head) is None:
        plain[head] = inner().to_dict()
    _set_plain(inner, plain[head], rest, text, f"{prefix}{head}.")


def _join(where: str, k: str) -> str:
    return f"{where}.{k}" if where else k


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(hint) -> tuple[bool, Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)) and len(args) == 1:
            return True, args[0]
    return False, hint


def _type_name(hint) -> str:
    """`hint` with its article: "an int", "a float", "a ModelConfig"."""
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def _check_type(owner: str, name: str, value: Any, hint) -> None:
    optional, inner = _is_optional(hint)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{owner}.{name} must be {_type_name(inner)}, got None")
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        if value not in typing.get_args(inner):
            choices = ", ".join(repr(a) for a in typing.get_args(inner))
            raise ConfigError(f"{owner}.{name}={value!r} is not one of {choices}")
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{owner}.{name} must be a tuple, got {type(value).__name__}")
        return
    if inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(inner, type):
        ok = isinstance(value, inner)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{owner}.{name} must be {_type_name(inner)}, got {value!r} ({type(value).__name__})")


def _from_plain(hint, value, where: str):
    optional, inner = _is_optional(hint)
    if value is None:
        return None
    if isinstance(inner, type) and issubclass(inner, Config):
        if isinstance(value, inner):
            return value
        return inner.from_dict(value, where=where)
    if typing.get_origin(inner) is tuple and isinstance(value, list):
        args = typing.get_args(inner)
        if args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(_from_plain(a, v, where) for a, v in zip(args, value))
        elem = args[0] if args else Any
        return tuple(_from_plain(elem, v, where) for v in value)
    if typing.get_origin(inner) is tuple and isinstance(value, tuple):
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_string(hint, text: str, key: str):
    optional, inner = _is_optional(hint)
    low = text.lower()
    if optional and low in ("none", "null"):
        return None
    if inner is str or (typing.get_origin(inner) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(inner))):
        return text
    if inner is bool:
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={text!r} must be true or false")
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be an integer") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be a number") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{key}={text!r} could not be parsed as {_type_name(inner)}") from None


def _to_plain(v):
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_to_plain(x) for x in v]
    return v
