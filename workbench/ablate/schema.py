"""What an ablation YAML may say, as typed dataclasses built by ``workbench.config.build_dataclass`` (the builder
of run configs and study files), so unknown keys, wrong types and bad values are reported the same way for every
file the workbench reads: ``<file>: <dotted key>: <what is allowed>``.

Sections whose contents are free-form are kept as plain values here and checked where they are used: ``base`` (a
run YAML path or a run-config mapping), ``variants`` and the ``grid``/``zip`` axes (run-config overrides, checked by
the run-config schema once expanded: :mod:`workbench.ablate.spec`) and ``slurm`` (:mod:`workbench.ablate.slurm`).
Every scale block (``smoke:`` and each ``scales:`` entry) is checked whichever scale runs, so a typo in the GPU
scale is found by a CPU dry run."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.config import ConfigError, build_dataclass
from workbench.durations import parse_count

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
SCALE_HINT = "blocks like smoke: (overrides, seeds, grid, zip, repetition)"


class _Unset:
    """The default of keys whose absence differs from null: a scale block's seeds/grid/zip/repetition (not given:
    the file's own apply; null: none at this scale) and the file's ``smoke:`` (null: named, but no block)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def check_seeds(seeds: int | list[int] | None) -> None:
    """One seed or a non-empty list of distinct seeds (errors keyed ``seeds``, relative to the section)."""
    values = seeds if isinstance(seeds, list) else [seeds]
    if seeds is not None and not values:
        raise ConfigError("", "seeds", f"expected a non-empty list of integer seeds, got {seeds!r}")
    if len(set(values)) != len(values):
        raise ConfigError("", "seeds", f"repeated seeds {values}")


def _whole_epochs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"epochs are whole numbers, got {value!r}")
    return value


def _positive(parse: Callable[[Any], int]) -> Callable[[Any], list[int]]:
    """A parser of one value or a list of values, each positive (the points of one repetition axis)."""

    def parse_all(raw: Any) -> list[int]:
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise ValueError("empty axis: give at least one value")
        parsed = [parse(v) for v in values]
        if any(v <= 0 for v in parsed):
            raise ValueError("must be positive")
        return parsed

    return parse_all


@dataclass
class RepetitionBlock:
    """The repetition axis: unique tokens x epochs (their product swept), or a fixed ``total_tokens`` split by
    either list. Each point sets data.unique_tokens and trainer.max_duration."""

    unique_tokens: list[int] | None = field(default=None, metadata={"parse": _positive(parse_count)})
    epochs: list[int] | None = field(default=None, metadata={"parse": _positive(_whole_epochs)})
    total_tokens: int | None = field(default=None, metadata={
        "parse": lambda value: None if value is None else parse_count(value)})

    def __post_init__(self) -> None:
        if self.total_tokens is None:
            if self.unique_tokens is None or self.epochs is None:
                raise ConfigError("", "", "give unique_tokens and epochs (their product is swept), or total_tokens "
                                  "with one of them")
            return
        if (self.unique_tokens is None) == (self.epochs is None):
            raise ConfigError("", "", "with total_tokens give either epochs (unique = total / epochs) or "
                              "unique_tokens (epochs = total / unique), not both")
        for u in self.unique_tokens or []:
            if self.total_tokens % u:
                raise ConfigError("", "unique_tokens", f"total_tokens {self.total_tokens} is not a whole number of "
                                  f"epochs of {u} unique tokens")

    def pairs(self) -> list[tuple[int, int]]:
        """(unique tokens, epochs) of each point, in the file's order."""
        total = self.total_tokens
        if total is None:
            return list(itertools.product(self.unique_tokens or [], self.epochs or []))
        if self.epochs is not None:
            return [(total // e, e) for e in self.epochs]
        return [(u, total // u) for u in self.unique_tokens or []]


@dataclass
class ScaleBlock:
    """A named scale (``smoke:`` or ``scales.NAME``): run-config ``overrides`` go over every run; each of seeds,
    grid, zip and repetition given here replaces the file's (null: none at this scale)."""

    UNKNOWN_KEY_HINT = " (run-config changes go under {prefix}.overrides)"  # not a field: no annotation

    overrides: Any = None  # run-config overrides (dotted keys allowed), checked once merged into each run
    seeds: int | list[int] | None = UNSET
    grid: Any = UNSET  # axes, parsed by spec.parse_axes
    zip: Any = UNSET
    repetition: RepetitionBlock | None = UNSET

    def __post_init__(self) -> None:
        if self.seeds is not UNSET:
            check_seeds(self.seeds)


@dataclass
class AblationFile:
    """An ablation YAML as written (see :mod:`workbench.ablate` for what each section means)."""

    name: str | None = None  # default: the file's name
    description: str | None = None
    base: Any = None  # a run YAML path (relative to this file) or a run-config mapping
    seeds: int | list[int] | None = None  # default: the base's seed
    variants: Any = None  # name: overrides, or a list of overrides with name:
    grid: Any = None  # axes, parsed by spec.parse_axes
    zip: Any = None
    repetition: RepetitionBlock | None = None
    smoke: ScaleBlock | None = UNSET
    scales: Any = None  # NAME: a block like smoke:
    parallel: int | None = None  # the default of --parallel
    slurm: Any = None

    def __post_init__(self) -> None:
        if self.name is not None and not NAME.fullmatch(self.name):
            raise ConfigError("", "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {self.name!r}")
        check_seeds(self.seeds)
        if self.parallel is not None and self.parallel < 1:
            raise ConfigError("", "parallel", f"expected a whole number >= 1, got {self.parallel!r}")
        if self.scales is None:
            return
        if not isinstance(self.scales, dict):
            raise ConfigError("", "scales", f"expected a mapping of scale names to {SCALE_HINT}")
        if self.smoke is not UNSET and "smoke" in self.scales:
            raise ConfigError("", "scales.smoke", "the smoke scale is defined twice (smoke: and scales.smoke)")
        self.scales = {str(name): None if block is None else build_dataclass(ScaleBlock, block, "", f"scales.{name}")
                       for name, block in self.scales.items()}

    def scale_names(self) -> list[str]:
        """The scales this file defines: ``smoke`` (its ``smoke:`` block) and the keys of ``scales:``."""
        return sorted({*(["smoke"] if self.smoke is not UNSET else []), *(self.scales or {})})

    def scale(self, name: str, source: str) -> tuple[ScaleBlock, str]:
        """Scale ``name``'s block and its dotted key; ``smoke`` is the ``smoke:`` block (or ``scales.smoke``)."""
        key = "smoke" if name == "smoke" and self.smoke is not UNSET else f"scales.{name}"
        block = self.smoke if key == "smoke" else (self.scales or {}).get(name)
        if block is None:
            allowed = self.scale_names()
            flag = "--smoke" if name == "smoke" else f"--scale {name}"
            raise ConfigError(source, "smoke" if name == "smoke" else "scales",
                              f"{flag} needs a {'smoke: block' if name == 'smoke' else f'scales: {name}: block'} in "
                              f"the ablation file; scales here: {', '.join(allowed) if allowed else 'none'}")
        return block, key


def read_ablation_file(data: dict[str, Any], source: str) -> AblationFile:
    """Validate a parsed ablation YAML (a mapping) against :class:`AblationFile`."""
    return build_dataclass(AblationFile, data, source)
