"""Config files <-> dataclasses: one parser for the architecture JSON and the training YAML.

``from_mapping(cls, data)`` builds the dataclass ``cls`` from a mapping, checking each value
against its field's type hint (nested dataclasses, ``X | None``, ``list[T]``, fixed
``tuple[...]``, ``dict[K, V]``, ``int``/``float``/``bool``/``str``, ``Any``) and converting
containers (lists become tuples where the field is a tuple). An unknown key, a wrong type or a
value the dataclass refuses raises :class:`~emclip.errors.ConfigError` naming the dotted key,
e.g. ``'em.num_bases' must be an integer, got 'many'``. ``to_plain`` is the way back to JSON-
and YAML-ready values. Missing keys keep the dataclass defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from .errors import ConfigError

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def to_plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (dicts keep their keys)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "", *, numbers_as_text: bool = False) -> Any:
    """Build dataclass ``cls`` from ``data`` (see the module docstring).

    ``prefix``: dotted path of ``data`` in the whole config, for messages (default top level).
    ``numbers_as_text``: accept numbers where text is expected and convert them (YAML reads
    ``name: 2020`` as a number; default False, as JSON configs are explicit).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            section = f" in section '{prefix[:-1]}'" if prefix else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{section}; allowed keys: {', '.join(names)}")
    hints = _hints(cls)
    kwargs = {
        name: coerce(data[name], hints[name], f"{prefix}{name}", numbers_as_text=numbers_as_text)
        for name in names
        if name in data
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid values in '{prefix[:-1] if prefix else 'config'}': {exc}") from exc


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, path: str, *, numbers_as_text: bool = False) -> Any:
    """Check ``value`` against the type ``hint`` and convert containers; ``path`` names it in
    messages. Raises ConfigError saying what was expected."""
    origin = typing.get_origin(hint)

    def inner(v: Any, h: Any, p: str) -> Any:
        return coerce(v, h, p, numbers_as_text=numbers_as_text)

    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"'{path}' must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return inner(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{path}' has an invalid value {_show(value)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be an object with keys {[f.name for f in dataclasses.fields(hint)]}")
        return from_mapping(hint, value, f"{path}.", numbers_as_text=numbers_as_text)
    if hint is Any:
        return copy.deepcopy(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {_show(value)}")
        (item,) = typing.get_args(hint) or (Any,)
        return [inner(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"'{path}' must be a list, got {_show(value)}")
            return tuple(inner(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(args) != len(value):
            raise ConfigError(f"'{path}' must be a list of {len(args)} values, got {_show(value)}")
        return tuple(inner(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be an object (a mapping), got {_show(value)}")
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return {inner(k, key_t, path): inner(v, val_t, f"{path}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{path}' must be a number, got {_show(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' must be an integer, got {_show(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' must be true or false, got {_show(value)}")
        return value
    if hint is str:
        if numbers_as_text and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be text, got {_show(value)}")
        return value
    raise ConfigError(f"'{path}': unsupported config type {_type_name(hint)}")  # pragma: no cover
