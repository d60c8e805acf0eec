"""``workbench tune STUDY.yaml``: Optuna studies over regularization strengths (and any other run-config key).

A study YAML (``ablations/studies/*.yaml``) declares::

    name: token_masking_rate            # Optuna study name and results/<name>/
    run: {base: ../base/gpu_small.yaml, algorithms: {token_masking: {rate: 0.1}}}   # base run config
    search_space:                       # dotted run-config keys
      algorithms.token_masking.rate: {low: 0.0, high: 0.6}            # float (default type)
      optimizer.lr: {low: 1e-4, high: 1e-2, log: true}                # log-uniform float
      model.n_layers: {type: int, low: 2, high: 6, step: 2}
      algorithms.dropout: {choices: {off: null, on: {mlp: 0.1}}}     # on/off: labels -> values
      algorithms.dropout.mlp: {low: 0.05, high: 0.3}                  # only sampled when dropout is on
      objective.dual.mode: {choices: [steps, sequences]}
    objective: {metric: val/ar_nll, reduce: best, direction: minimize}   # or `objectives: [...]` (multi-objective)
    sampler: {name: tpe, seed: 0}       # tpe | random | cmaes | gp | grid | nsgaii; other keys go to the sampler
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 1ep}   # median | percentile |
                                        # successive_halving | hyperband | none; step options accept Nep / Ntok
    n_trials: 20                        # the study's total (``--trials`` overrides)
    budget: 32Mtok                      # per-trial token budget (trainer.max_duration of every trial)
    seeds: [0]                          # or a count; a trial's objective is the mean over its seeds
    enqueue: [{algorithms.token_masking.rate: 0.1}]   # known points (e.g. the paper's) run before sampling
    retry: {max_retry: 2, errors: false}
    heartbeat: {interval: 30, grace_period: 120}
    smoke: {...}                        # deep-merged over this file by --smoke (tiny CPU settings for tests)

Design decisions (why):

* **One training path.** Each trial is ``workbench.train.train(config, run_dir=results/<study>/trial-<n>/)`` with
  a pruning callback added; with several seeds the runs are ``trial-<n>/seed-<s>/``. Curves are the usual tidy
  ``metrics.parquet``; pruned and failed trials keep their partial curves (summary.json says pruned/failed).
* **Validation before any trial.** Every parameter is checked by building a run config with each of its
  representative values (both ends of a range, every choice; other parameters at their first value), so an
  unknown path, a value the schema rejects, an empty range, a log range touching 0, an objective metric the
  runs do not compute or a storage that cannot be reached all fail with a ConfigError naming the study file and
  key. ``name`` and ``seed`` are not searchable (they are per trial); ``trainer.max_duration`` comes from budget.
* **Conditional (on/off) parameters.** A categorical may choose whole sections (``{off: null, on: {...}}``;
  list choices that are not plain scalars get YAML labels). Parameters are applied parents first; a parameter
  below a path that this trial set to null is not sampled (define-by-run), so strengths of switched-off
  regularizers neither appear in the trial's params nor switch the section back on.
* **Pruning.** A Composer callback reads the objective from ``state.eval_metric_values`` at EVAL_END of the
  objective's evaluator (``val`` or a task name) and calls ``trial.report(value, step=tokens_seen)``; tokens
  (not evaluation indices) make steps comparable between trials at the same budget and survive resumption.
  When the pruner says so it raises ``optuna.TrialPruned`` at the next batch/epoch start, i.e. after the tidy
  logger flushed that evaluation (Composer runs loggers after callbacks within one event). The last evaluation
  never prunes (nothing left to save). Pruning needs a single objective; a multi-objective study must use
  ``pruner: none``. A NaN/inf objective value (divergence) that was not pruned fails the trial.
* **Exactly n_trials, any number of workers.** The process that creates the study (creation is atomic in the
  RDB: the others get DuplicatedStudyError) enqueues the known points and then plain WAITING "tickets" up to
  n_trials, and marks the study ready. Workers only ever claim WAITING trials (atomic RUNNING transition in
  Optuna's storage) and never create trials, so the study holds exactly n_trials originals plus retries.
  Raising ``--trials`` on an existing study tops it up; do that from one process (``--workers N`` tops up once
  in the parent before spawning), concurrent top-ups may over-create. Samplers are re-seeded per trial with
  ``seed + trial number``: reproducible whichever worker runs it, and concurrent workers never draw the same
  random point. A worker leaves when the study has no WAITING and no RUNNING trial; while other workers'
  trials run it polls, so it can pick up the retry of a trial whose worker died.
* **Crash safety.** Storage is Optuna's RDBStorage with heartbeats (``heartbeat.interval``) and a grace period;
  a RUNNING trial whose worker stopped beating is failed by the next worker that looks and re-enqueued by
  Optuna's RetryFailedTrialCallback (``RetryHeartbeatStaleTrialCallback`` in Optuna 5, with the intermediate
  values inherited), up to ``retry.max_retry`` times. The retry is a new trial number with the same params; it
  runs in its own folder and **resumes from the failed attempt's latest checkpoint** when that checkpoint is a
  complete file and the attempt's config matches (the checkpoint, config and rows up to it are copied, the run
  name rewritten); otherwise it starts clean. Its own folder means the killed process's leftovers (Streaming's
  per-run shard view, half-written files) are never reused; that folder's summary.json is marked failed. A
  trial that raises (NaN, OOM, any exception) is recorded as FAIL with ``user_attrs.error`` and the worker
  continues; it is retried only with ``retry.errors: true`` (a deterministic failure would just repeat). Ctrl-C
  fails the running trial, enqueues its retry and stops the worker.
* **Storage.** Default: an embedded SQLite file ``results/<study>/study.db`` (WAL journal, 60 s busy timeout;
  fine for a few local workers). ``--storage postgresql://user@host/db`` (any SQLAlchemy URL) shares one study
  between processes and machines: every worker runs the same command. ``optuna-dashboard <storage URL>`` shows
  the study (metric names are set). A study remembers the spec it was created from (run config, search space,
  objectives, budget, seeds); starting it again from a different spec is refused, like a run folder holding
  another config.
* **Data preparation** is guarded by a file lock under the prepared cache, so concurrent workers on one machine
  never prepare the same shards at once.

``workbench tune --summary STUDY.yaml`` prints trial counts, the best trials (the Pareto front for several
objectives) and parameter importances (fANOVA; PED-ANOVA when scikit-learn, which fANOVA needs, is missing),
and writes ``results/<study>/trials.csv`` plus seaborn figures in ``results/<study>/figures/``: the optimisation
history and the objective against each parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
from workbench.paths import prepared_dir, results_dir

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


# --------------------------------------------------------------------------------------------------------------
# the study spec


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


# --------------------------------------------------------------------------------------------------------------
# samplers, pruners, storage


def make_sampler(spec: StudySpec, trial_number: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded with ``seed + trial_number`` (reproducible per trial, distinct per worker).

    The grid sampler keeps the study's seed: its shuffled grid order must be the same in every process (it
    assigns grid points by trial number and skips visited ones itself)."""
    import optuna

    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler["name"]
    options["seed"] = int(options.get("seed", 0)) + (0 if name == "grid" else trial_number)
    if name == "tpe":
        options.setdefault("constant_liar", True)  # concurrent workers: running trials count as pessimistic
    classes: dict[str, Any] = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                               "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
                               "nsgaii": optuna.samplers.NSGAIISampler, "grid": _GridSampler}
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(spec.source, "sampler.name", "cmaes needs the 'cmaes' package: "
                              "pip install cmaes") from None
        if len(spec.objectives) > 1:
            raise ConfigError(spec.source, "sampler.name", "CMA-ES optimizes a single objective")
    if name == "grid":
        options["search_space"] = {p.path: p.grid_values() for p in spec.params}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return classes[name](**options)
    except TypeError as err:
        raise ConfigError(spec.source, "sampler", f"bad options for {name}: {err}") from None


@functools.cache
def _grid_class() -> type:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` (valid only inside ``Study.optimize``): here the
        study's trial tickets decide when it ends."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _GridSampler(**options: Any) -> optuna.samplers.BaseSampler:  # used like a class
    return _grid_class()(**options)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    import optuna

    options = {k: v for k, v in spec.pruner.items() if k != "name"}
    classes: dict[str, Any] = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
                               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
                               "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    try:
        return classes[spec.pruner["name"]](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(spec.source, "pruner", f"bad options for {spec.pruner['name']}: {err}") from None


def default_storage(spec: StudySpec) -> str:
    return f"sqlite:///{spec.results / 'study.db'}"


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def storage_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 (the ``postgres`` extra) when only it is
    installed. Explicit drivers (``postgresql+psycopg://``) and other databases are left alone."""
    import importlib.util

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def connect(spec: StudySpec, url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats and stale-trial retries; fails fast when it cannot be reached."""
    import optuna
    from sqlalchemy.engine import make_url

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    try:
        parsed = make_url(url)
        driver_url = storage_url(url)
    except Exception as err:
        raise ConfigError(spec.source, "storage", f"{url!r} is not an SQLAlchemy URL ({err})") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            import sqlite3

            with contextlib.closing(sqlite3.connect(database, timeout=60)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry,
                                                                     inherit_intermediate_values=True)
            return optuna.storages.RDBStorage(driver_url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=spec.heartbeat_interval,
                                              grace_period=spec.grace_period,
                                              heartbeat_stale_trial_callback=retry)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, ImportError):
            reason += " (PostgreSQL needs a driver: pip install -e '.[postgres]' for psycopg2)"
        raise ConfigError(spec.source, "storage", f"cannot open {_safe_url(url)}: {reason}") from None


def _study_id(storage: optuna.storages.RDBStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def open_study(spec: StudySpec, storage: optuna.storages.RDBStorage, url: str,
               log: Callable[[str], None] = print) -> optuna.Study:
    """Create the study with its trial tickets (one process wins the creation), or load and check it."""
    import optuna

    if _study_id(storage, spec.name) is None and spec.results.is_dir():
        leftovers = sorted(p.name for p in spec.results.glob("trial-*"))
        if leftovers:
            raise ConfigError(spec.source, "name", f"{spec.results} holds trial folders ({', '.join(leftovers[:3])}"
                              f"...) but {_safe_url(url)} has no study {spec.name!r}; delete them or rename the study")
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        _check_existing(spec, study, storage, url)
        _top_up(spec, study, log)
        return study
    study.set_user_attr("workbench.spec", spec.fingerprint())
    study.set_user_attr("workbench.study_file", str(spec.path))
    study.set_user_attr("workbench.results", str(spec.results))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in spec.objectives])  # labels in optuna-dashboard
    for point in spec.enqueue:
        study.enqueue_trial(point, user_attrs={"enqueued": True})
    _top_up(spec, study, log)
    study.set_user_attr("workbench.ready", True)
    log(f"[tune] created study {spec.name!r} in {_safe_url(url)} with {spec.n_trials} trials "
        f"({len(spec.enqueue)} enqueued)")
    return study


def _check_existing(spec: StudySpec, study: optuna.Study, storage: optuna.storages.RDBStorage, url: str) -> None:
    study_id = storage.get_study_id_from_name(spec.name)
    deadline = time.time() + 60
    while not storage.get_study_user_attrs(study_id).get("workbench.ready"):
        if time.time() > deadline:  # its creator died between creating it and enqueuing its trials
            raise ConfigError(spec.source, "name", f"study {spec.name!r} in {_safe_url(url)} was never initialized; "
                              f"delete it: optuna delete-study --storage URL --study-name {spec.name}")
        time.sleep(0.5)
    attrs = storage.get_study_user_attrs(study_id)
    stored = attrs.get("workbench.spec")
    if stored is None:
        raise ConfigError(spec.source, "name", f"study {spec.name!r} in {_safe_url(url)} was not created by "
                          "workbench tune; choose another name")
    current = spec.fingerprint()
    if stored != current or [d.name.lower() for d in study.directions] != spec.directions:
        differ = [key for key in current if stored.get(key) != current[key]] or ["objectives"]
        key = {"search_space": "search_space", "objectives": "objective"}.get(differ[0], differ[0])
        raise ConfigError(spec.source, key, f"differs from study {spec.name!r} in {_safe_url(url)} (created from "
                          f"{attrs.get('workbench.study_file')}); refusing to mix trials of different studies: "
                          f"rename the study or delete it (optuna delete-study --study-name {spec.name} --storage URL)")


def _top_up(spec: StudySpec, study: optuna.Study, log: Callable[[str], None]) -> None:
    import optuna
    from optuna.trial import TrialState

    originals = [t for t in study.get_trials(deepcopy=False) if "failed_trial" not in t.system_attrs]
    missing = spec.n_trials - len(originals)
    if missing > 0 and originals:
        log(f"[tune] adding {missing} trials to study {spec.name!r} (total {spec.n_trials})")
    elif missing < 0:
        log(f"[tune] study {spec.name!r} already holds {len(originals)} trials (more than {spec.n_trials}); "
            "the total only grows")
    for _ in range(max(missing, 0)):
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))


# --------------------------------------------------------------------------------------------------------------
# running trials


@functools.cache
def _reporter_class() -> type:
    from composer.core import Callback

    class TrialReporter(Callback):
        """Reports the objective after every evaluation (step = tokens seen) and prunes when the pruner says so.

        The value is read at EVAL_END of the objective's evaluator from ``state.eval_metric_values``; the
        TrialPruned exception is raised at the next batch or epoch start, after the tidy logger has written the
        evaluation (loggers run after callbacks in an event), so pruned runs keep their whole curve."""

        def __init__(self, trial: Any, objective: Objective, prune: bool):
            self.trial, self.objective, self.prune = trial, objective, prune
            self.pending: str | None = None

        def eval_end(self, state: Any, logger: Any) -> None:
            if state.dataloader_label != self.objective.split:
                return
            value = state.eval_metric_values.get(self.objective.metric)
            if value is None:
                return
            value, step = float(value), int(state.timestamp.token)
            self.trial.report(value, step)
            if self.prune and self.trial.should_prune():
                self.pending = f"pruned at {step:,} tokens: {self.objective.name} = {value:.4f}"

        def _raise_pending(self) -> None:
            if self.pending is not None:
                import optuna

                raise optuna.TrialPruned(self.pending)

        def batch_start(self, state: Any, logger: Any) -> None:
            self._raise_pending()

        def epoch_start(self, state: Any, logger: Any) -> None:
            self._raise_pending()

    return TrialReporter


@contextlib.contextmanager
def _prepare_lock() -> Iterator[None]:
    """Concurrent workers on one machine must not prepare the same shards at once."""
    import fcntl

    lock = prepared_dir() / ".tune-prepare.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(config: RunConfig, log: Callable[[str], None]) -> None:
    from datasets_prep.corpus import prepare

    with _prepare_lock():
        prepare(config.data, log=log)


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    """Trials share shards: drop the 'already prepared' lines every trial would print."""
    return lambda message: None if "already prepared" in message else log(message)


class _Heartbeat:
    """Records the trial's heartbeat now and every ``interval`` seconds in a thread (as Study.optimize does)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is tolerated by the grace period
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def objective_values(spec: StudySpec, run_dirs: list[Path]) -> list[float]:
    """Each objective, reduced over the run's evaluations, averaged over seeds; NaN/inf fails the trial."""
    import polars as pl

    from workbench.results import METRICS_FILE, read_metrics

    out = []
    for objective in spec.objectives:
        per_seed = []
        for run_dir in run_dirs:
            frame = read_metrics(run_dir / METRICS_FILE)
            rows = [] if frame is None else frame.filter(
                (pl.col("split") == objective.split) & (pl.col("metric") == objective.metric)).sort("step")
            if len(rows) == 0:
                raise RuntimeError(f"{run_dir} has no {objective.name} rows: the objective was never evaluated")
            values = rows["value"].to_list()
            bad = [step for step, value in zip(rows["step"].to_list(), values) if not math.isfinite(value)]
            if bad:
                raise FloatingPointError(f"{objective.name} is not finite at step {bad[0]} in {run_dir}: the run "
                                         "diverged")
            per_seed.append(objective.reduce_values(values))
        out.append(sum(per_seed) / len(per_seed))
    return out


def _adopt_attempt(previous: Path, run_dir: Path, config: RunConfig, log: Callable[[str], None]) -> bool:
    """Seed ``run_dir`` with a failed attempt's checkpoint (or its completed run) under the new run name.

    Returns whether the new run should resume. Only a complete checkpoint file (zip central directory present)
    of a run with the same config (up to its name) is adopted; anything else starts clean."""
    import zipfile

    import polars as pl

    from workbench.config import dump_config
    from workbench.results import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, read_metrics, read_summary, write_summary
    from workbench.train import LATEST_CHECKPOINT

    try:
        old = yaml.safe_load((previous / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(old, dict) or {**old, "name": config.name} != config.to_dict():
        return False
    summary = read_summary(previous) or {}
    complete = summary.get("status") == "complete"
    latest = previous / CHECKPOINTS / LATEST_CHECKPOINT
    checkpoint = latest.resolve() if latest.exists() else None
    if not complete:
        if checkpoint is None or not zipfile.is_zipfile(checkpoint):
            return False
        target = run_dir / CHECKPOINTS
        target.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copy2(checkpoint, target / checkpoint.name)
        (target / LATEST_CHECKPOINT).unlink(missing_ok=True)
        (target / LATEST_CHECKPOINT).symlink_to(checkpoint.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = read_metrics(previous / METRICS_FILE) if (previous / METRICS_FILE).exists() else None
    if frame is not None:
        frame.with_columns(pl.lit(config.name).alias("run")).write_parquet(run_dir / METRICS_FILE)
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    fields = {**summary, "run": config.name} if complete else {"run": config.name, "status": "resuming"}
    fields["resumed_from"] = str(previous)
    write_summary(run_dir, **fields)
    log(f"[tune] {config.name}: {'reusing the completed run' if complete else 'resuming from ' + checkpoint.name} "
        f"of {previous}")
    return True


def _mark_lost(spec: StudySpec, previous_number: int, number: int) -> None:
    """The folder of an attempt whose worker died still says 'running': say what happened to it."""
    from workbench.results import read_summary, write_summary

    for seed in spec.seeds:
        folder = spec.run_dir(previous_number, seed)
        summary = read_summary(folder)
        if summary is not None and summary.get("status") == "running":
            write_summary(folder, status="failed", error=f"worker lost (no heartbeat for {spec.grace_period} s); "
                          f"retried as trial {number}")


def run_trial(spec: StudySpec, trial: optuna.Trial, frozen: optuna.trial.FrozenTrial,
              log: Callable[[str], None]) -> list[float]:
    """Train the trial's run(s) through workbench.train.train and return its objective value(s)."""
    from workbench import train as training
    from workbench.results import write_summary

    log = _quiet(log)
    params, values = spec.trial_values(lambda p: p.suggest(trial))
    history = frozen.system_attrs.get("retry_history") or []
    previous = history[-1] if history else None
    run_dirs = [spec.run_dir(trial.number, seed) for seed in spec.seeds]
    trial.set_user_attr("run_dirs", [os.path.relpath(d, results_dir()) for d in run_dirs])
    if previous is not None:
        _mark_lost(spec, previous, trial.number)
    for index, (seed, run_dir) in enumerate(zip(spec.seeds, run_dirs)):
        config = spec.trial_config(values, trial.number, seed)
        resume = previous is not None and _adopt_attempt(spec.run_dir(previous, seed), run_dir, config, log)
        if resume:
            trial.set_user_attr("resumed_from", previous)
        run_dir.mkdir(parents=True, exist_ok=True)  # train() merges its fields into this summary
        write_summary(run_dir, study=spec.name, trial=trial.number, params=params)
        prepare_data(config, log)
        callbacks = []
        if index == 0 and len(spec.objectives) == 1:
            callbacks.append(_reporter_class()(trial, spec.objectives[0], spec.pruner["name"] != "none"))
        training.train(config, run_dir=run_dir, resume=resume, extra_callbacks=callbacks, log=log)
    return objective_values(spec, run_dirs)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim(study: optuna.Study, storage: optuna.storages.RDBStorage,
           study_id: int) -> optuna.trial.FrozenTrial | None:
    """Atomically move one WAITING trial (lowest number first) to RUNNING; None when there is none."""
    import optuna
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                # beat at once: a RUNNING trial without any heartbeat would never be seen as stale
                storage.record_heartbeat(trial_id)
                return frozen
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def work(spec: StudySpec, storage: optuna.storages.RDBStorage, log: Callable[[str], None] = print) -> dict[str, int]:
    """One worker: claim WAITING trials until the study has none waiting or running; returns state counts."""
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(spec.name)
    poll = max(1.0, min(10.0, spec.grace_period / 2))
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry,
                                                                 inherit_intermediate_values=True)
    idle_reported = False
    while True:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # stale RUNNING trials -> FAIL + re-enqueued retries
        frozen = _claim(study, storage, study_id)
        if frozen is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                break
            if not idle_reported:
                log(f"[tune] waiting for trials {', '.join(str(t.number) for t in running)} of other workers "
                    "(their retries would come here)")
                idle_reported = True
            time.sleep(poll)
            continue
        idle_reported = False
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        # a fresh Study per trial: Optuna's per-study trial cache would otherwise be stale for the sampler
        trial_study = optuna.load_study(study_name=spec.name, storage=storage,
                                        sampler=make_sampler(spec, frozen.number), pruner=make_pruner(spec))
        trial_study.get_trials(deepcopy=False)
        trial = optuna.trial.Trial(trial_study, trial_id)
        trial.set_user_attr("worker", _worker_id())
        for inherited in ("error", "resumed_from"):  # copied from the failed attempt by the retry callback
            if frozen.user_attrs.get(inherited) is not None:
                trial.set_user_attr(inherited, None)
        origin = frozen.system_attrs.get("failed_trial")
        log(f"[tune] trial {frozen.number} started" + (f" (retry of trial {origin})" if origin is not None else ""))
        started = time.time()
        state, values, error = _run_one(spec, storage, trial_id, trial, frozen, log)
        if error is not None:
            trial.set_user_attr("error", error)
        if state == TrialState.COMPLETE:
            result = trial_study.tell(trial, values)
        else:
            result = trial_study.tell(trial, state=state)
        counts[result.state.name] = counts.get(result.state.name, 0) + 1
        shown = ", ".join(f"{o.name}={v:.4f}" for o, v in zip(spec.objectives, result.values or []))
        log(f"[tune] trial {result.number} {result.state.name.lower()} after {time.time() - started:.0f} s"
            + (f": {shown}" if shown else "") + (f" ({error})" if error else "")
            + f" params={json.dumps(result.params)}")
        if state == TrialState.FAIL and (spec.retry_errors or error == "KeyboardInterrupt"):
            retry(trial_study, storage.get_trial(trial_id))
        if error == "KeyboardInterrupt":
            raise KeyboardInterrupt
    return counts


def _run_one(spec: StudySpec, storage: optuna.storages.RDBStorage, trial_id: int, trial: optuna.Trial,
             frozen: optuna.trial.FrozenTrial,
             log: Callable[[str], None]) -> tuple[Any, list[float] | None, str | None]:
    """Run a trial under its heartbeat; (state, values, error) for ``tell``."""
    import optuna
    from optuna.trial import TrialState

    with _Heartbeat(storage, trial_id, spec.heartbeat_interval):
        try:
            return TrialState.COMPLETE, run_trial(spec, trial, frozen, log), None
        except optuna.TrialPruned as err:
            trial.set_user_attr("pruned", str(err))
            return TrialState.PRUNED, None, None
        except KeyboardInterrupt:
            return TrialState.FAIL, None, "KeyboardInterrupt"
        except Exception as err:  # NaN, OOM, anything: the trial fails, the study goes on
            return TrialState.FAIL, None, f"{type(err).__name__}: {err}"[:2000]


def spawn_workers(args: argparse.Namespace, url: str, count: int, log: Callable[[str], None]) -> int:
    """``--workers N``: N separate ``workbench tune`` processes on this machine, coordinated by the storage."""
    command = [sys.executable, "-m", "workbench.cli", "tune", str(args.study), "--storage", url]
    if args.trials is not None:
        command += ["--trials", str(args.trials)]
    if args.smoke:
        command.append("--smoke")
    processes = [subprocess.Popen(command) for _ in range(count)]
    log(f"[tune] started {count} workers: {', '.join(str(p.pid) for p in processes)}")
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:  # the terminal sent SIGINT to the workers too; let them record their trials
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=60))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return 130
    return max(codes)


# --------------------------------------------------------------------------------------------------------------
# summary


def summarize(spec: StudySpec, storage: optuna.storages.RDBStorage, url: str) -> int:
    """Best trials, parameter importances, trials.csv and figures of the study."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        raise ConfigError(spec.source, "name", f"no study {spec.name!r} in {_safe_url(url)} yet") from None
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    print(f"study {spec.name} ({_safe_url(url)}): {len(trials)} trials: "
          + ", ".join(f"{count} {name}" for name, count in states.items() if count))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print("no completed trials yet")
    elif len(spec.objectives) == 1:
        sign = 1 if spec.directions[0] == "minimize" else -1
        best = sorted(complete, key=lambda t: sign * t.value)[:5]
        print(f"best trials by {spec.objectives[0].name} ({spec.directions[0]}):")
        for t in best:
            print(f"  trial {t.number}: {t.value:.4f}  {json.dumps(t.params)}  {', '.join(t.user_attrs['run_dirs'])}")
    else:
        print("Pareto front (" + ", ".join(f"{o.name} {o.direction}" for o in spec.objectives) + "):")
        for t in sorted(study.best_trials, key=lambda t: t.number):
            print(f"  trial {t.number}: " + ", ".join(f"{v:.4f}" for v in t.values) + f"  {json.dumps(t.params)}")
    _print_importances(spec, study, complete)
    frame = _trials_frame(spec, trials)
    spec.results.mkdir(parents=True, exist_ok=True)
    frame.write_csv(spec.results / "trials.csv")
    figures = _plot(spec, frame)
    print(f"wrote {spec.results / 'trials.csv'} and {len(figures)} figures in {spec.results / 'figures'}")
    print(f"dashboard: optuna-dashboard {_safe_url(url)}")
    return 0


def _print_importances(spec: StudySpec, study: optuna.Study, complete: list) -> None:
    import optuna

    if len(complete) < 2 or not spec.params:
        print("parameter importances: need at least 2 completed trials")
        return
    for i, objective in enumerate(spec.objectives):
        target = (lambda t, i=i: t.values[i]) if len(spec.objectives) > 1 else None
        method = "fANOVA"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    scores = optuna.importance.get_param_importances(
                        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target)
                except ImportError:  # fANOVA's random forest is scikit-learn's
                    method = "PED-ANOVA (fANOVA needs scikit-learn)"
                    scores = optuna.importance.get_param_importances(
                        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target)
        except (RuntimeError, ValueError) as err:
            print(f"parameter importances for {objective.name}: unavailable ({err})")
            continue
        print(f"parameter importances for {objective.name} ({method}):")
        for name, score in scores.items():
            print(f"  {name}: {score:.3f}")


def _trials_frame(spec: StudySpec, trials: list) -> Any:
    import polars as pl

    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(),
                               "retry_of": t.system_attrs.get("failed_trial")}
        for i, objective in enumerate(spec.objectives):
            row[objective.name] = t.values[i] if t.values is not None else None
        for param in spec.params:
            value = t.params.get(param.path)
            row[param.path] = None if value is None else str(value) if param.kind == "categorical" else float(value)
        row["run_dirs"] = ";".join(t.user_attrs.get("run_dirs", []))
        row["worker"] = t.user_attrs.get("worker")
        row["error"] = t.user_attrs.get("error")
        rows.append(row)
    schema = {"trial": pl.Int64, "state": pl.String, "retry_of": pl.Int64,
              **{o.name: pl.Float64 for o in spec.objectives},
              **{p.path: pl.String if p.kind == "categorical" else pl.Float64 for p in spec.params},
              "run_dirs": pl.String, "worker": pl.String, "error": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _plot(spec: StudySpec, frame: Any) -> list[Path]:
    """Optimisation history and objective vs. each parameter (pruned trials at their last reported value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl
    import seaborn as sns

    out_dir = spec.results / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = "pruned (last evaluation)"
    shown = frame.filter(pl.col("state").is_in(["complete", "pruned"])).with_columns(
        pl.col("state").replace("pruned", pruned))
    palette = {"complete": "tab:blue", pruned: "tab:orange"}
    written = []
    columns = len(spec.objectives)
    fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), squeeze=False)
    for ax, objective in zip(axes[0], spec.objectives):
        data = shown.select("trial", "state", pl.col(objective.name).alias("value")).drop_nulls("value").to_pandas()
        if len(data):
            sns.scatterplot(data=data, x="trial", y="value", hue="state", palette=palette, ax=ax)
            done = data[data["state"] == "complete"].sort_values("trial")
            if len(done):
                best = done["value"].cummin() if objective.direction == "minimize" else done["value"].cummax()
                ax.step(done["trial"], best, where="post", color="black", label="best so far")
                ax.legend()
        ax.set(xlabel="trial", ylabel=objective.name, title=f"{spec.name}: optimisation history")
    fig.tight_layout()
    fig.savefig(out_dir / "history.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "history.png")
    for param in spec.params:
        fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), squeeze=False)
        for ax, objective in zip(axes[0], spec.objectives):
            data = shown.select("state", pl.col(param.path).alias("x"), pl.col(objective.name).alias("value"))
            data = data.drop_nulls().to_pandas()
            if len(data):
                if param.kind == "categorical":
                    sns.stripplot(data=data, x="x", y="value", hue="state", palette=palette, ax=ax)
                else:
                    sns.scatterplot(data=data, x="x", y="value", hue="state", palette=palette, ax=ax)
                    if param.log:
                        ax.set_xscale("log")
            ax.set(xlabel=param.path, ylabel=objective.name)
        fig.suptitle(f"{spec.name}: {objective.name if columns == 1 else 'objectives'} vs. {param.path}")
        fig.tight_layout()
        path = out_dir / f"param-{param.path.replace('.', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study YAML (ablations/studies/*.yaml)")
    parser.add_argument("--storage", help="SQLAlchemy URL of the Optuna storage shared by all workers, e.g. "
                        "postgresql://user@host/db (default: sqlite file results/<study>/study.db)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start on this machine")
    parser.add_argument("--trials", type=int, help="total trials of the study (default: the YAML's n_trials)")
    parser.add_argument("--smoke", action="store_true", help="merge the study's smoke: block (tiny CPU settings)")
    parser.add_argument("--summary", action="store_true",
                        help="print best trials and importances, write trials.csv and figures; run nothing")


def run(args: argparse.Namespace) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.workers < 1:
        raise ConfigError("--workers", "", f"must be >= 1, got {args.workers}")
    spec = load_study_spec(args.study, smoke=args.smoke, trials=args.trials)
    url = args.storage or spec.storage or default_storage(spec)
    storage = connect(spec, url)
    if args.summary:
        return summarize(spec, storage, url)

    def log(message: str) -> None:
        print(message, flush=True)

    open_study(spec, storage, url, log)
    _, values = spec.trial_values(lambda p: p.representatives()[0])
    prepare_data(spec.trial_config(values, None, spec.seeds[0]), log)  # once, before any worker trains
    if args.workers > 1:
        return spawn_workers(args, url, args.workers, log)
    try:
        counts = work(spec, storage, log)
    except KeyboardInterrupt:
        log("[tune] interrupted (a running trial was recorded as failed and re-enqueued)")
        return 130
    study = optuna.load_study(study_name=spec.name, storage=storage)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    log(f"[tune] worker {_worker_id()} done: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        + f"; study {spec.name} has {len(finished)} finished trials ({spec.n_trials} requested + retries)")
    return 0
