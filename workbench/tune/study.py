"""Samplers, pruners and the Optuna storage; creating a study with exactly n_trials WAITING tickets, or loading
and checking an existing one."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import ConfigError

if TYPE_CHECKING:
    import optuna

    from workbench.tune.spec import StudySpec


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


def safe_url(url: str) -> str:
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
        raise ConfigError(spec.source, "storage", f"cannot open {safe_url(url)}: {reason}") from None


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
                              f"...) but {safe_url(url)} has no study {spec.name!r}; delete them or rename the study")
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
    log(f"[tune] created study {spec.name!r} in {safe_url(url)} with {spec.n_trials} trials "
        f"({len(spec.enqueue)} enqueued)")
    return study


def _check_existing(spec: StudySpec, study: optuna.Study, storage: optuna.storages.RDBStorage, url: str) -> None:
    study_id = storage.get_study_id_from_name(spec.name)
    deadline = time.time() + 60
    while not storage.get_study_user_attrs(study_id).get("workbench.ready"):
        if time.time() > deadline:  # its creator died between creating it and enqueuing its trials
            raise ConfigError(spec.source, "name", f"study {spec.name!r} in {safe_url(url)} was never initialized; "
                              f"delete it: optuna delete-study --storage URL --study-name {spec.name}")
        time.sleep(0.5)
    attrs = storage.get_study_user_attrs(study_id)
    stored = attrs.get("workbench.spec")
    if stored is None:
        raise ConfigError(spec.source, "name", f"study {spec.name!r} in {safe_url(url)} was not created by "
                          "workbench tune; choose another name")
    current = spec.fingerprint()
    if stored != current or [d.name.lower() for d in study.directions] != spec.directions:
        differ = [key for key in current if stored.get(key) != current[key]] or ["objectives"]
        key = {"search_space": "search_space", "objectives": "objective"}.get(differ[0], differ[0])
        raise ConfigError(spec.source, key, f"differs from study {spec.name!r} in {safe_url(url)} (created from "
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
