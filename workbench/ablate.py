"""``workbench ablate ABLATION.yaml``: expand a declarative ablation into validated run configs and run them.

An ablation file::

    name: demo                        # default: the file name; runs go to results/<name>/<variant>/seed<k>/
    description: one line for the plan and the report
    parallel: 2                       # default for --parallel (the command line wins)
    base: ../configs/small.yaml       # a run YAML (relative to this file), or an inline run-config mapping
    seeds: [0, 1]                     # training seeds (config.seed); default: the base config's seed
    variants:                         # named variants: run-config overrides (nested or dotted keys)
      ar: {}
      mask:
        algorithms: [token_masking]   # an algorithm list switches algorithms on with their defaults
        grid:                         # a variant may sweep its own axes (crossed only with itself)
          algorithms.token_masking.rate: [0.1, 0.25]
      mdm: {objective.name: mdm}
    grid:                             # cartesian product, crossed with every variant
      alpha: {key: objective.dual.ar_fraction, values: [0, 0.5, 1]}
    zip:                              # axes of equal length, stepped together
      optimizer.lr: [1e-3, 3e-3]
      scheduler.warmup: [0.01dur, 0.05dur]
    repetition:                       # the data-repetition axis: unique tokens x epochs ...
      unique_tokens: [250k, 1M]
      epochs: [4, 16]
      # ... or a fixed budget split into N unique x E repetitions: {total_tokens: 8M, epochs: [1, 4, 16]}
    smoke:                            # --smoke: tiny scale for CPU
      overrides: {model: {n_layers: 2, d_model: 64, n_heads: 2}, trainer: {max_duration: 2ep}}
      seeds: [0]
      repetition: {unique_tokens: [32k], epochs: [2]}   # smoke may replace seeds, grid, zip and repetition

A run's config is merged in this order: base, variant overrides, the variant's own grid/zip, the top-level
grid, zip and repetition, then (``--smoke``) the smoke overrides, then ``name`` and ``seed``. Axes may not
touch the same key as each other, and smoke overrides may not touch a key any variant or axis sets (they
would silently erase the comparison). Every run is validated through :func:`workbench.config.config_from_dict`
before anything trains; errors name the file, the variant and the dotted key.

Variant names join the explicit name and one fragment per axis point with ``-``: numbers and booleans are
written ``<axis><value>`` (``rate0.1``), strings as the value (``zero``), mapping values need labels
(``values: {beta: {name: beta, a: 2}}``), and repetition points ``u<unique>-ep<epochs>`` (``u250k-ep16``).
The axis name of a dotted key is its last part. Run names are ``<ablation>-<variant>-seed<k>``.

Each run folder gets a ``variant.json`` (ablation, variant, group = the name without the repetition part,
repetition label, seed, declared order, the variant's overrides and the swept values) so
:mod:`workbench.analysis` joins configs without re-reading the ablation file.

Runs: completed runs are skipped, failed or interrupted ones resumed from their latest checkpoint, and a run
whose folder holds a different config is refused (for all runs, before anything trains). By default runs go
one after another in this process through :func:`workbench.train.train`; ``--parallel N``, ``--devices`` or
``--launcher composer`` run each as ``python -m workbench.cli train <run>/config.yaml --run-dir <run> --resume``
in a subprocess (the same code path), with output in ``<run>/checkpoints/train.log``. ``--devices 0,1`` pins one
run per GPU (``CUDA_VISIBLE_DEVICES``); ``--launcher composer --nproc N`` runs each run on N GPUs through
Composer's own launcher (``python -m composer.cli -n N -m workbench.cli train ...``: one process per GPU, Composer
wraps the model in DDP and each rank reads its share of the global batch), several such runs at once when
``--devices`` lists more than N GPUs. On CPU, ``--parallel N`` gives each subprocess cores/N threads
(``OMP_NUM_THREADS``): two one-thread runs beat one two-thread run for small models. Data is prepared once per
distinct data config before any run starts, so concurrent runs never prepare the same shards; Streaming's
shared-memory registration, which is not atomic across processes, happens under a machine-wide lock
(:func:`workbench.data.streaming_registration_lock`).

The plan's time estimate divides each run's training tokens by a tokens/s figure and adds its validation
passes (forward only, taken as 3x faster than a training step) and a fixed start-up cost; the tokens/s come
from the median ``tokens_per_s`` rows already in the results folder for runs of the same shape, else from a
short probe (a few AdamW steps of the model on random tokens on this machine). The plan says which.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import itertools
import math
import os
import re
import sys
import time
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
    parse_count,
    read_yaml,
    set_dotted,
)

VARIANT_FILE = "variant.json"
TOP_KEYS = ("name", "description", "base", "seeds", "variants", "grid", "zip", "repetition", "smoke", "parallel")
VARIANT_KEYS = ("name", "description", "grid", "zip")  # everything else in a variant is a run-config override
SMOKE_KEYS = ("overrides", "seeds", "grid", "zip", "repetition")
REPETITION_KEYS = ("unique_tokens", "epochs", "total_tokens")
STARTUP_S = 5.0  # per-run start-up (imports, model and trainer construction) measured for tiny models on CPU
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
    runs: list[PlannedRun] = field(default_factory=list)


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


def _smoke_section(data: dict[str, Any], source: str) -> dict[str, Any]:
    raw = data.get("smoke")
    if raw is None:
        raise ConfigError(source, "smoke", "--smoke needs a smoke: block in the ablation file")
    if not isinstance(raw, dict):
        raise ConfigError(source, "smoke", "expected a mapping with overrides, seeds, grid, zip, repetition")
    check_keys(raw, SMOKE_KEYS, source, "smoke", hint=" (run-config changes go under smoke.overrides)")
    return raw


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
                  results_root: str | Path | None = None) -> Ablation:
    """Read an ablation file and expand it into validated runs (nothing is prepared or trained)."""
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
    smoke_raw = _smoke_section(data, source) if smoke else {}
    smoke_overrides = _normalize_overrides(smoke_raw.get("overrides"), source, "smoke.overrides")

    def pick(key: str) -> tuple[Any, str]:
        return (smoke_raw[key], f"smoke.{key}") if key in smoke_raw else (data.get(key), key)

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
                    raise ConfigError(source, f"smoke.overrides.{clash}", f"would overwrite {swept_key}, which "
                                      f"variant {variant.name!r} sets; replace the axis under smoke: instead")

    if only:
        variants = select_variants(variants, list(only), source)

    root = Path(results_root) if results_root is not None else results_dir()
    parallel = data.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(source, "parallel", f"expected a whole number >= 1, got {parallel!r}")
    ablation = Ablation(name, path, str(data.get("description") or ""), smoke, variants, seeds, parallel)
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


# --------------------------------------------------------------------------------------------------------------
# plan: states and time estimate


def assess(runs: list[PlannedRun]) -> None:
    """Set each run's state: new, resume, complete or changed (a different config in its folder)."""
    from workbench.results import read_summary
    from workbench.train import RunExistsError, check_run_dir

    for run in runs:
        try:
            run.state = check_run_dir(run.config, run.run_dir, resume=True)
        except RunExistsError as err:
            run.state, run.detail = "changed", str(err)
            continue
        if run.state == "resume":
            summary = read_summary(run.run_dir) or {}
            run.detail = f"was {summary.get('status', 'unknown')}"


def planned_epochs(config: RunConfig) -> float:
    """Epochs of the unique-token budget a run will see (from trainer.max_duration)."""
    unique = (config.data.unique_tokens // config.data.seq_len) * config.data.seq_len
    value = config.trainer.max_duration
    number = float(re.match(r"[0-9.]+", value).group(0))  # type: ignore[union-attr]
    if value.endswith("ep"):
        return number
    if value.endswith("tok"):
        return number / unique
    if value.endswith("sp"):
        return number * config.data.seq_len / unique
    if value.endswith("ba"):
        return number * config.data.batch_size * config.data.seq_len / unique
    raise ValueError(value)


def planned_tokens(config: RunConfig) -> int:
    unique = (config.data.unique_tokens // config.data.seq_len) * config.data.seq_len
    return round(planned_epochs(config) * unique)


def _eval_passes(config: RunConfig) -> float:
    """How many validation passes a run makes (Composer also evaluates at the end)."""
    interval = config.eval.interval
    number = float(re.match(r"[0-9.]+", interval).group(0))  # type: ignore[union-attr]
    if interval.endswith("dur"):
        return 1.0 / number if number else 1.0
    epochs = planned_epochs(config)
    unique = (config.data.unique_tokens // config.data.seq_len) * config.data.seq_len
    per_epoch = {"ep": 1 / number, "tok": unique / number,
                 "sp": unique / config.data.seq_len / number,
                 "ba": unique / (config.data.seq_len * config.data.batch_size) / number}
    unit = next(u for u in ("tok", "ep", "sp", "ba") if interval.endswith(u))
    return max(1.0, math.floor(epochs * per_epoch[unit] + 1e-9))


def _vocab_size(config: RunConfig) -> int:
    tokenizer = config.data.tokenizer
    return tokenizer.vocab_size if tokenizer.kind == "bpe" else {"gpt2": 50258, "bert": 30523}[tokenizer.kind]


def shape_key(config: RunConfig) -> tuple:
    """Runs with equal keys train at the same speed (objectives and regularizers cost about the same)."""
    m, d = config.model, config.data
    return (m.n_layers, m.d_model, m.n_heads, m.mlp_ratio, d.seq_len, d.batch_size, _vocab_size(config),
            config.trainer.precision, config.trainer.device)


def measured_throughput(root: Path, runs: list[PlannedRun]) -> dict[tuple, tuple[float, int]]:
    """shape key -> (median tokens/s, number of rows) from the metrics of runs already in ``root``."""
    import warnings

    import polars as pl

    from workbench.results import METRICS_FILE, read_metrics

    keys = {run.run_dir.resolve(): shape_key(run.config) for run in runs}
    by_key: dict[tuple, list[float]] = {}
    for path in sorted(root.rglob(METRICS_FILE)) if root.is_dir() else []:
        if "checkpoints" in path.parts:
            continue
        key = keys.get(path.parent.resolve())
        if key is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = read_metrics(path)
        if frame is None:
            continue
        values = frame.filter((pl.col("split") == "train") & (pl.col("metric") == "tokens_per_s"))["value"]
        by_key.setdefault(key, []).extend(values.to_list())
    return {key: (float(sorted(v)[len(v) // 2]), len(v)) for key, v in by_key.items() if v}


def probe_throughput(config: RunConfig, steps: int = 4, threads: int | None = None) -> float:
    """Tokens/s of a few AdamW steps of this model on random tokens (no data preparation needed)."""
    import torch

    from workbench.model import Transformer, TransformerConfig
    from workbench.objectives import ar_loss

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        device = "cuda" if torch.cuda.is_available() and config.trainer.device != "cpu" else "cpu"
        vocab = _vocab_size(config)
        net = Transformer(TransformerConfig(vocab_size=vocab, max_seq_len=config.data.seq_len,
                                            n_layers=config.model.n_layers, d_model=config.model.d_model,
                                            n_heads=config.model.n_heads, mlp_ratio=config.model.mlp_ratio,
                                            attention="sdpa")).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        batch = min(config.data.batch_size, config.trainer.microbatch_size or config.data.batch_size)
        tokens = torch.randint(0, vocab, (batch, config.data.seq_len), device=device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32

        def step() -> None:
            with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
                loss = ar_loss(net, tokens)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * tokens.numel() / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def _tokens_done(run: PlannedRun) -> int:
    """Training tokens an interrupted run already has (resume continues from its latest checkpoint)."""
    import warnings

    from workbench.results import METRICS_FILE, read_metrics

    if run.state != "resume" or not (run.run_dir / METRICS_FILE).is_file():
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = read_metrics(run.run_dir / METRICS_FILE)
    return int(frame["tokens_seen"].max() or 0) if frame is not None and frame.height else 0


def estimate(ablation: Ablation, root: Path, parallel: int, probe: bool = True) -> tuple[dict[str, float], str]:
    """Seconds per run name still to train (complete runs: 0), and where the tokens/s came from."""
    measured = measured_throughput(root, ablation.runs)
    pending = [run for run in ablation.runs if run.state in ("new", "resume")]
    speeds: dict[tuple, float] = {}
    sources: list[str] = []
    for run in pending:
        key = shape_key(run.config)
        if key in speeds:
            continue
        if key in measured:
            speeds[key] = measured[key][0]
            sources.append(f"median of {measured[key][1]} 'tokens_per_s' rows in {root / ablation.name}")
        elif probe:
            threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
            speeds[key] = probe_throughput(run.config, threads=threads)
            sources.append(f"a 4-step probe of the {run.config.model.n_layers}x{run.config.model.d_model} model on "
                           "this machine")
    seconds: dict[str, float] = {}
    for run in ablation.runs:
        if run.state not in ("new", "resume") or shape_key(run.config) not in speeds:
            seconds[run.name] = 0.0
            continue
        speed = speeds[shape_key(run.config)]
        metrics = run.config.eval_metrics  # forward passes per validation token: 1 for ar_nll, K for the NELBO
        forwards = ("ar_nll" in metrics) + run.config.eval.nelbo_samples * ("mdm_nelbo" in metrics)
        eval_tokens = _eval_passes(run.config) * run.config.data.val_tokens * forwards
        remaining = max(0.0, 1.0 - _tokens_done(run) / max(1, planned_tokens(run.config)))
        seconds[run.name] = remaining * (planned_tokens(run.config) / speed + eval_tokens / (3 * speed)) + STARTUP_S
    if not pending:
        source = "nothing left to train"
    elif not speeds:
        source = "nothing: no measured runs of this shape and the probe is off"
    else:
        source = "; ".join(dict.fromkeys(sources))
    return seconds, source


def format_plan(ablation: Ablation, seconds: dict[str, float] | None, source: str, parallel: int) -> str:
    """The plan table printed before anything runs."""
    header = f"ablation {ablation.name} ({ablation.path}{', smoke scale' if ablation.smoke else ''})"
    lines = [header]
    if ablation.description:
        lines.append(f"  {ablation.description}")
    columns = ["variant", "seed", "objective", "unique", "epochs", "tokens", "state", "estimate"]
    rows = []
    total_tokens = 0
    for run in ablation.runs:
        tokens = planned_tokens(run.config)
        total_tokens += tokens
        state = run.state + (f" ({run.detail})" if run.detail and run.state == "resume" else "")
        rows.append([run.variant.name, str(run.seed), run.config.objective.name,
                     format_count(run.config.data.unique_tokens), f"{planned_epochs(run.config):g}",
                     format_count(tokens), state.upper() if run.state == "changed" else state,
                     format_seconds(seconds[run.name]) if seconds and seconds.get(run.name) else "-"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.extend("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)
    counts = {s: sum(r.state == s for r in ablation.runs) for s in ("new", "resume", "complete", "changed")}
    lines.append(f"{len(ablation.runs)} runs ({len(ablation.variants)} variants x {len(ablation.seeds)} seeds), "
                 f"{format_count(total_tokens)} training tokens; " + ", ".join(f"{n} {s}" for s, n in counts.items()
                                                                                if n))
    if seconds is None or not counts["new"] + counts["resume"]:
        pass
    elif not any(seconds.values()):
        lines.append(f"estimated time: unknown; tokens/s from {source}")
    else:
        total = sum(seconds.values())
        wall = total / max(1, parallel)
        lines.append(f"estimated time: {format_seconds(wall)}" + (f" ({format_seconds(total)} of runs / {parallel} "
                     "at once)" if parallel > 1 else "") + f"; tokens/s from {source}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# running


def write_variant_file(run: PlannedRun, ablation: Ablation) -> None:
    from workbench.results import write_json

    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / VARIANT_FILE, run.variant_record(str(ablation.path), ablation.smoke))


def prepare_data(runs: list[PlannedRun], log: Callable[[str], None] = print) -> None:
    """Prepare each distinct data config once, before any run starts (concurrent runs then only read)."""
    from datasets_prep.corpus import prepare

    seen: list[Any] = []
    for run in runs:
        if run.config.data in seen:
            continue
        seen.append(run.config.data)
        prepare(run.config.data, log=log)


def run_in_process(runs: list[PlannedRun], ablation: Ablation, log: Callable[[str], None] = print) -> list[str]:
    """Train ``runs`` one after another through workbench.train.train; returns the names that failed."""
    from workbench.train import train

    failed = []
    for i, run in enumerate(runs, 1):
        log(f"[ablate] {i}/{len(runs)} {run.name} ({run.state}) -> {run.run_dir}")
        write_variant_file(run, ablation)
        start = time.time()
        try:
            summary = train(run.config, run_dir=run.run_dir, resume=True, log=log)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failed run must not stop the others; it resumes next time
            failed.append(run.name)
            log(f"[ablate] {run.name} FAILED: {type(err).__name__}: {err}")
            continue
        log(f"[ablate] {run.name} done in {format_seconds(time.time() - start)}{_best_text(summary)}")
    return failed


def _best_text(summary: dict[str, Any]) -> str:
    best = {k: v for k, v in summary.items() if k in ("best_ar_nll", "best_mdm_nelbo")}
    return "".join(f"; {k} {v:.4f}" for k, v in best.items())


@dataclass
class Slot:
    """Where one subprocess runs: its CUDA devices (None on CPU), processes per run and a rendezvous port."""

    devices: list[str] | None
    nproc: int
    port: int
    threads: int | None


def make_slots(parallel: int, devices: list[str] | None, launcher: str, nproc: int) -> list[Slot]:
    """Split the machine into concurrent slots. composer launcher: one slot per group of ``nproc`` GPUs (all of
    them), or one CPU slot; ``--devices``: one slot per GPU (cycled when ``parallel`` asks for more); CPU:
    ``parallel`` slots sharing the cores' threads."""
    if launcher == "composer":
        if not devices:
            return [Slot(None, nproc, 29500, None)]
        groups = [devices[i:i + nproc] for i in range(0, len(devices) - nproc + 1, nproc)]
        return [Slot(group, nproc, 29500 + 17 * i, None) for i, group in enumerate(groups)]
    if devices:
        return [Slot([devices[i % len(devices)]], 1, 0, None) for i in range(max(parallel, len(devices)))]
    cores = os.cpu_count() or 1
    return [Slot(None, 1, 0, max(1, cores // parallel) if parallel > 1 else None) for _ in range(parallel)]


def subprocess_command(run: PlannedRun, slot: Slot, launcher: str) -> list[str]:
    train_args = ["train", str(run.run_dir / "config.yaml"), "--run-dir", str(run.run_dir), "--resume"]
    if launcher == "composer":
        return [sys.executable, "-m", "composer.cli", "-n", str(slot.nproc), "--master_port", str(slot.port),
                "-m", "workbench.cli", *train_args]
    return [sys.executable, "-m", "workbench.cli", *train_args]


def run_subprocesses(runs: list[PlannedRun], ablation: Ablation, slots: list[Slot], launcher: str,
                     log: Callable[[str], None] = print) -> list[str]:
    """Run each run as a ``workbench train`` subprocess, at most one per slot at a time, started in plan order;
    returns the names that failed. (Concurrent runs register Streaming's shared memory one at a time, see
    workbench.data.streaming_registration_lock.)"""
    import queue
    import subprocess
    import threading

    from workbench.config import dump_config
    from workbench.results import read_summary

    free: queue.Queue[Slot] = queue.Queue()
    for slot in slots:
        free.put(slot)
    failed: list[str] = []
    processes: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()

    def launch(run: PlannedRun, slot: Slot, log_path: Path) -> int:
        env = dict(os.environ)
        if slot.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.devices)
        if slot.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
        with log_path.open("ab") as handle:
            process = subprocess.Popen(subprocess_command(run, slot, launcher), stdout=handle,
                                       stderr=subprocess.STDOUT, env=env)
        with lock:
            processes[run.name] = process
        code = process.wait()
        with lock:
            processes.pop(run.name, None)
        return code

    def work(index: int, run: PlannedRun, slot: Slot) -> None:
        try:
            write_variant_file(run, ablation)
            (run.run_dir / "config.yaml").write_text(dump_config(run.config))  # what `workbench train` reads
            log_path = run.run_dir / "checkpoints" / "train.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            where = f" on GPU {','.join(slot.devices)}" if slot.devices else ""
            log(f"[ablate] {index}/{len(runs)} start {run.name} ({run.state}){where}; log {log_path}")
            start = time.time()
            code = launch(run, slot, log_path)
            if code != 0:
                with lock:
                    failed.append(run.name)
                tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
                log(f"[ablate] {run.name} FAILED (exit {code}); last lines of {log_path}:\n    " + "\n    ".join(tail))
            else:
                summary = read_summary(run.run_dir) or {}
                log(f"[ablate] {run.name} done in {format_seconds(time.time() - start)}{_best_text(summary)}")
        finally:
            free.put(slot)

    threads = []
    try:
        for index, run in enumerate(runs, 1):
            while True:  # wait for a free slot (with a timeout, so Ctrl-C is seen)
                try:
                    slot = free.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            thread = threading.Thread(target=work, args=(index, run, slot), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        with lock:
            for process in processes.values():
                process.terminate()
        raise
    return failed


# --------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ablation", help="ablation YAML (see ablations/)")
    parser.add_argument("--dry-run", action="store_true", help="expand, validate and print the plan; train nothing")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only these variants: names, group names or shell patterns (repeatable, or "
                        "comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="apply the file's smoke: block (tiny, CPU-sized runs)")
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="runs at once, each a `workbench train` subprocess (CPU threads are split between them); "
                        "default: the file's parallel: key, else 1")
    parser.add_argument("--devices", help="GPU ids, e.g. 0,1,2,3: one run per GPU at a time (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--launcher", choices=["none", "composer"], default="none",
                        help="composer: run each run on --nproc GPUs with Composer's launcher (DDP/FSDP)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (GPUs) per run with --launcher composer "
                        "(default: all of --devices, else all visible GPUs)")
    parser.add_argument("--results", help="results root (default $WORKBENCH_RESULTS or results/)")
    parser.add_argument("--no-probe", action="store_true", help="skip the throughput probe when no runs were measured")


def _devices(args: argparse.Namespace, launcher: str) -> tuple[list[str] | None, int]:
    """Validated GPU ids (None: CPU or no pinning) and processes per run."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    nproc = args.nproc
    if launcher != "composer" and not devices:
        if nproc not in (None, 1):
            raise ConfigError("command line", "--nproc", "processes per run need --launcher composer")
        return None, 1
    import torch

    visible = torch.cuda.device_count()
    if devices is None and visible:
        devices = [str(i) for i in range(visible)]
    if devices and any(not d.isdigit() or int(d) >= visible for d in devices):
        raise ConfigError("command line", "--devices", f"{args.devices!r}: this machine has {visible} CUDA device(s)")
    nproc = nproc or (len(devices) if devices and launcher == "composer" else 1)
    if devices and nproc > len(devices):
        raise ConfigError("command line", "--nproc", f"{nproc} processes per run but only {len(devices)} devices")
    return devices, nproc


def run(args: argparse.Namespace) -> int:
    from workbench.paths import results_dir

    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError("command line", "--parallel", "must be >= 1")
    launcher = args.launcher
    ablation = load_ablation(args.ablation, smoke=args.smoke, only=only or None, results_root=args.results)
    devices, nproc = _devices(args, launcher)
    root = Path(args.results) if args.results else results_dir()

    assess(ablation.runs)
    pending = [run for run in ablation.runs if run.state in ("new", "resume")]
    parallel = min(args.parallel or ablation.parallel or 1, max(1, len(pending)))
    subprocesses = parallel > 1 or devices is not None or launcher == "composer"
    slots = make_slots(parallel, devices, launcher, nproc)
    concurrent = min(len(slots), max(1, len(pending))) if subprocesses else 1
    seconds, source = estimate(ablation, root, concurrent, probe=not args.no_probe)
    print(format_plan(ablation, seconds, source, concurrent), flush=True)
    changed = [run for run in ablation.runs if run.state == "changed"]
    if changed:
        for run in changed:
            print(f"error: {run.detail}", file=sys.stderr)
        print(f"error: {len(changed)} run(s) of {ablation.name} exist with a different config; nothing was run",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    for run in ablation.runs:
        if run.state == "complete":
            write_variant_file(run, ablation)  # keep the metadata current
    if not pending:
        print(f"[ablate] all {len(ablation.runs)} runs are complete; nothing to do")
        return 0
    start = time.time()
    prepare_data(pending)
    try:
        if subprocesses:
            failed = run_subprocesses(pending, ablation, slots, launcher)
        else:
            failed = run_in_process(pending, ablation)
    except KeyboardInterrupt:
        print(f"\n[ablate] interrupted after {format_seconds(time.time() - start)}; run the same command again to "
              "resume (finished runs are kept, interrupted ones continue from their latest checkpoint)",
              file=sys.stderr)
        return 130
    done = len(pending) - len(failed)
    print(f"[ablate] {ablation.name}: {done}/{len(pending)} runs finished in {format_seconds(time.time() - start)}; "
          f"results in {root / ablation.name}")
    if failed:
        print(f"[ablate] failed: {', '.join(failed)} (run the same command again to resume them)", file=sys.stderr)
        return 1
    return 0
