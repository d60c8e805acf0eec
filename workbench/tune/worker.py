"""A worker: claim WAITING trials, train each through workbench.train under a heartbeat, report and prune, resume
a retried trial from its failed attempt's checkpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.paths import results_dir
from workbench.progress import format_seconds
from workbench.tune.study import make_pruner, make_sampler

if TYPE_CHECKING:
    import optuna

    from workbench.config import RunConfig
    from workbench.tune.spec import Objective, StudySpec


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


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    """Trials share shards: drop the 'already prepared' lines every trial would print."""
    return lambda message: None if "already prepared" in message else log(message)


class _TrialHeartbeat:
    """Records the trial's heartbeat now and every ``interval`` seconds in a thread (as Study.optimize does)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is tolerated by the grace period
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _TrialHeartbeat:
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

    from workbench.config import ConfigError, config_differences, dump_config
    from workbench.results import (
        CHECKPOINTS,
        CONFIG_FILE,
        LATEST_CHECKPOINT,
        METRICS_FILE,
        read_metrics,
        read_summary,
        write_summary,
    )

    try:  # the same run identity as workbench.train.check_run_dir: by value, defaults filled, name aside
        if config_differences(previous / CONFIG_FILE, config, ignore=("name",)):
            return False
    except ConfigError:
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
    from datasets_prep.corpus import prepare
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
        prepare(config.data, log=log)  # workers share the shards: prepare() locks and publishes each output itself
        callbacks = []
        if index == 0 and len(spec.objectives) == 1:
            callbacks.append(_reporter_class()(trial, spec.objectives[0], spec.pruner["name"] != "none"))
        training.train(config, run_dir=run_dir, resume=resume, extra_callbacks=callbacks, log=log)
    return objective_values(spec, run_dirs)


def worker_id() -> str:
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
        trial_study, trial, trial_id = _open_trial(spec, storage, study_id, frozen)
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
        log(study_progress(spec, trial_study.get_trials(deepcopy=False)))
    return counts


def _open_trial(spec: StudySpec, storage: optuna.storages.RDBStorage, study_id: int,
                frozen: optuna.trial.FrozenTrial) -> tuple[optuna.Study, optuna.Trial, int]:
    """The claimed trial as an ``optuna.Trial`` of a fresh Study (Optuna's per-study trial cache would otherwise be
    stale for the sampler), marked with this worker and cleared of attributes inherited from a failed attempt."""
    import optuna

    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
    trial_study = optuna.load_study(study_name=spec.name, storage=storage,
                                    sampler=make_sampler(spec, frozen.number), pruner=make_pruner(spec))
    trial_study.get_trials(deepcopy=False)
    trial = optuna.trial.Trial(trial_study, trial_id)
    trial.set_user_attr("worker", worker_id())
    for inherited in ("error", "resumed_from"):  # copied from the failed attempt by the retry callback
        if frozen.user_attrs.get(inherited) is not None:
            trial.set_user_attr(inherited, None)
    return trial_study, trial, trial_id


def study_progress(spec: StudySpec, trials: list[optuna.trial.FrozenTrial]) -> str:
    """One line after each trial: trials finished / total (retries included), states, the best value so far and
    an ETA = mean finished-trial duration x open trials / workers (the running trials' workers plus this one)."""
    from optuna.trial import TrialState

    finished = [t for t in trials if t.state.is_finished()]
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    states = {s: sum(t.state == s for t in finished) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    line = (f"[tune] progress: {len(finished)}/{len(trials)} trials finished ("
            + ", ".join(f"{n} {s.name.lower()}" for s, n in states.items()) + f"), {running} running")
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if complete and len(spec.objectives) == 1:
        sign = 1 if spec.directions[0] == "minimize" else -1
        best = min(complete, key=lambda t: sign * t.values[0])
        line += f"; best {spec.objectives[0].name} {best.values[0]:.4f} (trial {best.number})"
    elif complete:
        line += f"; {len(complete)} complete trials toward the Pareto front"
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
                 if t.datetime_start is not None and t.datetime_complete is not None]
    if durations and waiting + running:
        eta = sum(durations) / len(durations) * (waiting + running) / (running + 1)
        line += f"; ETA ~{format_seconds(eta)}"
    return line


def _run_one(spec: StudySpec, storage: optuna.storages.RDBStorage, trial_id: int, trial: optuna.Trial,
             frozen: optuna.trial.FrozenTrial,
             log: Callable[[str], None]) -> tuple[Any, list[float] | None, str | None]:
    """Run a trial under its heartbeat; (state, values, error) for ``tell``."""
    import optuna
    from optuna.trial import TrialState

    with _TrialHeartbeat(storage, trial_id, spec.heartbeat_interval):
        try:
            return TrialState.COMPLETE, run_trial(spec, trial, frozen, log), None
        except optuna.TrialPruned as err:
            trial.set_user_attr("pruned", str(err))
            return TrialState.PRUNED, None, None
        except KeyboardInterrupt:
            return TrialState.FAIL, None, "KeyboardInterrupt"
        except Exception as err:  # NaN, OOM, anything: the trial fails, the study goes on
            return TrialState.FAIL, None, f"{type(err).__name__}: {err}"[:2000]
