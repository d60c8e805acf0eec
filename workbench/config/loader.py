"""Reading run YAML files: ``base:`` includes, ``key.sub=value`` overrides, the file that set each key, the
stored ``config.yaml`` (dump) and run identity (is a stored config the same run as this one?)."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from workbench import strict_yaml
from workbench.config.build import ConfigError, build_dataclass
from workbench.config.schema import RunConfig, check_processes

# --------------------------------------------------------------------------------------------------------------
# YAML loading, overrides, dumping


def parse_overrides(overrides: list[str] | None, source: str = "command line") -> dict[str, Any]:
    """``["optimizer.lr=1e-3", "algorithms.dropout.mlp=0.1"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(source, item, "overrides are written key.sub=value")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key.strip()):
            raise ConfigError(source, item, "overrides are written key.sub=value (a dotted key such as optimizer.lr)")
        try:
            value = strict_yaml.load(raw) if raw != "" else None
        except strict_yaml.DuplicateKeyError as err:
            raise ConfigError(source, f"{key.strip()}.{err.key}", "duplicate key; a key may appear once") from None
        except yaml.YAMLError as err:
            raise ConfigError(source, key, f"value is {strict_yaml.describe_error(err)}") from None
        set_dotted(nested, key.strip(), value)
    return nested


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def get_dotted(source: dict[str, Any], dotted: str) -> Any:
    node: Any = source
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; a null mapping value switches a section off."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The one reader of the workbench's YAML files (run, base, ablation and study files): UTF-8 text, a mapping,
    not empty, no key written twice; every problem is one ConfigError naming the file (and key and line)."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError(source, "", "is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(source, "", "file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(source, "", f"cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(source, "", f"not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the file "
                          "as UTF-8") from None
    try:
        data = strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as err:
        raise ConfigError(source, err.key, f"duplicate key on line {err.line} (first on line {err.first_line}); a "
                          "key may appear once in a mapping") from None
    except yaml.YAMLError as err:
        raise ConfigError(source, "", strict_yaml.describe_error(err)) from None
    if data is None:
        raise ConfigError(source, "", "the file is empty (or holds only comments); write the settings to use")
    if not isinstance(data, dict):
        raise ConfigError(source, "", "a config file is a mapping of sections")
    return data


def resolve_base(data: dict[str, Any], path: str | Path, sources: dict[str, str] | None = None,
                 chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Follow ``base: other.yaml`` (relative to the including file) and merge this file on top.

    A cycle (a includes b includes a) is refused naming it. ``sources``, when given, receives the file that set
    each dotted key (the last one to write it), so errors can name the file that holds a wrong value."""
    path = Path(path)
    chain = (*chain, path)
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(str(path), "base", f"expected the path of another run YAML (relative to this file), "
                              f"got {base!r}")
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if any(os.path.realpath(base_path) == os.path.realpath(p) for p in chain):
            cycle = " -> ".join(str(p) for p in (*chain, base_path))
            raise ConfigError(str(path), "base", f"files include each other in a cycle: {cycle}")
        if not base_path.exists():
            raise ConfigError(str(path), "base", f"{base!r} not found (looked for {base_path.absolute()})")
        merged = resolve_base(read_yaml(base_path), base_path, sources, chain)
    if sources is not None:
        _record_sources(data, str(path), sources)
    return deep_merge(merged, data) if merged else data


def _record_sources(values: dict[str, Any], source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        sources[dotted] = source
        if isinstance(value, dict):
            _record_sources(value, source, sources, dotted)
        else:  # replaces whatever a base file had below this key
            for stale in [k for k in sources if k.startswith(dotted + ".")]:
                del sources[stale]


def _source_of(key: str, sources: dict[str, str], default: str) -> str:
    """The file that set dotted ``key`` (or its nearest parent section); ``default`` when nobody did."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return default


# top-level keys that mark the other YAML files (workbench ablate / workbench tune) when given to `workbench train`
_STUDY_KEYS = ("search_space", "run", "n_trials", "objectives", "sampler", "pruner", "enqueue")
_ABLATION_KEYS = ("variants", "grid", "zip", "repetition", "seeds", "smoke", "scales", "parallel", "slurm")


def refuse_other_file_kinds(data: dict[str, Any], path: Path) -> None:
    """A run file is not an ablation or a study file: say which kind it is and which command takes it."""
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    study = [k for k in _STUDY_KEYS if k in data and k not in run_keys]
    if study:
        raise ConfigError(str(path), study[0], f"this is a study file, not a run config: run it with `workbench "
                          f"tune {path}` (`workbench train` takes one run's YAML)")
    ablation = [k for k in _ABLATION_KEYS if k in data and k not in run_keys]
    if isinstance(data.get("base"), dict) or ablation:
        key = "base" if isinstance(data.get("base"), dict) else ablation[0]
        why = "its base: is a mapping" if key == "base" else f"it has {key}:"
        raise ConfigError(str(path), key, f"this is an ablation file ({why}), not a run config: run it with "
                          f"`workbench ablate {path}` (`workbench train` takes one run's YAML)")


def config_from_dict(values: dict[str, Any], source: str = "<config>") -> RunConfig:
    return build_dataclass(RunConfig, values, source)


def load_run_config(path: str | Path, overrides: list[str] | None = None, values: dict[str, Any] | None = None,
                    world_size: int = 1) -> RunConfig:
    """Read, merge (``base:``), override and validate a run config.

    ``values``: already parsed overrides (nested), applied after ``overrides``; both are reported as the command
    line. ``world_size``: the number of processes the run will be split over (see :func:`check_processes`).
    Errors name the file that holds the offending value: a base file, this file or the command line."""
    path = Path(path)
    data = read_yaml(path)
    refuse_other_file_kinds(data, path)
    sources: dict[str, str] = {}
    data = resolve_base(data, path, sources)
    command_line = deep_merge(parse_overrides(overrides), values or {})
    _record_sources(command_line, "command line", sources)
    data = deep_merge(data, command_line)
    try:
        config = config_from_dict(data, str(path))
        check_processes(config, world_size)
    except ConfigError as err:
        raise ConfigError(_source_of(err.key, sources, str(path)), err.key, err.message) from None
    return config


def dump_config(config: RunConfig) -> str:
    """The YAML a run folder stores (``config.yaml``), headed by its schema version (see :func:`config_differences`)."""
    header = f"# workbench run config, schema {CONFIG_SCHEMA_VERSION}\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# run identity: is a stored config.yaml the same run as this config?

# Bump when an existing key changes meaning (adding a key with a default needs no bump: stored runs get the default).
# A stored config.yaml without the header line predates versioning and is schema 1.
CONFIG_SCHEMA_VERSION = 1
_SCHEMA_LINE = re.compile(r"#\s*workbench run config, schema (\d+)\s*$", re.MULTILINE)


def stored_schema_version(text: str) -> int:
    """The schema version in a stored config.yaml's header (1 when there is none: written before versioning)."""
    match = _SCHEMA_LINE.search(text)
    return int(match.group(1)) if match else 1


def _value_differences(stored: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in [*stored, *(k for k in current if k not in stored)]:
            out += _value_differences(stored.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if stored == current else [f"{prefix} (stored {stored!r}, now {current!r})"]


def config_differences(path: str | Path, config: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys (with both values) where the run config stored at ``path`` differs from ``config``.

    Compared by value, not by text: the stored YAML is re-validated by today's loader, so a key added to the
    schema since the run was written takes its default and does not make the run "changed". ``ignore`` lists
    top-level or dotted keys left out (e.g. ``name`` when a retried trial adopts another folder's run). Raises
    :class:`ConfigError` when the file is unreadable, invalid under today's schema, or of another schema version."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), "", f"cannot be read: {err}") from None
    version = stored_schema_version(text)
    if version != CONFIG_SCHEMA_VERSION:
        raise ConfigError(str(path), "", f"written with config schema {version}, this workbench reads schema "
                          f"{CONFIG_SCHEMA_VERSION}; keys may have changed meaning, so it cannot be compared")
    try:
        values = strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as err:
        raise ConfigError(str(path), err.key, f"duplicate key on line {err.line} (first on line {err.first_line})"
                          ) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", strict_yaml.describe_error(err)) from None
    stored = config_from_dict(values if values is not None else {}, str(path)).to_dict()
    return [d for d in _value_differences(stored, config.to_dict(), "")
            if not any(d == key or d.startswith((f"{key} ", f"{key}.")) for key in ignore)]
