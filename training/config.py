"""Training configuration: frozen dataclasses, YAML presets and `section.key=value` overrides.

A `TrainConfig` is a tree of small frozen sections (model, data, optimizer, schedule, checkpoint,
mesh, run). It is built in three layers, each validated against the dataclass fields:

1. the dataclass defaults,
2. a preset (`training/presets/NAME.yaml`) or a YAML file (`--config FILE.yaml`),
3. command-line overrides `section.key=value` (strings, coerced to the field's type).

Every key, whether it comes from YAML or the command line, is checked: an unknown or mistyped key
raises `ConfigError` naming it and suggesting the closest valid key (difflib), and a value that does
not fit the field's type names the key, the value and the expected type.

The sections live in `training.config_sections` (re-exported here). Later features (layerskip,
lowrank, compression) add one frozen section dataclass each and a field on `TrainConfig`; the
loader, overrides and error messages pick them up without other changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from training.config_sections import (  # noqa: F401  (re-exported: this module is the config's one import)
    DROPOUT_SCHEDULES, EXIT_SCALES, LAYERSKIP_CURRICULA, LOWRANK_METHODS, LOWRANK_TARGETS, PIPELINE_SCHEDULES,
    CheckpointSection, ConfigError, DataSection, LayerSkipSection, LowRankSection, MeshSection, ModelSection,
    OptimizerSection, PipelineSection, RunSection, ScheduleSection, TrainConfig)

PRESET_DIR = Path(__file__).parent / "presets"


# --------------------------------------------------------------------------- keys and types
def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. 'run.steps', 'init_from'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a right key under a wrong or missing section: compare the last part only
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == tail][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys: python -m training.train --help-keys)")


def _field_type(key: str) -> Any:
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(cls)
        if part not in types_:
            raise _unknown_key(key)
        cls = types_[part]
        if _is_section(cls) and i == len(parts) - 1:
            raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. "
                              f"'{valid_keys(cls, key + '.')[0]}=...'")
        if not _is_section(cls) and i < len(parts) - 1:
            raise _unknown_key(key)
    return cls


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "~", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` (a command-line string or a YAML scalar) as type `tp`; ConfigError if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(key, value, a)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    bad = ConfigError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(coerce(key, v.strip() if isinstance(v, str) else v, args[0]) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


# --------------------------------------------------------------------------- building configs
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'run': {'steps': 3}} -> {'run.steps': 3}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: TrainConfig, flat: dict[str, Any]) -> TrainConfig:
    """`cfg` with dotted keys set; values are coerced and checked against the field types."""
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        tp = _field_type(key)
        value = coerce(key, value, tp)
        if "." in key:
            section, name = key.split(".", 1)
            changes.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in changes.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **top)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['run.steps=10', 'model.remat=true'] -> {'run.steps': '10', ...}; checks the form only."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected an override 'section.key=value', got '{arg}'")
        key, value = arg.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def read_yaml(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flat `section.key -> value` from a YAML file. A top-level `base: PRESET` loads that preset
    first and lets this file change only what differs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return flatten(raw)
    if base in _seen:
        raise ConfigError(f"presets inherit from each other in a loop: {' -> '.join(_seen + (base,))}")
    return {**read_yaml(preset_path(base), _seen + (str(base),)), **flatten(raw)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(preset_names())})")
    return path


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- preset or YAML file <- overrides. With neither preset nor file: 'default'."""
    if preset and config_file:
        raise ConfigError("give either a preset or a config file, not both")
    path = Path(config_file) if config_file else preset_path(preset or "default")
    cfg = apply_overrides(TrainConfig(), read_yaml(path))
    if overrides:
        flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        cfg = apply_overrides(cfg, flat)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Ranges of every numeric key, cross-field rules, the model shape (`training.validation`)."""
    from training.validation import validate as check  # it imports this module

    check(cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A nested plain dict (tuples as lists), for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
