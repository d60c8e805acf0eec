"""Optuna studies (workbench tune) on the default SQLite storage: bad input fails before any trial, a designed
study prunes and fails trials as it should and keeps going, local multi-process workers, the summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import optuna
import polars as pl
import pytest
import yaml
from composer.core import Callback
from conftest import TINY
from optuna.trial import TrialState

from workbench import train as train_module
from workbench.cli import main
from workbench.config import ConfigError, deep_merge
from workbench.results import read_metrics, read_summary
from workbench.tune import worker as tune_worker
from workbench.tune.spec import load_study_spec

STUDIES = sorted((Path(__file__).resolve().parent.parent / "ablations" / "studies").glob("*.yaml"))
# every trial: 8 batches of 16 x 64 tokens, the objective evaluated after 4 and 8 batches
TINY_RUN = deep_merge({k: v for k, v in TINY.items() if k != "name"},
                      {"eval": {"interval": "4ba"}, "trainer": {"checkpoint_interval": "4ba"}})


def write_study(folder: Path, name: str, **fields) -> Path:
    study = {"name": name, "run": TINY_RUN, "search_space": {"optimizer.lr": {"low": 1e-6, "high": 0.1, "log": True}},
             "objective": {"metric": "val/ar_nll", "reduce": "best", "direction": "minimize"},
             "budget": "8192tok", "n_trials": 2, "heartbeat": {"interval": 1, "grace_period": 5}}
    if "objectives" in fields:
        del study["objective"]
    study.update(fields)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def storage_of(results_root: Path, name: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{results_root / name / 'study.db'}")


# --------------------------------------------------------------------------------------------------------------
# bad input: clear errors before any trial


@pytest.mark.parametrize(("fields", "key", "message"), [
    ({"search_space": {"optimizer.learning_rate": {"low": 1e-4, "high": 1e-2}}},
     "search_space.optimizer.learning_rate", "unknown key"),
    ({"search_space": {"algorithms.token_masking.rat": {"low": 0.0, "high": 0.5}}},
     "search_space.algorithms.token_masking.rat", "unknown key"),
    ({"search_space": {"optimizer.lr": {"low": 0.01, "high": 0.01}}}, "search_space.optimizer.lr", "empty range"),
    ({"search_space": {"model.n_layers": {"type": "int", "low": 4, "high": 2}}}, "search_space.model.n_layers",
     "empty range"),
    ({"search_space": {"optimizer.weight_decay": {"low": 0.0, "high": 0.1, "log": True}}},
     "search_space.optimizer.weight_decay.low", "log range must lie above 0"),
    ({"search_space": {"algorithms.dropout": {"choices": []}}}, "search_space.algorithms.dropout.choices", "empty"),
    ({"search_space": {"algorithms.dropout": {"choices": {"off": None, "on": {"mlp": 0.1}}},  # checked while on
                       "algorithms.dropout.mlp": {"low": 0.0, "high": 1.0}}},
     "search_space.algorithms.dropout.mlp", "dropout probability in [0, 1)"),
    ({"search_space": {"seed": {"type": "int", "low": 0, "high": 9}}}, "search_space.seed", "seeds:"),
    ({"objective": {"metric": "val/mdm_nelbo"}}, "objective.metric", "not computed"),
    ({"objectives": ["val/ar_nll", {"metric": "hellaswag/acc_norm"}], "pruner": {"name": "median"}}, "pruner",
     "single-objective"),
    ({"enqueue": [{"optimizer.lr": 5.0}]}, "enqueue[0].optimizer.lr", "outside"),
    ({"enqueue": [{"optimizer.betas": [0.9, 0.99]}]}, "enqueue[0].optimizer.betas", "not a searched parameter"),
    ({"sampler": {"name": "tpe", "n_startup": 3}}, "sampler", "bad options"),
])
def test_bad_study_fails_before_any_trial(tmp_path, results_root, fields, key, message):
    path = write_study(tmp_path, "bad", **fields)
    with pytest.raises(ConfigError) as info:
        load_study_spec(path)
    assert info.value.source == str(path) and info.value.key == key
    assert message in str(info.value)
    assert main(["tune", str(path)]) == 2  # the CLI reports it (exit 2) and starts nothing
    assert not (results_root / "bad").exists()


def test_workers_below_one_names_the_flag(tmp_path, results_root, capsys):
    """One line naming the flag: it printed ``--workers: <top level>: ...`` (source and key swapped)."""
    path = write_study(tmp_path, "noworkers")
    assert main(["tune", str(path), "--workers", "0"]) == 2
    error = capsys.readouterr().err
    assert "command line: --workers: must be >= 1, got 0" in error and "<top level>" not in error
    assert not (results_root / "noworkers").exists()


@pytest.mark.parametrize(("fields", "key", "message"), [
    # sections built by config.build_dataclass, as run configs are: same key paths and wording
    ({"search_space": {"optimizer.lr": {"lo": 1e-4, "high": 1e-2}}}, "search_space.optimizer.lr.lo",
     "unknown key; allowed in search_space.optimizer.lr: choices, grid, high, log, low, step, type"),
    ({"search_space": {"optimizer.lr": {"type": "integer", "low": 1, "high": 4}}}, "search_space.optimizer.lr.type",
     "'integer' is not allowed; expected one of 'float', 'int', 'categorical', 'bool'"),
    ({"search_space": {"optimizer.lr": {"low": "small", "high": 1e-2}}}, "search_space.optimizer.lr.low",
     "expected a number, got 'small'"),
    ({"search_space": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-3}}},
     "search_space.optimizer.lr.step", "a log range cannot have a step"),
    ({"description": 5}, "description", "expected a string, got 5"),
    ({"retry": {"max_retry": 1.5}}, "retry.max_retry", "expected an integer, got 1.5"),
    ({"retry": {"max_retries": 1}}, "retry.max_retries", "unknown key; allowed in retry: errors, max_retry"),
    ({"heartbeat": {"interval": 10, "grace_period": 10}}, "heartbeat.grace_period", "> interval (10)"),
    ({"objective": {"metric": "val/ar_nll", "reduce": "mean"}}, "objective.reduce", "'mean' is not allowed"),
    ({"objectives": ["val/ar_nll", {"metric": "val"}], "pruner": None}, "objectives[1].metric",
     "expected split/metric"),
    ({"seeds": [0, 0]}, "seeds", "distinct"),
    ({"budget": "0.5dur"}, "budget", "the per-trial budget is tokens"),
    ({"n_trials": 0}, "n_trials", "must be an integer >= 1"),
    ({"trials": 4}, "trials", "unknown key; allowed in the top level:"),
])
def test_study_file_sections_are_validated_like_run_configs(tmp_path, fields, key, message):
    path = write_study(tmp_path, "schema", **fields)
    with pytest.raises(ConfigError) as info:
        load_study_spec(path)
    assert (info.value.source, info.value.key) == (str(path), key)
    assert message in info.value.message


def test_unreachable_storage_fails_before_any_trial(tmp_path, results_root, capsys):
    path = write_study(tmp_path, "nostorage")
    assert main(["tune", str(path), "--storage", "postgresql://nobody:secret@127.0.0.1:1/none"]) == 2
    error = capsys.readouterr().err
    assert f"{path}: storage: cannot open postgresql://nobody:***@127.0.0.1:1/none" in error
    assert "secret" not in error
    assert main(["tune", str(path), "--storage", "no-such-scheme://x"]) == 2
    assert "storage" in capsys.readouterr().err
    assert not (results_root / "nostorage").exists()


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_are_valid(path):
    full, smoke = load_study_spec(path), load_study_spec(path, smoke=True)
    assert smoke.name == f"{full.name}-smoke" and smoke.n_trials <= 2 <= full.n_trials
    assert smoke.run["model"]["d_model"] <= 64 and smoke.budget == "8192tok"
    assert full.enqueue, "ship the known (paper) settings as enqueued points"


# --------------------------------------------------------------------------------------------------------------
# the worker loop with a stand-in objective (no training): grid coverage, on/off choices, topping a study up


def test_worker_loop_grid_and_top_up(tmp_path, results_root, monkeypatch):
    def objective(spec, trial, frozen, log):  # what run_trial returns, computed from the sampled config values
        _, values = spec.trial_values(lambda p: p.suggest(trial))
        return [values["optimizer.lr"] * (2.0 if values.get("algorithms.dropout") else 1.0)]

    monkeypatch.setattr(tune_worker, "run_trial", objective)
    space = {"optimizer.lr": {"low": 1e-3, "high": 3e-3, "grid": [1e-3, 2e-3, 3e-3]},
             "algorithms.dropout": {"choices": {"off": None, "on": {"mlp": 0.1}}}}
    path = write_study(tmp_path, "grid", search_space=space, sampler="grid", n_trials=6)
    assert main(["tune", str(path)]) == 0
    trials = optuna.load_study(study_name="grid", storage=storage_of(results_root, "grid")).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    visited = sorted((t.params["optimizer.lr"], t.params["algorithms.dropout"]) for t in trials)
    assert visited == sorted((lr, d) for lr in (1e-3, 2e-3, 3e-3) for d in ("off", "on"))  # each point once
    assert all(t.value == pytest.approx(t.params["optimizer.lr"] * (2 if t.params["algorithms.dropout"] == "on"
                                                                      else 1)) for t in trials)

    path = write_study(tmp_path, "grow", sampler={"name": "random", "seed": 3}, n_trials=2)
    assert main(["tune", str(path)]) == 0
    assert main(["tune", str(path), "--trials", "5"]) == 0  # tops the study up to 5 trials
    assert main(["tune", str(path), "--trials", "3"]) == 0  # the total only grows
    trials = optuna.load_study(study_name="grow", storage=storage_of(results_root, "grow")).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["optimizer.lr"] for t in trials}) == 5


# --------------------------------------------------------------------------------------------------------------
# a designed SQLite study: enqueued points, pruning, a failing trial, the summary


class OutOfMemoryAt(Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_worker_logs_progress_after_each_trial(tmp_path, results_root, monkeypatch, capsys):
    """One plain line per finished trial: done/total, best so far and an ETA while trials remain."""
    monkeypatch.setattr(tune_worker, "run_trial", lambda spec, trial, frozen, log: [
        spec.trial_values(lambda p: p.suggest(trial))[1]["optimizer.lr"]])
    path = write_study(tmp_path, "progress", sampler={"name": "random", "seed": 1}, n_trials=3)
    assert main(["tune", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[tune] progress:")]
    trials = optuna.load_study(study_name="progress", storage=storage_of(results_root, "progress")).get_trials()
    best = min(trials, key=lambda t: t.value)
    assert [line.split(" trials finished")[0] for line in lines] == [f"[tune] progress: {n}/3" for n in (1, 2, 3)]
    assert "ETA ~" in lines[0] and "ETA" not in lines[-1]
    assert lines[-1].endswith(f"(3 complete, 0 pruned, 0 fail), 0 running; best val/ar_nll {best.value:.4f} "
                              f"(trial {best.number})")


def test_sqlite_study_prunes_fails_and_summarizes(tmp_path, results_root, monkeypatch, capsys):
    real_train = train_module.train

    def train_with_oom(config, *args, extra_callbacks=(), **kwargs):  # the third enqueued point runs out of memory
        if math.isclose(config.optimizer.lr, 2e-3):
            extra_callbacks = [*extra_callbacks, OutOfMemoryAt(2)]
        return real_train(config, *args, extra_callbacks=extra_callbacks, **kwargs)

    monkeypatch.setattr(train_module, "train", train_with_oom)
    # trial 0 learns; trial 1 raises; trial 2 (lr 1e-6) has not moved at the first evaluation: above the median
    # of the completed trials there -> pruned; trial 3 is sampled
    path = write_study(tmp_path, "designed", n_trials=4, sampler={"name": "random", "seed": 0},
                       pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                       enqueue=[{"optimizer.lr": 3e-3}, {"optimizer.lr": 2e-3}, {"optimizer.lr": 1e-6}])
    assert main(["tune", str(path)]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="designed", storage=storage_of(results_root, "designed"))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[3].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert [t.params["optimizer.lr"] for t in trials[:3]] == [3e-3, 2e-3, 1e-6]
    folders = [results_root / "designed" / f"trial-{n}" for n in range(4)]

    # the objective is the best validation NLL of the run's own tidy metrics; reported per evaluation in tokens
    val = read_metrics(folders[0] / "metrics.parquet").filter((pl.col("split") == "val")
                                                               & (pl.col("metric") == "ar_nll"))
    assert trials[0].value == pytest.approx(val["value"].min())
    assert trials[0].intermediate_values == dict(zip(val["tokens_seen"].to_list(), val["value"].to_list()))
    assert sorted(trials[0].intermediate_values) == [4096, 8192]
    assert read_summary(folders[0])["status"] == "complete"

    # the raising trial is FAIL with its error, its folder says failed, and the study went on
    assert "CUDA out of memory" in trials[1].user_attrs["error"]
    assert read_summary(folders[1])["status"] == "failed"
    assert "trial 1 fail" in out and "trial 3" in out

    # pruned after the first evaluation, worse than trial 0 there; its curve up to that evaluation is kept
    assert list(trials[2].intermediate_values) == [4096]
    assert trials[2].intermediate_values[4096] > trials[0].intermediate_values[4096]
    pruned = read_metrics(folders[2] / "metrics.parquet")
    assert pruned.filter((pl.col("split") == "val") & (pl.col("metric") == "ar_nll"))["step"].to_list() == [4]
    assert pruned.filter(pl.col("split") == "train")["step"].max() == 4
    assert read_summary(folders[2])["status"] == "pruned"
    assert "pruned at 4,096 tokens" in trials[2].user_attrs["pruned"]

    # a second worker on a finished study has nothing to do; a changed study spec is refused
    assert main(["tune", str(path)]) == 0
    assert len(study.get_trials()) == 4
    changed = write_study(tmp_path, "designed", n_trials=4, search_space={"optimizer.lr": {"low": 1e-5, "high": 0.1}})
    with pytest.raises(ConfigError, match="differs from study 'designed'"):
        from workbench.tune.study import connect, open_study

        spec = load_study_spec(changed)
        open_study(spec, connect(spec, f"sqlite:///{results_root / 'designed' / 'study.db'}"), "sqlite")

    capsys.readouterr()
    assert main(["tune", "--summary", str(path)]) == 0
    summary = capsys.readouterr().out
    assert "4 trials: " in summary and "best trials by val/ar_nll (minimize):" in summary
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"  trial {best.number}: {best.value:.4f}" in summary
    assert "parameter importances" in summary
    table = pl.read_csv(results_root / "designed" / "trials.csv")
    assert table["state"].to_list()[:3] == ["complete", "fail", "pruned"]
    for figure in ("history.png", "param-optimizer_lr.png"):
        assert (results_root / "designed" / "figures" / figure).stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------------------
# a shipped study on CPU with --workers 2: separate processes, multi-objective, an on/off (conditional) choice


def test_shipped_dual_study_with_two_local_workers(results_root, capsys):
    path = next(p for p in STUDIES if p.stem == "dual_alpha")
    assert main(["tune", str(path), "--smoke", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    children = {int(pid) for pid in out.split("started 2 workers: ")[1].splitlines()[0].split(", ")}
    study = optuna.load_study(study_name="dual_alpha-smoke", storage=storage_of(results_root, "dual_alpha-smoke"))
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    assert trials[0].params == {"objective.dual.ar_fraction": 0.5, "algorithms.dropout": "off"}  # enqueued
    for trial in trials:
        assert int(trial.user_attrs["worker"].rsplit(":", 1)[1]) in children  # ran in a spawned worker
        config = yaml.safe_load((results_root / "dual_alpha-smoke" / f"trial-{trial.number}" / "config.yaml")
                                .read_text())
        assert config["objective"]["dual"]["ar_fraction"] == trial.params["objective.dual.ar_fraction"]
        if trial.params["algorithms.dropout"] == "off":  # the strength is sampled only when the section is on
            assert config["algorithms"]["dropout"] is None and "algorithms.dropout.mlp" not in trial.params
        else:
            assert config["algorithms"]["dropout"]["mlp"] == trial.params["algorithms.dropout.mlp"]
        summary = read_summary(results_root / "dual_alpha-smoke" / f"trial-{trial.number}")
        assert trial.values == [summary["best_ar_nll"], summary["best_mdm_nelbo"]]
    assert json.loads(json.dumps(study.metric_names)) == ["val/ar_nll", "val/mdm_nelbo"]
    assert os.getpid() not in children

    assert main(["tune", "--summary", str(path), "--smoke"]) == 0
    summary = capsys.readouterr().out
    assert "Pareto front (val/ar_nll minimize, val/mdm_nelbo minimize):" in summary
    assert "parameter importances for val/mdm_nelbo" in summary
    figures = results_root / "dual_alpha-smoke" / "figures"
    assert {p.name for p in figures.iterdir()} == {"history.png", "param-objective_dual_ar_fraction.png",
                                                    "param-algorithms_dropout.png", "param-algorithms_dropout_mlp.png"}
