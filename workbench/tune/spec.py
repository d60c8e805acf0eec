"""The study YAML: its search space, objectives, sampler/pruner options and budget, validated completely (every
parameter's representative values build a run config) before any trial starts."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from workbench.config import (
    ConfigError,
    RunConfig,
    check_keys,
    config_from_dict,
    deep_merge,
    parse_count,
    parse_duration,
    read_yaml,
    resolve_base,
    set_dotted,
)
from workbench.paths import results_dir
from workbench.tune.study import make_pruner, make_sampler

if TYPE_CHECKING:
    import optuna

STUDY_KEYS = ("name", "description", "run", "search_space", "objective", "objectives", "sampler", "pruner",
              "n_trials", "budget", "seeds", "enqueue", "retry", "heartbeat", "storage", "smoke")
PARAM_KEYS = ("type", "low", "high", "step", "log", "choices", "grid")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "grid", "nsgaii")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")
STEP_OPTIONS = ("n_warmup_steps", "interval_steps", "min_resource", "max_resource")
RESERVED = {"name": "trials are named <study>-trial-<n>", "seed": "use the study's seeds:",
            "trainer.max_duration": "use the study's budget:"}
SCALARS = (type(None), bool, int, float, str)


def _number(value: Any, source: str, key: str) -> float:
    """YAML reads ``1e-4`` (no dot) as a string; accept it, reject anything else that is not a number."""
    if isinstance(value, bool):
        raise ConfigError(source, key, f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(source, key, f"expected a number, got {value!r}")


def _label(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1000).strip()


@dataclass
class Param:
    """One searched run-config key and its distribution."""

    path: str
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    options: list[Any] = field(default_factory=list)  # what Optuna stores (scalars or labels)
    values: list[Any] = field(default_factory=list)  # the config value of each option
    grid: list[Any] | None = None

    @property
    def depth(self) -> int:
        return self.path.count(".")

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.options)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, self.options)
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def config_value(self, option: Any) -> Any:
        """Optuna's stored value -> the value written into the run config."""
        if self.kind == "categorical":
            return copy.deepcopy(self.values[self.options.index(option)])
        return int(option) if self.kind == "int" else float(option)

    def representatives(self) -> list[Any]:
        if self.kind == "categorical":
            return list(self.options)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def option_for(self, value: Any, source: str, key: str) -> Any:
        """A user-written value (enqueue) -> Optuna's stored value, checked against the distribution."""
        if self.kind == "categorical":
            if isinstance(value, bool) and {True: "on", False: "off"}[value] in self.options:
                return {True: "on", False: "off"}[value]  # an unquoted on/off label
            if value in self.options:
                return value
            for option, choice in zip(self.options, self.values):
                if choice == value:
                    return option
            raise ConfigError(source, key, f"{value!r} is not one of the choices {self.options}")
        number = _number(value, source, key)
        if not self.low <= number <= self.high:
            raise ConfigError(source, key, f"{value!r} is outside [{self.low:g}, {self.high:g}]")
        if self.kind == "int":
            if not number.is_integer():
                raise ConfigError(source, key, f"expected an integer, got {value!r}")
            return int(number)
        return number

    def grid_values(self) -> list[Any] | None:
        if self.grid is not None:
            return list(self.grid)
        if self.kind == "categorical":
            return list(self.options)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step is not None:
            count = round((self.high - self.low) / self.step)
            return [round(self.low + i * self.step, 12) for i in range(count + 1)]
        return None


def parse_param(path: str, raw: Any, source: str) -> Param:
    """Validate one search-space entry (shape and ranges; the config check comes later)."""
    key = f"search_space.{path}"
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise ConfigError(source, key, "parameter paths are dotted run-config keys, e.g. algorithms.dropout.mlp")
    for reserved, hint in RESERVED.items():
        if path == reserved:
            raise ConfigError(source, key, f"is set per trial, not searchable ({hint})")
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected a mapping such as {low: 0.0, high: 0.5}, "
                          "{type: int, low: 1, high: 4} or {choices: [a, b]}")
    check_keys(raw, PARAM_KEYS, source, key)
    kind = raw.get("type", "categorical" if "choices" in raw else "float")
    if kind not in ("float", "int", "categorical", "bool"):
        raise ConfigError(source, f"{key}.type", f"{kind!r} is not one of float, int, categorical, bool")
    if kind in ("categorical", "bool"):
        extra = [name for name in ("low", "high", "step", "log") if name in raw]
        if extra:
            raise ConfigError(source, f"{key}.{extra[0]}", f"not used by a {kind} parameter")
        choices = raw.get("choices", [False, True] if kind == "bool" else None)
        if isinstance(choices, dict):  # YAML 1.1 reads the labels on/off (yes/no) as booleans
            options = [{True: "on", False: "off"}.get(label, str(label)) if isinstance(label, bool) else str(label)
                       for label in choices]
            values = list(choices.values())
        elif isinstance(choices, list):
            values = list(choices)
            plain = all(isinstance(v, SCALARS) for v in values)
            options = list(values) if plain else [_label(v) for v in values]
        else:
            raise ConfigError(source, f"{key}.choices", "expected a list of choices or a mapping label -> value")
        if not options:
            raise ConfigError(source, f"{key}.choices", "is empty: give at least two choices")
        if len(options) < 2:
            raise ConfigError(source, f"{key}.choices", "a single choice is a fixed value: put it in run: instead")
        if len({json.dumps(o, sort_keys=True) for o in options}) != len(options):
            raise ConfigError(source, f"{key}.choices", f"choices must be distinct, got {options}")
        grid = raw.get("grid")
        if grid is not None:
            raise ConfigError(source, f"{key}.grid", "a categorical parameter's grid is its choices")
        return Param(path, "categorical", options=options, values=values)

    for name in ("low", "high"):
        if name not in raw:
            raise ConfigError(source, f"{key}.{name}", f"a {kind} range needs low and high")
    if "choices" in raw:
        raise ConfigError(source, f"{key}.choices", f"not used by a {kind} parameter (drop type: to use choices)")
    low, high = _number(raw["low"], source, f"{key}.low"), _number(raw["high"], source, f"{key}.high")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(source, key, "low and high must be finite")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(source, f"{key}.log", f"expected true or false, got {log!r}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(source, key, f"an int range needs integer bounds, got [{raw['low']}, {raw['high']}]")
    if low >= high:
        raise ConfigError(source, key, f"empty range: low ({raw['low']}) must be below high ({raw['high']}); "
                          "a fixed value belongs in run:")
    if log and low <= 0:
        raise ConfigError(source, f"{key}.low", f"a log range must lie above 0, got low={raw['low']}")
    step = raw.get("step")
    if step is not None:
        step = _number(step, source, f"{key}.step")
        if step <= 0 or (kind == "int" and not step.is_integer()):
            raise ConfigError(source, f"{key}.step", f"must be a positive {'integer' if kind == 'int' else 'number'}")
        if step > high - low:
            raise ConfigError(source, f"{key}.step", f"step {step:g} is larger than the range [{low:g}, {high:g}]")
        if log and (kind == "float" or step != 1):
            raise ConfigError(source, f"{key}.step", "a log range cannot have a step")
    param = Param(path, kind, low=low, high=high, step=step, log=log)
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            raise ConfigError(source, f"{key}.grid", "expected a non-empty list of values inside the range")
        param.grid = [param.option_for(value, source, f"{key}.grid") for value in grid]
    return param


@dataclass
class Objective:
    """``split/metric`` as in metrics.parquet (``val/ar_nll``, ``hellaswag/acc_norm``), reduced over evaluations."""

    split: str
    metric: str
    reduce: str  # best | final
    direction: str  # minimize | maximize

    @property
    def name(self) -> str:
        return f"{self.split}/{self.metric}"

    def reduce_values(self, values: list[float]) -> float:
        if self.reduce == "final":
            return values[-1]
        return min(values) if self.direction == "minimize" else max(values)


def parse_objective(raw: Any, source: str, key: str) -> Objective:
    if isinstance(raw, str):
        raw = {"metric": raw}
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected {metric: val/ar_nll, reduce: best, direction: minimize}")
    check_keys(raw, ("metric", "reduce", "direction"), source, key)
    metric = raw.get("metric")
    if not isinstance(metric, str) or metric.count("/") != 1 or not all(metric.split("/")):
        raise ConfigError(source, f"{key}.metric", f"expected split/metric such as val/ar_nll or "
                          f"hellaswag/acc_norm, got {metric!r}")
    split, name = metric.split("/")
    reduce = raw.get("reduce", "best")
    if reduce not in ("best", "final"):
        raise ConfigError(source, f"{key}.reduce", f"{reduce!r} is not one of best, final")
    direction = raw.get("direction")
    if direction is None:
        if name in ("ar_nll", "mdm_nelbo") or "loss" in name or "nll" in name:
            direction = "minimize"
        elif name.startswith("acc"):
            direction = "maximize"
        else:
            raise ConfigError(source, f"{key}.direction", f"say whether to minimize or maximize {metric}")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(source, f"{key}.direction", f"{direction!r} is not one of minimize, maximize")
    return Objective(split, name, reduce, direction)


def _steps(value: Any, unique_tokens: int, source: str, key: str) -> Any:
    """Pruner step options are in tokens (the report step): ints, counts ('16k'), 'Ntok', 'Nep' or 'auto'."""
    if value == "auto" or value is None:
        return value
    try:
        if isinstance(value, str) and value.strip().endswith("ep"):
            return round(float(value.strip()[:-2]) * unique_tokens)
        if isinstance(value, str) and value.strip().endswith("tok"):
            value = value.strip()[:-3]
        return parse_count(value)
    except ValueError as err:
        raise ConfigError(source, key, f"{err} (pruner steps are tokens seen: 40000, '2M', '2Mtok' or "
                          "'1.5ep')") from None


@dataclass
class StudySpec:
    """A validated study YAML."""

    path: Path
    name: str
    description: str
    run: dict[str, Any]
    params: list[Param]
    objectives: list[Objective]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    budget: str | None
    seeds: list[int]
    enqueue: list[dict[str, Any]]
    max_retry: int
    retry_errors: bool
    heartbeat_interval: int
    grace_period: int
    storage: str | None

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @property
    def results(self) -> Path:
        return results_dir() / self.name

    def run_dir(self, number: int, seed: int) -> Path:
        trial = self.results / f"trial-{number}"
        return trial if len(self.seeds) == 1 else trial / f"seed-{seed}"

    def trial_values(self, choose: Callable[[Param], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Walk the search space parents first; ``choose`` gives Optuna's value for a parameter. Returns
        (Optuna params, config values by path); parameters under a section switched off here are skipped."""
        chosen: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for param in sorted(self.params, key=lambda p: p.depth):
            if any(param.path.startswith(f"{path}.") and value is None for path, value in chosen.items()):
                continue
            option = choose(param)
            params[param.path] = option
            chosen[param.path] = param.config_value(option)
        return params, chosen

    def trial_config(self, values: dict[str, Any], number: int | None, seed: int) -> RunConfig:
        data = copy.deepcopy(self.run)
        for path in sorted(values, key=lambda p: p.count(".")):
            set_dotted(data, path, copy.deepcopy(values[path]))
        suffix = "" if len(self.seeds) == 1 else f"-seed{seed}"
        data["name"] = f"{self.name}-trial-{'x' if number is None else number}{suffix}"
        data["seed"] = seed
        if self.budget is not None:
            data.setdefault("trainer", {})["max_duration"] = self.budget
        return config_from_dict(data, "trial config")

    def fingerprint(self) -> dict[str, Any]:
        """What makes trials comparable: a study started again must match it."""
        return json.loads(json.dumps({
            "run": self.run, "search_space": [p.__dict__ for p in self.params],
            "objectives": [o.__dict__ for o in self.objectives], "budget": self.budget, "seeds": self.seeds},
            default=str))


def load_study_spec(path: str | Path, smoke: bool = False, trials: int | None = None) -> StudySpec:
    """Read a study YAML (with its smoke block merged when ``smoke``) and validate it completely."""
    path = Path(path)
    source = str(path)
    raw = read_yaml(path)
    check_keys(raw, STUDY_KEYS, source)
    smoke_block = raw.pop("smoke", None)
    if smoke:
        if not isinstance(smoke_block, dict):
            raise ConfigError(source, "smoke", "--smoke needs a smoke: mapping merged over this study")
        check_keys(smoke_block, STUDY_KEYS[:-1], source, "smoke")  # everything but smoke itself
        name = raw.get("name")
        raw = deep_merge(raw, smoke_block)
        if "name" not in smoke_block and isinstance(name, str):
            raw["name"] = f"{name}-smoke"

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-_.":
        raise ConfigError(source, "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {name!r}")

    run = raw.get("run")
    if isinstance(run, str):
        run = {"base": run}
    if not isinstance(run, dict):
        raise ConfigError(source, "run", "expected the base run config (a mapping, may use base: other.yaml)")
    run = resolve_base(copy.deepcopy(run), path)
    try:
        base_config = config_from_dict({k: v for k, v in run.items() if k not in ("name",)}, source)
    except ConfigError as err:
        raise ConfigError(source, f"run.{err.key}" if err.key else "run", err.message) from None

    space = raw.get("search_space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(source, "search_space", "expected a mapping of dotted run-config keys to distributions")
    params = [parse_param(key, value, source) for key, value in space.items()]

    if "objective" in raw and "objectives" in raw:
        raise ConfigError(source, "objectives", "give objective: (one) or objectives: (several), not both")
    if "objectives" in raw:
        if not isinstance(raw["objectives"], list) or not raw["objectives"]:
            raise ConfigError(source, "objectives", "expected a non-empty list")
        objectives = [parse_objective(o, source, f"objectives[{i}]") for i, o in enumerate(raw["objectives"])]
    else:
        objectives = [parse_objective(raw.get("objective", "val/ar_nll"), source, "objective")]
    if len({o.name for o in objectives}) != len(objectives):
        raise ConfigError(source, "objectives", "each metric can appear once")

    sampler = raw.get("sampler") or {"name": "tpe"}
    if isinstance(sampler, str):
        sampler = {"name": sampler}
    if not isinstance(sampler, dict) or sampler.get("name") not in SAMPLERS:
        raise ConfigError(source, "sampler.name", f"choose one of {', '.join(SAMPLERS)}")
    pruner = raw.get("pruner", {"name": "median" if len(objectives) == 1 else "none"})
    if pruner is None or isinstance(pruner, str):
        pruner = {"name": pruner or "none"}
    if not isinstance(pruner, dict) or pruner.get("name") not in PRUNERS:
        raise ConfigError(source, "pruner.name", f"choose one of {', '.join(PRUNERS)}")
    if len(objectives) > 1 and pruner["name"] != "none":
        raise ConfigError(source, "pruner", "Optuna prunes single-objective studies only; use pruner: none")
    pruner = {k: _steps(v, base_config.data.unique_tokens, source, f"pruner.{k}") if k in STEP_OPTIONS else v
              for k, v in pruner.items()}

    budget = raw.get("budget")
    if budget is not None:
        try:
            budget = parse_duration(budget)
        except ValueError as err:
            raise ConfigError(source, "budget", str(err)) from None
        if budget.endswith("dur"):
            raise ConfigError(source, "budget", "the per-trial budget is tokens (e.g. 32Mtok), epochs or batches")

    seeds = raw.get("seeds", [base_config.seed])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(source, "seeds", "a count of seeds must be >= 1")
        seeds = [base_config.seed + i for i in range(seeds)]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(source, "seeds", f"expected a count or a list of distinct integers, got {seeds!r}")

    retry = raw.get("retry") or {}
    heartbeat = raw.get("heartbeat") or {}
    for key, block, allowed in (("retry", retry, ("max_retry", "errors")),
                                ("heartbeat", heartbeat, ("interval", "grace_period"))):
        if not isinstance(block, dict):
            raise ConfigError(source, key, f"expected a mapping with {', '.join(allowed)}")
        check_keys(block, allowed, source, key)
    max_retry, retry_errors = retry.get("max_retry", 2), retry.get("errors", False)
    if not isinstance(max_retry, int) or isinstance(max_retry, bool) or max_retry < 0:
        raise ConfigError(source, "retry.max_retry", "must be an integer >= 0")
    if not isinstance(retry_errors, bool):
        raise ConfigError(source, "retry.errors", "expected true or false")
    interval, grace = heartbeat.get("interval", 30), heartbeat.get("grace_period", 120)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ConfigError(source, "heartbeat.interval", "must be an integer number of seconds >= 1")
    if not isinstance(grace, int) or isinstance(grace, bool) or grace <= interval:
        raise ConfigError(source, "heartbeat.grace_period", f"must be an integer number of seconds > interval "
                          f"({interval})")

    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(point, dict) for point in enqueue):
        raise ConfigError(source, "enqueue", "expected a list of {parameter path: value} mappings")
    n_trials = trials if trials is not None else raw.get("n_trials", 20)
    key = "--trials" if trials is not None else "n_trials"
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(source, key, f"must be an integer >= 1, got {n_trials!r}")
    if n_trials < len(enqueue):
        raise ConfigError(source, key, f"{n_trials} trials cannot hold the {len(enqueue)} enqueued points")
    storage = raw.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise ConfigError(source, "storage", "expected an SQLAlchemy URL such as postgresql://user@host/db")
    description = raw.get("description", "")

    spec = StudySpec(path, name, str(description), run, params, objectives, dict(sampler), dict(pruner), n_trials,
                     budget, seeds, [], max_retry, retry_errors, interval, grace, storage)
    spec.enqueue = [_check_point(spec, point, i) for i, point in enumerate(enqueue)]
    validate(spec)
    return spec


def _check_point(spec: StudySpec, point: dict[str, Any], index: int) -> dict[str, Any]:
    by_path = {p.path: p for p in spec.params}
    out = {}
    for path, value in point.items():
        key = f"enqueue[{index}].{path}"
        if path not in by_path:
            raise ConfigError(spec.source, key, f"not a searched parameter (searched: {', '.join(by_path)})")
        out[path] = by_path[path].option_for(value, spec.source, key)
    return out


def _check_config(spec: StudySpec, config: RunConfig, key: str) -> None:
    """The objective must be computed by every trial's runs."""
    downstream = config.eval.downstream
    tasks = list(downstream.tasks) if downstream is not None else []
    for i, objective in enumerate(spec.objectives):
        where = "objective.metric" if len(spec.objectives) == 1 else f"objectives[{i}].metric"
        if objective.split == "val":
            if objective.metric not in config.eval_metrics:
                raise ConfigError(spec.source, where, f"{objective.name} is not computed by {key} (validation "
                                  f"metrics there: {', '.join(config.eval_metrics)}; see eval.metrics)")
        elif objective.split not in tasks:
            raise ConfigError(spec.source, where, f"{objective.name}: {objective.split!r} is not an evaluated split "
                              f"of {key} (val, or eval.downstream.tasks: {', '.join(tasks) or 'none'})")


def validate(spec: StudySpec) -> None:
    """Build a run config for every representative value of every parameter (others at their first value),
    every enqueued point, and the sampler and pruner, before any trial starts."""
    defaults = {p.path: p.representatives()[0] for p in spec.params}
    cases: list[tuple[str, dict[str, Any]]] = [("search_space", dict(defaults))]
    for param in spec.params:
        # switch on every section above this parameter that its default switches off, so it is applied
        enabled = dict(defaults)
        for parent in spec.params:
            if param.path.startswith(f"{parent.path}.") and parent.config_value(defaults[parent.path]) is None:
                enabled[parent.path] = next((o for o in parent.representatives() if parent.config_value(o)
                                             is not None), defaults[parent.path])
        for option in param.representatives():
            if option != defaults[param.path] or enabled != defaults:
                cases.append((f"search_space.{param.path}", {**enabled, param.path: option}))
    for i, point in enumerate(spec.enqueue):
        cases.append((f"enqueue[{i}]", {**defaults, **point}))
    for key, options in cases:
        _, values = spec.trial_values(lambda p, options=options: options[p.path])
        described = ", ".join(f"{path}={value!r}" for path, value in values.items())
        try:
            config = spec.trial_config(values, None, spec.seeds[0])
        except ConfigError as err:
            culprits = [path for path in values if path == err.key or err.key.startswith(f"{path}.")
                        or path.startswith(f"{err.key}.")]
            if key == "search_space" and culprits:  # name the parameter whose path the schema rejects
                key = f"search_space.{max(culprits, key=len)}"
            raise ConfigError(spec.source, key, f"with {described}: {err.key}: {err.message}") from None
        _check_config(spec, config, f"trials with {described}")
    if spec.sampler["name"] == "grid":
        if spec.enqueue:
            raise ConfigError(spec.source, "enqueue", "the grid sampler visits every grid point; drop enqueue")
        missing = [p.path for p in spec.params if p.grid_values() is None]
        if missing:
            raise ConfigError(spec.source, f"search_space.{missing[0]}", "the grid sampler needs grid: [values] "
                              "(or a step) for every float parameter")
        points = math.prod(len(p.grid_values() or []) for p in spec.params)
        if spec.n_trials > points:
            raise ConfigError(spec.source, "n_trials", f"{spec.n_trials} trials but the grid has {points} points")
    make_sampler(spec, 0)
    make_pruner(spec)
