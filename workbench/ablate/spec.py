"""Ablation files -> validated runs: the spec's data structures, axis parsing and expansion (nothing here
prepares or trains). The file format is described in :mod:`workbench.ablate`."""

from __future__ import annotations

import copy
import fnmatch
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.config import (
    ConfigError,
    RunConfig,
    check_keys,
    config_from_dict,
    deep_merge,
    read_yaml,
    set_dotted,
)
from workbench.durations import parse_count
from workbench.run_files import VARIANT_FILE  # noqa: F401 (ablate.VARIANT_FILE)

TOP_KEYS = ("name", "description", "base", "seeds", "variants", "grid", "zip", "repetition", "smoke", "scales",
            "parallel", "slurm")
VARIANT_KEYS = ("name", "description", "grid", "zip")  # everything else in a variant is a run-config override
SMOKE_KEYS = ("overrides", "seeds", "grid", "zip", "repetition")
REPETITION_KEYS = ("unique_tokens", "epochs", "total_tokens")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


# --------------------------------------------------------------------------------------------------------------
# data structures


@dataclass
class Axis:
    """One swept dimension: ``key`` (dotted, None for the repetition axis) and its (label, value) points."""

    name: str
    key: str | None
    points: list[tuple[str, Any]]


@dataclass
class Variant:
    """One point of the design (before seeds): its name, the overrides that make it, and the swept values."""

    name: str
    group: str  # the name without the repetition fragment (what a figure colours by)
    repetition: str | None  # e.g. "u250k-ep16"
    overrides: dict[str, Any]
    swept: dict[str, Any]
    index: int = 0  # declared order


@dataclass
class PlannedRun:
    ablation: str
    variant: Variant
    seed: int
    config: RunConfig
    run_dir: Path
    state: str = "new"  # new | resume | complete | changed
    detail: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def variant_record(self, ablation_file: str, smoke: bool) -> dict[str, Any]:
        """What goes into ``variant.json``."""
        return {"ablation": self.ablation, "ablation_file": ablation_file, "smoke": smoke,
                "variant": self.variant.name, "group": self.variant.group, "repetition": self.variant.repetition,
                "index": self.variant.index, "seed": self.seed, "run": self.name,
                "overrides": self.variant.overrides, "swept": self.variant.swept}


@dataclass
class Ablation:
    name: str
    path: Path
    description: str
    smoke: bool
    variants: list[Variant]
    seeds: list[int]
    parallel: int | None = None  # the file's default for --parallel
    slurm: Any = None  # the file's slurm: section (parsed by workbench.ablate.slurm when submitting)
    runs: list[PlannedRun] = field(default_factory=list)
    scale: str | None = None  # the named scale applied (--scale NAME; "smoke" for --smoke), None: the file as written


# --------------------------------------------------------------------------------------------------------------
# small helpers


def format_count(n: float) -> str:
    """1_500_000 -> '1.5M', 250_000 -> '250k' (labels and plan columns)."""
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{suffix}" if value != int(value) else f"{int(value)}{suffix}"
    return f"{n:g}"


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def expand_dotted(tree: Any) -> Any:
    """``{"a.b": 1, "c": {"d.e": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": {"e": 2}}}`` (merging shared prefixes)."""
    if not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = {}
    for key, value in tree.items():
        value = expand_dotted(value)
        nested: dict[str, Any] = {}
        set_dotted(nested, str(key), value)
        out = deep_merge(out, nested)
    return out


def leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the leaves (an empty mapping or null counts as a leaf: it switches a section on/off)."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys.extend(leaf_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def keys_overlap(a: str, b: str) -> bool:
    """Whether setting ``a`` and ``b`` touch the same value (equal, or one is a section containing the other)."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


def _label(axis: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{axis}{str(value).lower()}"
    if isinstance(value, int | float):
        return f"{axis}{value:g}"
    return str(value)


def _algorithm_list(value: Any, source: str, key: str) -> dict[str, Any]:
    """``[token_masking, {dropout: {mlp: 0.1}}]`` -> ``{token_masking: {}, dropout: {mlp: 0.1}}``."""
    out: dict[str, Any] = {}
    for i, item in enumerate(value):
        if isinstance(item, str):
            out[item] = {}
        elif isinstance(item, dict) and len(item) == 1:
            out.update(item)
        else:
            raise ConfigError(source, f"{key}[{i}]", f"an algorithm list holds names or one-key mappings, got {item!r}")
    return out


def _normalize_overrides(raw: Any, source: str, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"expected a mapping of run-config overrides, got {raw!r}")
    tree = expand_dotted(raw)
    if isinstance(tree.get("algorithms"), list):
        tree["algorithms"] = _algorithm_list(tree["algorithms"], source, f"{key}.algorithms")
    return tree


# --------------------------------------------------------------------------------------------------------------
# parsing the axes


def parse_axes(raw: Any, source: str, key: str) -> list[Axis]:
    """A ``grid:``/``zip:`` mapping -> axes. Entries: ``dotted.key: [values]`` or ``alias: {key:, values:}``;
    values may be a mapping ``label: value``."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(source, key, "expected a non-empty mapping of axes (dotted.key: [values], or "
                          "alias: {key: dotted.key, values: [...]})")
    axes = []
    for name, spec in raw.items():
        where = f"{key}.{name}"
        if isinstance(spec, dict) and "key" in spec:
            unknown = set(spec) - {"key", "values"}
            if unknown:
                raise ConfigError(source, f"{where}.{sorted(unknown)[0]}", "unknown key; an aliased axis has key "
                                  "and values")
            dotted, values = spec["key"], spec.get("values")
            if not isinstance(dotted, str) or not dotted:
                raise ConfigError(source, f"{where}.key", "expected a dotted config key such as optimizer.lr")
        else:
            dotted, values, name = str(name), spec, str(name).split(".")[-1]
        if isinstance(values, dict):
            points = [(str(label), value) for label, value in values.items()]
        elif isinstance(values, list):
            for value in values:
                if isinstance(value, dict | list):
                    raise ConfigError(source, where, "mapping or list values need labels: write values as "
                                      "{label: value, ...}")
            points = [(_label(name, value), value) for value in values]
        else:
            raise ConfigError(source, where, f"expected a list of values (or a mapping label: value), got {values!r}")
        if not points:
            raise ConfigError(source, where, "empty axis: give at least one value")
        labels = [label for label, _ in points]
        if len(set(labels)) != len(labels):
            raise ConfigError(source, where, f"repeated values/labels {labels}")
        axes.append(Axis(name, dotted, points))
    return axes


def parse_repetition(raw: Any, source: str, key: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The repetition axis -> [(label, overrides, swept)] setting data.unique_tokens and trainer.max_duration."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected a mapping with unique_tokens and/or epochs (and optional "
                          "total_tokens)")
    check_keys(raw, REPETITION_KEYS, source, key)

    def counts(name: str, parse: Callable[[Any], int]) -> list[int] | None:
        if name not in raw:
            return None
        values = raw[name] if isinstance(raw[name], list) else [raw[name]]
        if not values:
            raise ConfigError(source, f"{key}.{name}", "empty axis: give at least one value")
        try:
            parsed = [parse(v) for v in values]
        except ValueError as err:
            raise ConfigError(source, f"{key}.{name}", str(err)) from None
        if any(v <= 0 for v in parsed):
            raise ConfigError(source, f"{key}.{name}", "must be positive")
        return parsed

    def epochs_of(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"epochs are whole numbers, got {value!r}")
        return value

    unique = counts("unique_tokens", parse_count)
    epochs = counts("epochs", epochs_of)
    total = raw.get("total_tokens")
    if total is not None:
        try:
            total = parse_count(total)
        except ValueError as err:
            raise ConfigError(source, f"{key}.total_tokens", str(err)) from None
        if (unique is None) == (epochs is None):
            raise ConfigError(source, key, "with total_tokens give either epochs (unique = total / epochs) or "
                              "unique_tokens (epochs = total / unique), not both")
        if epochs is not None:
            pairs = [(total // e, e) for e in epochs]
        else:
            assert unique is not None
            for u in unique:
                if total % u:
                    raise ConfigError(source, f"{key}.unique_tokens", f"total_tokens {total} is not a whole number "
                                      f"of epochs of {u} unique tokens")
            pairs = [(u, total // u) for u in unique]
    else:
        if unique is None or epochs is None:
            raise ConfigError(source, key, "give unique_tokens and epochs (their product is swept), or total_tokens "
                              "with one of them")
        pairs = list(itertools.product(unique, epochs))
    out = []
    for u, e in pairs:
        label = f"u{format_count(u)}-ep{e}"
        swept = {"unique_tokens": u, "epochs": e} | ({"total_tokens": total} if total is not None else {})
        out.append((label, {"data": {"unique_tokens": u}, "trainer": {"max_duration": f"{e}ep"}}, swept))
    if len({label for label, _, _ in out}) != len(out):
        raise ConfigError(source, key, "repeated unique_tokens x epochs points")
    return out


def _points(axes: list[Axis], mode: str, source: str, key: str) -> list[list[tuple[Axis, str, Any]]]:
    """Grid (product) or zip (lock-step) points of ``axes``: each a list of (axis, label, value)."""
    if not axes:
        return [[]]
    per_axis = [[(axis, label, value) for label, value in axis.points] for axis in axes]
    if mode == "grid":
        return [list(p) for p in itertools.product(*per_axis)]
    lengths = {axis.name: len(axis.points) for axis in axes}
    if len(set(lengths.values())) != 1:
        raise ConfigError(source, key, f"zip axes need equal lengths, got {lengths}")
    return [list(p) for p in zip(*per_axis)]


def _check_distinct_keys(axes: list[Axis], source: str, where: str) -> None:
    for a, b in itertools.combinations(axes, 2):
        if keys_overlap(a.key or "", b.key or ""):
            raise ConfigError(source, where, f"axes {a.name!r} ({a.key}) and {b.name!r} ({b.key}) set the same value")


# --------------------------------------------------------------------------------------------------------------
# expansion


def _base_config(raw: Any, path: Path) -> dict[str, Any]:
    """The ``base:`` entry: a run YAML path (relative to the ablation file) or an inline mapping."""
    from workbench.config import resolve_base

    if raw is None:
        return {}
    if isinstance(raw, str):
        base_path = Path(raw) if Path(raw).is_absolute() else path.parent / raw
        return resolve_base(read_yaml(base_path), base_path)
    if isinstance(raw, dict):
        return resolve_base(expand_dotted(copy.deepcopy(raw)), path)
    raise ConfigError(str(path), "base", f"expected a run YAML path or a run-config mapping, got {raw!r}")


def _explicit_variants(raw: Any, source: str) -> list[tuple[str, dict[str, Any], str]]:
    """``variants:`` as a mapping (name: spec) or a list of specs with ``name`` -> [(name, spec, key)]."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        if not raw:
            raise ConfigError(source, "variants", "empty: name at least one variant (or drop the key)")
        items = []
        for name, spec in raw.items():
            if spec is not None and not isinstance(spec, dict):
                raise ConfigError(source, f"variants.{name}", f"expected a mapping of overrides, got {spec!r}")
            items.append((str(name), dict(spec or {}), f"variants.{name}"))
        return items
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(source, "variants", "empty: name at least one variant (or drop the key)")
        items = []
        for i, spec in enumerate(raw):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str | int | float):
                raise ConfigError(source, f"variants[{i}]", "each list entry is a mapping with a name")
            items.append((str(spec["name"]), dict(spec), f"variants[{i}]"))
        return items
    raise ConfigError(source, "variants", f"expected a mapping name: overrides or a list, got {raw!r}")


def scale_names(data: dict[str, Any]) -> list[str]:
    """The scales a file defines: ``smoke`` (its ``smoke:`` block) and the keys of ``scales:``."""
    scales = data.get("scales")
    return sorted({*(["smoke"] if "smoke" in data else []), *(scales if isinstance(scales, dict) else {})})


def _scale_section(data: dict[str, Any], source: str, scale: str) -> tuple[dict[str, Any], str]:
    """A named scale's block and its dotted key: ``smoke`` is the ``smoke:`` block (or ``scales.smoke``), any other
    name an entry of ``scales:``; both hold the same keys (overrides, seeds, grid, zip, repetition)."""
    scales = data.get("scales")
    if scales is not None and not isinstance(scales, dict):
        raise ConfigError(source, "scales", "expected a mapping of scale names to blocks like smoke: "
                          "(overrides, seeds, grid, zip, repetition)")
    if scale == "smoke" and "smoke" in data and scales and "smoke" in scales:
        raise ConfigError(source, "scales.smoke", "the smoke scale is defined twice (smoke: and scales.smoke)")
    key = "smoke" if scale == "smoke" and "smoke" in data else f"scales.{scale}"
    raw = data.get("smoke") if key == "smoke" else (scales or {}).get(scale)
    if raw is None:
        allowed = scale_names(data)
        flag = "--smoke" if scale == "smoke" else f"--scale {scale}"
        raise ConfigError(source, "smoke" if scale == "smoke" else "scales",
                          f"{flag} needs a {'smoke: block' if scale == 'smoke' else f'scales: {scale}: block'} in "
                          f"the ablation file; scales here: {', '.join(allowed) if allowed else 'none'}")
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected a mapping with overrides, seeds, grid, zip, repetition")
    check_keys(raw, SMOKE_KEYS, source, key, hint=f" (run-config changes go under {key}.overrides)")
    return raw, key


def _seeds(raw: Any, source: str, key: str, default: int) -> list[int]:
    if raw is None:
        return [default]
    values = raw if isinstance(raw, list) else [raw]
    if not values or any(isinstance(s, bool) or not isinstance(s, int) for s in values):
        raise ConfigError(source, key, f"expected a non-empty list of integer seeds, got {raw!r}")
    if len(set(values)) != len(values):
        raise ConfigError(source, key, f"repeated seeds {values}")
    return list(values)


def load_ablation(path: str | Path, smoke: bool = False, only: Iterable[str] | None = None,
                  results_root: str | Path | None = None, scale: str | None = None) -> Ablation:
    """Read an ablation file and expand it into validated runs (nothing is prepared or trained).

    ``scale`` applies a named scale (``scales: {NAME: ...}``; ``smoke`` is the same as ``smoke=True``): its
    overrides go over every run and its seeds/grid/zip/repetition replace the file's. A scale other than smoke
    names the ablation ``<name>-<scale>`` (its results folder and run names), so the runs of two scales of one
    study never share a folder; smoke keeps the file's name, as it always has."""
    from workbench.paths import results_dir

    path = Path(path)
    source = str(path)
    data = read_yaml(path)
    check_keys(data, TOP_KEYS, source)
    name = str(data.get("name") or path.stem)
    if not _NAME.fullmatch(name):
        raise ConfigError(source, "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {name!r}")
    base = _base_config(data.get("base"), path)
    base.pop("name", None)
    if smoke and scale not in (None, "smoke"):
        raise ConfigError(source, "--scale", f"--smoke is the scale named smoke; give --smoke or --scale {scale}")
    scale = "smoke" if smoke else scale
    smoke = scale == "smoke"
    smoke_raw, scale_key = _scale_section(data, source, scale) if scale is not None else ({}, "smoke")
    smoke_overrides = _normalize_overrides(smoke_raw.get("overrides"), source, f"{scale_key}.overrides")
    if scale is not None and not smoke:
        name = f"{name}-{scale}"

    def pick(key: str) -> tuple[Any, str]:
        return (smoke_raw[key], f"{scale_key}.{key}") if key in smoke_raw else (data.get(key), key)

    seeds_raw, seeds_key = pick("seeds")
    seeds = _seeds(seeds_raw, source, seeds_key, int(base.get("seed", RunConfig.seed)))
    grid_raw, grid_key = pick("grid")
    zip_raw, zip_key = pick("zip")
    rep_raw, rep_key = pick("repetition")
    grid_axes_top = parse_axes(grid_raw, source, grid_key)
    zip_axes_top = parse_axes(zip_raw, source, zip_key)
    top_axes = grid_axes_top + zip_axes_top
    repetition = parse_repetition(rep_raw, source, rep_key)
    rep_keys = ["data.unique_tokens", "trainer.max_duration"] if repetition else []
    _check_distinct_keys(top_axes + [Axis("repetition", k, []) for k in rep_keys], source, "grid/zip/repetition")

    explicit = _explicit_variants(data.get("variants"), source) or [("", {}, "")]
    variants: list[Variant] = []
    for var_name, spec, var_key in explicit:
        if var_name and not _NAME.fullmatch(var_name):
            raise ConfigError(source, var_key, f"variant names use letters, digits, '-', '_', '.'; got {var_name!r}")
        overrides_raw = {k: v for k, v in spec.items() if k not in VARIANT_KEYS}
        overrides = _normalize_overrides(overrides_raw, source, var_key)
        for reserved in ("name", "seed"):
            if reserved in overrides:
                raise ConfigError(source, f"{var_key}.{reserved}", "set by the ablation runner (run name and seeds)")
        grid_axes_own = parse_axes(spec.get("grid"), source, f"{var_key}.grid")
        zip_axes_own = parse_axes(spec.get("zip"), source, f"{var_key}.zip")
        all_axes = grid_axes_own + zip_axes_own + top_axes + [Axis("repetition", k, []) for k in rep_keys]
        _check_distinct_keys(all_axes, source, var_key or "grid")
        combos = itertools.product(_points(grid_axes_own, "grid", source, f"{var_key}.grid"),
                                   _points(zip_axes_own, "zip", source, f"{var_key}.zip"),
                                   _points(grid_axes_top, "grid", source, grid_key),
                                   _points(zip_axes_top, "zip", source, zip_key),
                                   repetition or [None])
        for g_own, z_own, g_top, z_top, rep in combos:
            merged = copy.deepcopy(overrides)
            fragments = [var_name] if var_name else []
            swept: dict[str, Any] = {}
            for axis, label, value in [*g_own, *z_own, *g_top, *z_top]:
                point: dict[str, Any] = {}
                set_dotted(point, axis.key or axis.name, copy.deepcopy(value))
                merged = deep_merge(merged, point)
                fragments.append(label)
                swept[axis.name] = value if not isinstance(value, dict | list) else label
            group = "-".join(fragments)
            rep_label = None
            if rep is not None:
                rep_label, rep_overrides, rep_swept = rep
                merged = deep_merge(merged, rep_overrides)
                fragments.append(rep_label)
                swept.update(rep_swept)
            full = "-".join(fragments) or "base"
            variants.append(Variant(full, group or "base", rep_label, merged, swept, len(variants)))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(source, "variants", f"two design points get the same name {duplicates[0]!r}; give axis "
                          "values labels (values: {label: value}) or rename the variants")

    if smoke_overrides:
        smoke_leaves = leaf_keys(smoke_overrides)
        for variant in variants:
            for swept_key in leaf_keys(variant.overrides):
                clash = next((k for k in smoke_leaves if keys_overlap(k, swept_key)), None)
                if clash is not None:
                    raise ConfigError(source, f"{scale_key}.overrides.{clash}", f"would overwrite {swept_key}, "
                                      f"which variant {variant.name!r} sets; replace the axis under {scale_key}: "
                                      "instead")

    if only:
        variants = select_variants(variants, list(only), source)

    root = Path(results_root) if results_root is not None else results_dir()
    parallel = data.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(source, "parallel", f"expected a whole number >= 1, got {parallel!r}")
    ablation = Ablation(name, path, str(data.get("description") or ""), smoke, variants, seeds, parallel,
                        data.get("slurm"), scale=scale)
    for variant in variants:
        for seed in seeds:
            values = deep_merge(deep_merge(base, variant.overrides), smoke_overrides)
            run_name = f"{name}-{variant.name}-seed{seed}"
            values = deep_merge(values, {"name": run_name, "seed": seed})
            config = config_from_dict(values, f"{source} (variant {variant.name})")
            ablation.runs.append(PlannedRun(name, variant, seed, config, root / name / variant.name / f"seed{seed}"))
    _check_tasks(ablation)
    return ablation


def select_variants(variants: list[Variant], only: list[str], source: str) -> list[Variant]:
    """``--only``: exact variant names, group names (all their repetition points) or shell patterns."""
    chosen: list[Variant] = []
    for pattern in only:
        hits = [v for v in variants if v.name == pattern or v.group == pattern or fnmatch.fnmatchcase(v.name, pattern)]
        if not hits:
            raise ConfigError(source, "--only", f"unknown variant {pattern!r}; variants: "
                              f"{', '.join(v.name for v in variants)}")
        chosen.extend(v for v in hits if v not in chosen)
    return sorted(chosen, key=lambda v: v.index)


def _check_tasks(ablation: Ablation) -> None:
    """Downstream task names fail at plan time, not after hours of other runs (when that module exists)."""
    tasks = sorted({t for run in ablation.runs if run.config.eval.downstream for t in run.config.eval.downstream.tasks})
    if not tasks:
        return
    try:
        from workbench.evaluation.tasks import check_tasks
    except ImportError:
        return
    check_tasks(tasks)
