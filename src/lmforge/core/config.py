"""Typed dataclass configs: YAML files plus dotted command-line overrides.

A config is any (nested) dataclass. `load_config(Cls, path, overrides, flags)` reads YAML, lays command-line flags
over it, applies overrides such as `model.d_model=512`, `train.betas=[0.9,0.95]` or `model.tie_embeddings=false`,
and builds the dataclass while checking every key and type. This is the one way a stage config is built.

Validation has one home: each config dataclass checks its own values in `validate()`, which its
`__post_init__` calls, so a config is checked however it is made (YAML, overrides, flags or Python). Every
problem is a `ConfigError` naming the field (as a dotted path from the root), the value and what is allowed;
the command line turns it into one line naming the flag, and exit code 2. `save_config` writes the fully
resolved config next to an output so any artifact can be rebuilt.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text

T = TypeVar("T")


class ConfigError(LmforgeError):
    """A config value that is not allowed: the field's dotted path, the value, and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field {field!r} = {value!r}: {allowed}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error for the config nested at `prefix` (e.g. "bloom.")."""
        return ConfigError(prefix + self.field, self.value, self.allowed) if prefix else self


def require(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError for `field` unless `condition` holds; used by configs' `validate()`."""
    if not condition:
        raise ConfigError(field, value, allowed)


def packaged_config(relative: str | Path) -> Path:
    """A config shipped inside the package (`train/quickstart.yaml`), readable from an installed wheel."""
    return Path(str(resources.files("lmforge") / "configs" / relative))


def config_path(path: str | Path) -> Path:
    """`path` when it exists; else, for a path the docs name (`configs/train/quickstart.yaml` or
    `train/quickstart.yaml`), the copy shipped in the package, so those commands work from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    relative = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    shipped = packaged_config(relative)
    return shipped if shipped.is_file() else path


def read_yaml(path: str | Path) -> dict:
    path = config_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"config file not found: {path}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LmforgeError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed value). Values are YAML scalars or flow lists/maps."""
    if "=" not in item:
        raise LmforgeError(f"bad override {item!r}: expected KEY=VALUE, e.g. model.d_model=512")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise LmforgeError(f"bad override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise LmforgeError(f"bad override {item!r}: cannot parse value {raw!r}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, dict) else {}
            node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except LmforgeError as e:
                errors.append(e)
        raise _type_error(key, value, tp)
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(key, value, f"must be one of {choices}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _type_error(key, value, tp)
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, value, tp)


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(key, value, f"is not of type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", data, "expected a mapping (a config section)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields))
        raise ConfigError(prefix + unknown[0], data[unknown[0]], f"unknown config key (valid keys here: {valid})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], prefix + name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(prefix + missing[0], None, "missing: this config key is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(prefix) from None
    except (ValueError, TypeError) as e:
        raise LmforgeError(f"invalid config{(' ' + prefix.rstrip('.')) if prefix else ''}: {e}") from None


def to_dict(config: Any) -> Any:
    """Plain YAML/JSON-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict | None = None) -> T:
    """The one way a config is built: YAML file <- command-line flags (nested dict) <- dotted overrides, into a
    checked and validated `cls` instance."""
    data = read_yaml(path) if path is not None else {}
    data = _deep_merge(data, flags or {})
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def save_config(config: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    path = Path(directory) / name
    atomic_write_text(path, dump_yaml(config))
    return path
