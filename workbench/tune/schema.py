"""What a study YAML may say, as typed dataclasses built by ``workbench.config.build_dataclass`` (the builder run
configs use), so unknown keys, wrong types and bad values are reported the same way for every file the workbench
reads: ``<file>: <dotted key>: <what is allowed>``.

The sections whose contents are free-form (``run``: a run config, checked by the run-config schema; ``sampler``
and ``pruner``: Optuna options, checked by constructing the sampler/pruner) are kept as plain values here and
checked by ``workbench.tune.spec``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from workbench.config import ConfigError
from workbench.durations import parse_duration

SAMPLERS = ("tpe", "random", "cmaes", "gp", "grid", "nsgaii")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")
STEP_OPTIONS = ("n_warmup_steps", "interval_steps", "min_resource", "max_resource")
RESERVED = {"name": "trials are named <study>-trial-<n>", "seed": "use the study's seeds:",
            "trainer.max_duration": "use the study's budget:"}
SCALARS = (type(None), bool, int, float, str)
PARAM_HINT = "expected a mapping such as {low: 0.0, high: 0.5}, {type: int, low: 1, high: 4} or {choices: [a, b]}"


def parse_number(value: Any, source: str, key: str) -> float:
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


def label(value: Any) -> str:
    """The label Optuna stores for a choice that is not a plain scalar (a section such as ``{mlp: 0.1}``)."""
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1000).strip()


def choice_options(choices: Any) -> tuple[list[Any], list[Any]]:
    """``choices`` as written -> (Optuna's options, the config value of each). A mapping is ``label: value``;
    YAML 1.1 reads the labels on/off (yes/no) as booleans, which become 'on'/'off' again."""
    if isinstance(choices, dict):
        options = [{True: "on", False: "off"}.get(key, str(key)) if isinstance(key, bool) else str(key)
                   for key in choices]
        return options, list(choices.values())
    if isinstance(choices, list):
        plain = all(isinstance(v, SCALARS) for v in choices)
        return (list(choices) if plain else [label(v) for v in choices]), list(choices)
    raise ConfigError("", "choices", "expected a list of choices or a mapping label -> value")


@dataclass
class ParamEntry:
    """One ``search_space`` entry as written. ``type`` defaults to categorical when ``choices`` is given, else
    float; errors raised here carry keys relative to the entry (the builder prefixes ``search_space.<path>``)."""

    type: Literal["float", "int", "categorical", "bool"] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: Any = None  # a list, or a mapping label -> value (values may be whole sections or null)
    grid: list[Any] | None = None

    @property
    def kind(self) -> str:
        return self.type or ("categorical" if self.choices is not None else "float")

    def options(self) -> tuple[list[Any], list[Any]]:
        """(Optuna options, config values) of a categorical or bool entry."""
        if self.choices is None and self.kind == "bool":
            return [False, True], [False, True]
        return choice_options(self.choices)

    def __post_init__(self) -> None:
        if self.kind in ("categorical", "bool"):
            self._check_categorical()
        else:
            self._check_range()

    def _check_categorical(self) -> None:
        extra = [name for name in ("low", "high", "step") if getattr(self, name) is not None]
        if extra or self.log:
            raise ConfigError("", (extra or ["log"])[0], f"not used by a {self.kind} parameter")
        if self.grid is not None:
            raise ConfigError("", "grid", "a categorical parameter's grid is its choices")
        options, _ = self.options()
        if not options:
            raise ConfigError("", "choices", "is empty: give at least two choices")
        if len(options) < 2:
            raise ConfigError("", "choices", "a single choice is a fixed value: put it in run: instead")
        if len({json.dumps(o, sort_keys=True) for o in options}) != len(options):
            raise ConfigError("", "choices", f"choices must be distinct, got {options}")

    def _check_range(self) -> None:
        kind, low, high = self.kind, self.low, self.high
        if low is None or high is None:
            raise ConfigError("", "low" if low is None else "high", f"a {kind} range needs low and high")
        if self.choices is not None:
            raise ConfigError("", "choices", f"not used by a {kind} parameter (drop type: to use choices)")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError("", "", "low and high must be finite")
        if kind == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError("", "", f"an int range needs integer bounds, got [{low:g}, {high:g}]")
        if low >= high:
            raise ConfigError("", "", f"empty range: low ({low:g}) must be below high ({high:g}); a fixed value "
                              "belongs in run:")
        if self.log and low <= 0:
            raise ConfigError("", "low", f"a log range must lie above 0, got low={low:g}")
        if self.step is not None:
            self._check_step(low, high)
        if self.grid is not None and not self.grid:
            raise ConfigError("", "grid", "expected a non-empty list of values inside the range")

    def _check_step(self, low: float, high: float) -> None:
        step, integer = self.step, self.kind == "int"
        if step is None or step <= 0 or (integer and not step.is_integer()):
            raise ConfigError("", "step", f"must be a positive {'integer' if integer else 'number'}")
        if step > high - low:
            raise ConfigError("", "step", f"step {step:g} is larger than the range [{low:g}, {high:g}]")
        if self.log and (not integer or step != 1):
            raise ConfigError("", "step", "a log range cannot have a step")


@dataclass
class ObjectiveEntry:
    """One objective as written: ``metric`` is ``split/metric`` as in metrics.parquet; ``direction`` is inferred
    for losses/NLLs (minimize) and accuracies (maximize)."""

    metric: str = ""
    reduce: Literal["best", "final"] = "best"
    direction: Literal["minimize", "maximize"] | None = None

    def __post_init__(self) -> None:
        if self.metric.count("/") != 1 or not all(self.metric.split("/")):
            raise ConfigError("", "metric", f"expected split/metric such as val/ar_nll or hellaswag/acc_norm, "
                              f"got {self.metric!r}")
        if self.direction is None:
            name = self.metric.split("/")[1]
            if name in ("ar_nll", "mdm_nelbo") or "loss" in name or "nll" in name:
                self.direction = "minimize"
            elif name.startswith("acc"):
                self.direction = "maximize"
            else:
                raise ConfigError("", "direction", f"say whether to minimize or maximize {self.metric}")


@dataclass
class RetrySection:
    """Retries of failed trials: a lost worker's trial is retried up to ``max_retry`` times; a trial that raised
    only with ``errors: true`` (a deterministic failure would just repeat)."""

    max_retry: int = 2
    errors: bool = False

    def __post_init__(self) -> None:
        if self.max_retry < 0:
            raise ConfigError("", "max_retry", "must be an integer >= 0")


@dataclass
class HeartbeatSection:
    """Seconds between a running trial's heartbeats, and of silence after which its worker counts as lost."""

    interval: int = 30
    grace_period: int = 120

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError("", "interval", "must be an integer number of seconds >= 1")
        if self.grace_period <= self.interval:
            raise ConfigError("", "grace_period", f"must be an integer number of seconds > interval "
                              f"({self.interval})")


def _budget(value: Any) -> str | None:
    if value is None:
        return None
    budget = parse_duration(value)
    if budget.endswith("dur"):
        raise ValueError("the per-trial budget is tokens (e.g. 32Mtok), epochs or batches")
    return budget


@dataclass
class StudyFile:
    """The top level of a study YAML (``smoke:`` is merged over it before it is built)."""

    name: str | None = None  # default: the file's stem
    description: str = ""
    run: Any = None  # the base run config: a mapping (may use base: other.yaml) or a path
    search_space: Any = None  # dotted run-config key -> ParamEntry
    objective: Any = None  # an ObjectiveEntry or its metric; default val/ar_nll
    objectives: Any = None  # several ObjectiveEntry (multi-objective)
    sampler: Any = None  # a name or {name: ..., Optuna options}; default tpe
    pruner: Any = "auto"  # a name, {name: ..., options}, or null (none); auto: median for one objective
    n_trials: int = 20
    budget: str | None = field(default=None, metadata={"parse": _budget})
    seeds: int | list[int] | None = None  # a count or distinct seeds; default the run's seed
    enqueue: list[Any] | None = None  # known points {parameter path: value}
    retry: RetrySection = field(default_factory=RetrySection)
    heartbeat: HeartbeatSection = field(default_factory=HeartbeatSection)
    storage: str | None = None  # SQLAlchemy URL; default sqlite results/<study>/study.db

    def __post_init__(self) -> None:
        name = self.name
        if name is not None and (not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-_."):
            raise ConfigError("", "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {name!r}")
        if self.n_trials < 1:
            raise ConfigError("", "n_trials", f"must be an integer >= 1, got {self.n_trials!r}")
        if self.objective is not None and self.objectives is not None:
            raise ConfigError("", "objectives", "give objective: (one) or objectives: (several), not both")
