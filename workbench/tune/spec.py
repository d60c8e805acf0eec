"""The study YAML: its search space, objectives, sampler/pruner options and budget, validated completely (every
parameter's representative values build a run config) before any trial starts."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import (
    ConfigError,
    RunConfig,
    build_dataclass,
    check_keys,
    config_from_dict,
    deep_merge,
    read_yaml,
    resolve_base,
    set_dotted,
)
from workbench.durations import tokens_of_step
from workbench.paths import results_dir
from workbench.tune.schema import (
    PARAM_HINT,
    PRUNERS,
    RESERVED,
    SAMPLERS,
    STEP_OPTIONS,
    ObjectiveEntry,
    ParamEntry,
    StudyFile,
    parse_number,
)
from workbench.tune.study import make_pruner, make_sampler

if TYPE_CHECKING:
    import optuna

STUDY_KEYS = tuple(f.name for f in fields(StudyFile))



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
        number = parse_number(value, source, key)
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
    """Validate one search-space entry (shape and ranges, via :class:`ParamEntry`; the config check comes later)."""
    key = f"search_space.{path}"
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise ConfigError(source, key, "parameter paths are dotted run-config keys, e.g. algorithms.dropout.mlp")
    if path in RESERVED:
        raise ConfigError(source, key, f"is set per trial, not searchable ({RESERVED[path]})")
    if not isinstance(raw, dict):
        raise ConfigError(source, key, PARAM_HINT)
    entry: ParamEntry = build_dataclass(ParamEntry, raw, source, key)
    if entry.kind in ("categorical", "bool"):
        options, values = entry.options()
        return Param(path, "categorical", options=options, values=values)
    assert entry.low is not None and entry.high is not None  # checked by ParamEntry
    param = Param(path, entry.kind, low=entry.low, high=entry.high, step=entry.step, log=entry.log)
    if entry.grid is not None:
        param.grid = [param.option_for(value, source, f"{key}.grid") for value in entry.grid]
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
    """An objective as written (``val/ar_nll`` or a mapping, see :class:`ObjectiveEntry`) -> Objective."""
    if isinstance(raw, str):
        raw = {"metric": raw}
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected {metric: val/ar_nll, reduce: best, direction: minimize}")
    entry: ObjectiveEntry = build_dataclass(ObjectiveEntry, raw, source, key)
    split, name = entry.metric.split("/")
    assert entry.direction is not None  # inferred by ObjectiveEntry
    return Objective(split, name, entry.reduce, entry.direction)


def _steps(value: Any, unique_tokens: int, source: str, key: str) -> Any:
    """Pruner step options are in tokens (the report step): ints, counts ('16k'), 'Ntok', 'Nep' or 'auto'."""
    if value == "auto" or value is None:
        return value
    try:
        return tokens_of_step(value, unique_tokens)
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
    """Read a study YAML (with its smoke block merged when ``smoke``) and validate it completely: the file's
    shape by :class:`StudyFile` (config.build_dataclass), then every trial's run config by :func:`validate`."""
    path = Path(path)
    source = str(path)
    raw = _merge_smoke(read_yaml(path), source, smoke)
    raw.setdefault("name", path.stem)
    study: StudyFile = build_dataclass(StudyFile, raw, source)
    assert study.name is not None
    run, base_config = _run_section(study.run, path)
    space = study.search_space
    if not isinstance(space, dict) or not space:
        raise ConfigError(source, "search_space", "expected a mapping of dotted run-config keys to distributions")
    params = [parse_param(key, value, source) for key, value in space.items()]
    objectives = _objectives(study, source)
    pruner = _pruner(study.pruner, objectives, source)
    pruner = {k: _steps(v, base_config.data.unique_tokens, source, f"pruner.{k}") if k in STEP_OPTIONS else v
              for k, v in pruner.items()}
    enqueue = study.enqueue or []
    if not all(isinstance(point, dict) for point in enqueue):
        raise ConfigError(source, "enqueue", "expected a list of {parameter path: value} mappings")
    n_trials, key = (trials, "--trials") if trials is not None else (study.n_trials, "n_trials")
    if n_trials < 1:
        raise ConfigError(source, key, f"must be an integer >= 1, got {n_trials!r}")
    if n_trials < len(enqueue):
        raise ConfigError(source, key, f"{n_trials} trials cannot hold the {len(enqueue)} enqueued points")

    spec = StudySpec(path, study.name, study.description, run, params, objectives, _sampler(study.sampler, source),
                     pruner, n_trials, study.budget, _seeds(study.seeds, base_config.seed, source), [],
                     study.retry.max_retry, study.retry.errors, study.heartbeat.interval,
                     study.heartbeat.grace_period, study.storage)
    spec.enqueue = [_check_point(spec, point, i) for i, point in enumerate(enqueue)]
    validate(spec)
    return spec


def _merge_smoke(raw: dict[str, Any], source: str, smoke: bool) -> dict[str, Any]:
    """``--smoke``: the ``smoke:`` block deep-merged over the file; the study is named ``<name>-smoke`` unless the
    block names it."""
    smoke_block = raw.pop("smoke", None)
    if not smoke:
        return raw
    if not isinstance(smoke_block, dict):
        raise ConfigError(source, "smoke", "--smoke needs a smoke: mapping merged over this study")
    check_keys(smoke_block, STUDY_KEYS, source, "smoke")
    name = raw.get("name")
    merged = deep_merge(raw, smoke_block)
    if "name" not in smoke_block and isinstance(name, str):
        merged["name"] = f"{name}-smoke"
    return merged


def _run_section(run: Any, path: Path) -> tuple[dict[str, Any], RunConfig]:
    """The base run config (``base:`` resolved), checked by the run-config schema with keys under ``run.``."""
    source = str(path)
    if isinstance(run, str):
        run = {"base": run}
    if not isinstance(run, dict):
        raise ConfigError(source, "run", "expected the base run config (a mapping, may use base: other.yaml)")
    run = resolve_base(copy.deepcopy(run), path)
    try:
        return run, config_from_dict({k: v for k, v in run.items() if k != "name"}, source)
    except ConfigError as err:
        raise ConfigError(source, f"run.{err.key}" if err.key else "run", err.message) from None


def _objectives(study: StudyFile, source: str) -> list[Objective]:
    if study.objectives is not None:
        if not isinstance(study.objectives, list) or not study.objectives:
            raise ConfigError(source, "objectives", "expected a non-empty list")
        objectives = [parse_objective(o, source, f"objectives[{i}]") for i, o in enumerate(study.objectives)]
    else:
        objectives = [parse_objective(study.objective or "val/ar_nll", source, "objective")]
    if len({o.name for o in objectives}) != len(objectives):
        raise ConfigError(source, "objectives", "each metric can appear once")
    return objectives


def _sampler(sampler: Any, source: str) -> dict[str, Any]:
    """``tpe`` or ``{name: tpe, seed: 0, ...}``: the other keys are Optuna's options (checked by make_sampler)."""
    sampler = sampler or {"name": "tpe"}
    if isinstance(sampler, str):
        sampler = {"name": sampler}
    if not isinstance(sampler, dict) or sampler.get("name") not in SAMPLERS:
        raise ConfigError(source, "sampler.name", f"choose one of {', '.join(SAMPLERS)}")
    return dict(sampler)


def _pruner(pruner: Any, objectives: list[Objective], source: str) -> dict[str, Any]:
    """A name or ``{name: median, ...}``; null means none; ``auto`` (the default) is median for one objective."""
    if pruner == "auto":
        pruner = "median" if len(objectives) == 1 else "none"
    if pruner is None or isinstance(pruner, str):
        pruner = {"name": pruner or "none"}
    if not isinstance(pruner, dict) or pruner.get("name") not in PRUNERS:
        raise ConfigError(source, "pruner.name", f"choose one of {', '.join(PRUNERS)} (or auto)")
    if len(objectives) > 1 and pruner["name"] != "none":
        raise ConfigError(source, "pruner", "Optuna prunes single-objective studies only; use pruner: none")
    return dict(pruner)


def _seeds(seeds: int | list[int] | None, base_seed: int, source: str) -> list[int]:
    """A count (seeds base, base+1, ...) or a list of distinct seeds; default the run config's seed."""
    if seeds is None:
        return [base_seed]
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(source, "seeds", "a count of seeds must be >= 1")
        return [base_seed + i for i in range(seeds)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(source, "seeds", f"expected a count or a list of distinct integers, got {seeds!r}")
    return seeds


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
    for key, options in _validation_cases(spec):
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
        _check_grid(spec)
    make_sampler(spec, 0)
    make_pruner(spec)


def _validation_cases(spec: StudySpec) -> list[tuple[str, dict[str, Any]]]:
    """(key to blame, Optuna value of every parameter) for each point :func:`validate` builds a config for."""
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
    return cases


def _check_grid(spec: StudySpec) -> None:
    if spec.enqueue:
        raise ConfigError(spec.source, "enqueue", "the grid sampler visits every grid point; drop enqueue")
    missing = [p.path for p in spec.params if p.grid_values() is None]
    if missing:
        raise ConfigError(spec.source, f"search_space.{missing[0]}", "the grid sampler needs grid: [values] "
                          "(or a step) for every float parameter")
    points = math.prod(len(p.grid_values() or []) for p in spec.params)
    if spec.n_trials > points:
        raise ConfigError(spec.source, "n_trials", f"{spec.n_trials} trials but the grid has {points} points")
