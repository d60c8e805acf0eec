"""Ablation files -> validated runs: the spec's data structures, axis parsing and expansion (nothing here
prepares or trains). The file format is described in :mod:`workbench.ablate`."""

from __future__ import annotations

import copy
import fnmatch
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.ablate.schema import NAME, UNSET, AblationFile, RepetitionBlock, ScaleBlock, read_ablation_file
from workbench.config import (
    ConfigError,
    RunConfig,
    build_dataclass,
    config_from_dict,
    deep_merge,
    read_yaml,
    set_dotted,
)
from workbench.run_files import VARIANT_FILE  # noqa: F401 (ablate.VARIANT_FILE)

VARIANT_KEYS = ("name", "description", "grid", "zip")  # everything else in a variant is a run-config override


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
    return [_axis(name, spec, source, f"{key}.{name}") for name, spec in raw.items()]


def _axis(name: Any, spec: Any, source: str, where: str) -> Axis:
    """One axis entry: ``dotted.key: values`` or ``alias: {key: dotted.key, values: values}``."""
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
    points = _axis_points(str(name), values, source, where)
    labels = [label for label, _ in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(source, where, f"repeated values/labels {labels}")
    return Axis(str(name), dotted, points)


def _axis_points(name: str, values: Any, source: str, where: str) -> list[tuple[str, Any]]:
    """(label, value) per point: labels as written for a mapping, else made from the axis name and the value."""
    if isinstance(values, dict):
        points = [(str(label), value) for label, value in values.items()]
    elif isinstance(values, list):
        if any(isinstance(value, dict | list) for value in values):
            raise ConfigError(source, where, "mapping or list values need labels: write values as "
                              "{label: value, ...}")
        points = [(_label(name, value), value) for value in values]
    else:
        raise ConfigError(source, where, f"expected a list of values (or a mapping label: value), got {values!r}")
    if not points:
        raise ConfigError(source, where, "empty axis: give at least one value")
    return points


def parse_repetition(raw: Any, source: str, key: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The repetition axis -> [(label, overrides, swept)] setting data.unique_tokens and trainer.max_duration."""
    if raw is None:
        return []
    block = raw if isinstance(raw, RepetitionBlock) else build_dataclass(RepetitionBlock, raw, source, key)
    total = block.total_tokens
    out = []
    for u, e in block.pairs():
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


@dataclass
class _Design:
    """The file's own axes at the chosen scale (each with the dotted key its errors name) and repetition points."""

    grid: list[Axis]
    grid_key: str
    zip: list[Axis]
    zip_key: str
    repetition: list[tuple[str, dict[str, Any], dict[str, Any]]]

    @property
    def axes(self) -> list[Axis]:
        """Every axis that sets a value (the repetition points set data.unique_tokens and trainer.max_duration)."""
        keys = ["data.unique_tokens", "trainer.max_duration"] if self.repetition else []
        return self.grid + self.zip + [Axis("repetition", k, []) for k in keys]


def _pick(spec: AblationFile, block: ScaleBlock | None, key: str, scale_key: str) -> tuple[Any, str]:
    """The scale block's ``key`` when it gives one (null included), else the file's; with its dotted key."""
    if block is not None and getattr(block, key) is not UNSET:
        return getattr(block, key), f"{scale_key}.{key}"
    return getattr(spec, key), key


def _chosen_scale(spec: AblationFile, source: str, smoke: bool, scale: str | None
                  ) -> tuple[str | None, ScaleBlock | None, str]:
    """(scale name, its block, its dotted key); ``--smoke`` is the scale named smoke."""
    if smoke and scale not in (None, "smoke"):
        raise ConfigError(source, "--scale", f"--smoke is the scale named smoke; give --smoke or --scale {scale}")
    scale = "smoke" if smoke else scale
    if scale is None:
        return None, None, "smoke"
    block, key = spec.scale(scale, source)
    return scale, block, key


def _design(spec: AblationFile, block: ScaleBlock | None, scale_key: str, source: str) -> _Design:
    grid_raw, grid_key = _pick(spec, block, "grid", scale_key)
    zip_raw, zip_key = _pick(spec, block, "zip", scale_key)
    rep_raw, rep_key = _pick(spec, block, "repetition", scale_key)
    design = _Design(parse_axes(grid_raw, source, grid_key), grid_key, parse_axes(zip_raw, source, zip_key), zip_key,
                     parse_repetition(rep_raw, source, rep_key))
    _check_distinct_keys(design.axes, source, "grid/zip/repetition")
    return design


def _expand_variant(var_name: str, spec: dict[str, Any], var_key: str, design: _Design, source: str,
                    start: int) -> list[Variant]:
    """One ``variants:`` entry (or the whole file when it has none) x its own axes x the file's axes x repetition;
    ``start``: the declared index of its first point."""
    if var_name and not NAME.fullmatch(var_name):
        raise ConfigError(source, var_key, f"variant names use letters, digits, '-', '_', '.'; got {var_name!r}")
    overrides = _normalize_overrides({k: v for k, v in spec.items() if k not in VARIANT_KEYS}, source, var_key)
    for reserved in ("name", "seed"):
        if reserved in overrides:
            raise ConfigError(source, f"{var_key}.{reserved}", "set by the ablation runner (run name and seeds)")
    grid_own = parse_axes(spec.get("grid"), source, f"{var_key}.grid")
    zip_own = parse_axes(spec.get("zip"), source, f"{var_key}.zip")
    _check_distinct_keys(grid_own + zip_own + design.axes, source, var_key or "grid")
    combos = itertools.product(_points(grid_own, "grid", source, f"{var_key}.grid"),
                               _points(zip_own, "zip", source, f"{var_key}.zip"),
                               _points(design.grid, "grid", source, design.grid_key),
                               _points(design.zip, "zip", source, design.zip_key),
                               design.repetition or [None])
    return [_variant(var_name, overrides, [*g_own, *z_own, *g_top, *z_top], rep, start + i)
            for i, (g_own, z_own, g_top, z_top, rep) in enumerate(combos)]


def _variant(var_name: str, overrides: dict[str, Any], points: list[tuple[Axis, str, Any]],
             rep: tuple[str, dict[str, Any], dict[str, Any]] | None, index: int) -> Variant:
    """One design point: the variant's overrides with each axis value set, named by the labels."""
    merged = copy.deepcopy(overrides)
    fragments = [var_name] if var_name else []
    swept: dict[str, Any] = {}
    for axis, label, value in points:
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
    return Variant("-".join(fragments) or "base", group or "base", rep_label, merged, swept, index)


def _check_scale_overrides(variants: list[Variant], overrides: dict[str, Any], scale_key: str, source: str) -> None:
    """A scale's overrides must not overwrite what a variant sets (the comparison would silently vanish)."""
    scale_leaves = leaf_keys(overrides)
    for variant in variants:
        for swept_key in leaf_keys(variant.overrides):
            clash = next((k for k in scale_leaves if keys_overlap(k, swept_key)), None)
            if clash is not None:
                raise ConfigError(source, f"{scale_key}.overrides.{clash}", f"would overwrite {swept_key}, "
                                  f"which variant {variant.name!r} sets; replace the axis under {scale_key}: "
                                  "instead")


def _seed_list(seeds: int | list[int] | None, default: int) -> list[int]:
    """The file's (checked) seeds as a list; default: the base config's seed."""
    if seeds is None:
        return [default]
    return list(seeds) if isinstance(seeds, list) else [seeds]


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
    spec = read_ablation_file(read_yaml(path), source)
    name = spec.name or path.stem
    if not NAME.fullmatch(name):
        raise ConfigError(source, "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {name!r}")
    base = _base_config(spec.base, path)
    base.pop("name", None)
    scale, block, scale_key = _chosen_scale(spec, source, smoke, scale)
    scale_overrides = _normalize_overrides(block.overrides if block else None, source, f"{scale_key}.overrides")
    if scale not in (None, "smoke"):
        name = f"{name}-{scale}"
    seeds = _seed_list(_pick(spec, block, "seeds", scale_key)[0], int(base.get("seed", RunConfig.seed)))
    design = _design(spec, block, scale_key, source)
    variants: list[Variant] = []
    for var_name, var_spec, var_key in _explicit_variants(spec.variants, source) or [("", {}, "")]:
        variants += _expand_variant(var_name, var_spec, var_key, design, source, len(variants))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(source, "variants", f"two design points get the same name {duplicates[0]!r}; give axis "
                          "values labels (values: {label: value}) or rename the variants")
    _check_scale_overrides(variants, scale_overrides, scale_key, source)
    if only:
        variants = select_variants(variants, list(only), source)
    root = Path(results_root) if results_root is not None else results_dir()
    ablation = Ablation(name, path, spec.description or "", scale == "smoke", variants, seeds, spec.parallel,
                        spec.slurm, scale=scale)
    for variant in variants:
        for seed in seeds:
            values = deep_merge(deep_merge(base, variant.overrides), scale_overrides)
            values = deep_merge(values, {"name": f"{name}-{variant.name}-seed{seed}", "seed": seed})
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
