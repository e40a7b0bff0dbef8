"""Typed configs: dataclass defaults are the recipe, YAML files and `key=value` hold only overrides.

Every stage declares its config as nested dataclasses. `load_config` applies YAML files then
command-line overrides, checks every key and type, then runs the dataclasses' `validate()` hooks,
so a bad config fails before any work with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or is inconsistent with another key."""


def load_config(cls: type[T], yaml_files: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then each YAML file in order, then `key=value` overrides."""
    values: dict[str, Any] = {}
    for path in yaml_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        _merge(values, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _merge(values, _nest(key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    config = _build(cls, values, prefix="")
    _validate_tree(config, prefix="")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The fully resolved config as YAML, as `--print-config` shows it."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config saved with `to_dict` (checkpoints, exports), with the same checks."""
    config = _build(cls, values, prefix="")
    _validate_tree(config, prefix="")
    return config


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key '{key}' (known under '{prefix or '<top>'}': {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
        field = fields[name]
        if get_origin(hints[name]) is dict and field.default_factory is not dataclasses.MISSING:
            # A mapping override updates the default mapping (tasks.ratios.wwmlm=0 keeps the others).
            kwargs[name] = {**field.default_factory(), **kwargs[name]}
    for name, field in fields.items():
        if name in kwargs or not dataclasses.is_dataclass(hints[name]):
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs[name] = _build(hints[name], {}, prefix + name + ".")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; set its fields (e.g. {key}.<field>=...), got {value!r}")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        (item_hint, *_) = get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        _, value_hint = get_args(hint) or (Any, Any)
        return {k: _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "5e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {hint!r}")


def _validate_tree(config: Any, prefix: str) -> None:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, prefix + field.name + ".")
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            if prefix and "'" in str(err):
                raise ConfigError(_prefix_keys(str(err), prefix)) from err
            raise


def _prefix_keys(message: str, prefix: str) -> str:
    """validate() names keys relative to its section; report them from the top."""
    head, sep, rest = message.partition("'")
    if not sep or rest.startswith(prefix):
        return message
    return f"{head}'{prefix}{rest}"


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming `key` unless `condition` holds (for validate() hooks)."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")
