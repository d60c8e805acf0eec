"""The generic builder behind every YAML file the workbench reads: a mapping -> a typed dataclass.

:func:`build_dataclass` checks each value against the field's type hint (Literal, unions, lists, dicts, nested
dataclasses, finite numbers) and raises :class:`ConfigError` naming the file, the dotted key and what is allowed.
Run configs (:mod:`workbench.config.schema`), study files (:mod:`workbench.tune.schema`) and ablation files go
through it, so all three report mistakes the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal


class ConfigError(ValueError):
    """A config problem, reported as ``<source>: <key>: <message>`` (``<source>: <message>`` for the whole file)."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# --------------------------------------------------------------------------------------------------------------
# generic dataclass construction with key paths in every error


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__} of {', '.join(_type_name(a) for a in typing.get_args(tp))}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked against the type hint ``tp`` (and converted where YAML is loose: ``1e-3`` read as a string,
    ``2.0`` for an integer); a mismatch is a ConfigError naming ``key`` and what the type allows."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key, source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(source, key, f"{value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        return _convert_list(value, tp, key, source)
    if origin is dict:
        return _convert_dict(value, tp, key, source)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, {} if value is None else value, source, key)
    if tp is Any:
        return value
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    return _SCALARS[tp](value, key, source)


def _convert_union(value: Any, tp: Any, key: str, source: str) -> Any:
    """The first option that accepts ``value``; a single non-null option's own error, else one naming them all."""
    options = typing.get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(source, key, f"must not be null; expected {_type_name(tp)}")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(value, option, key, source)
        except ConfigError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(source, key, f"expected {_type_name(tp)}, got {value!r}")


def _convert_list(value: Any, tp: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(source, key, f"expected a list, got {value!r}")
    (item_tp,) = typing.get_args(tp)
    return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]


def _convert_dict(value: Any, tp: Any, key: str, source: str) -> dict[Any, Any]:
    """A mapping's values checked one by one (a null value is an empty mapping: ``callbacks: {lr_monitor: }``)."""
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a mapping, got {value!r}")
    _, value_tp = typing.get_args(tp)
    return {k: _convert(v if v is not None else {}, value_tp, f"{key}.{k}", source) for k, v in value.items()}


def _convert_bool(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(source, key, f"expected true or false, got {value!r}")
    return value


def _convert_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(source, key, f"expected an integer, got {value!r}")
    return int(value)


def _convert_float(value: Any, key: str, source: str) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value)  # YAML reads 1e-3 (no dot) as a string
        except ValueError:
            raise ConfigError(source, key, f"expected a number, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise ConfigError(source, key, f"expected a number, got {value!r}")
    if not math.isfinite(number):  # .inf / .nan would train to nan losses or crash after data preparation
        raise ConfigError(source, key, f"expected a finite number (not .inf or .nan), got {value!r}")
    return float(number)


def _convert_str(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(source, key, f"expected a string, got {value!r}")
    return value


_SCALARS: dict[Any, Callable[[Any, str, str], Any]] = {
    bool: _convert_bool, int: _convert_int, float: _convert_float, str: _convert_str}


def check_keys(values: dict[str, Any], allowed: tuple[str, ...], source: str, prefix: str = "",
               hint: str = "") -> None:
    """Reject the first key of ``values`` not in ``allowed``: ``<source>: <prefix>.<key>: unknown key; allowed: ...``
    (for the ablation and study files, whose sections are plain mappings rather than dataclasses)."""
    for name in values:
        if name not in allowed:
            raise ConfigError(source, f"{prefix}.{name}" if prefix else str(name),
                              f"unknown key; allowed: {', '.join(allowed)}{hint}")


def build_dataclass(cls: type, values: dict[str, Any], source: str = "<config>", prefix: str = "") -> Any:
    """Build ``cls`` from a mapping, naming ``source`` and the dotted key in every error. A class attribute
    ``UNKNOWN_KEY_HINT`` (``{prefix}``: the section's dotted key) is added to the unknown-key message."""
    if not isinstance(values, dict):
        raise ConfigError(source, prefix, f"expected a mapping of {cls.__name__} keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            hint = getattr(cls, "UNKNOWN_KEY_HINT", "").format(prefix=prefix)  # e.g. where such keys belong
            raise ConfigError(source, key, f"unknown key; allowed in {prefix or 'the top level'}: "
                              f"{', '.join(sorted(fields))}{hint}")
        parse = fields[name].metadata.get("parse")
        if parse is not None:
            try:
                kwargs[name] = parse(value)
            except ValueError as err:
                raise ConfigError(source, key, str(err)) from None
        else:
            kwargs[name] = _convert(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by __post_init__ with a key relative to this section
        inner = err.key
        raise ConfigError(source, f"{prefix}.{inner}" if prefix and inner else (inner or prefix), err.message) from None

