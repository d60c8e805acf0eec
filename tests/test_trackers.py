"""Trackers (``loggers:``): a real tiny run writes TensorBoard events, an MLflow run and an offline W&B run whose
metrics are the tidy rows of metrics.parquet (same names, steps and values), with the config as parameters and
the ablation/variant grouping; the user-facing errors come before any work."""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import pytest

from workbench.config import ConfigError
from workbench.results import read_metrics
from workbench.trackers import build_trackers, check_trackers, flatten, run_group
from workbench.train import train

SHORT = {"max_duration": "8ba", "checkpoint_interval": "8ba", "log_interval": 4}


def _tidy(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    frame = read_metrics(run_dir / "metrics.parquet")
    assert frame is not None
    out: dict[str, list[tuple[int, float]]] = {}
    for row in frame.sort("step").iter_rows(named=True):
        out.setdefault(f"{row['split']}/{row['metric']}", []).append((row["step"], row["value"]))
    return out


def _assert_same(curve: list[tuple[int, float]], rows: list[tuple[int, float]], name: str, rel: float = 1e-9) -> None:
    assert [step for step, _ in curve] == [step for step, _ in rows], name
    assert [value for _, value in curve] == pytest.approx([value for _, value in rows], rel=rel), name


def _ablation_run_dir(root: Path) -> Path:
    """The layout and variant.json the ablation runner writes (workbench.ablate)."""
    run_dir = root / "abl" / "mask" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "variant.json").write_text(json.dumps({"ablation": "abl", "variant": "mask", "group": "mask",
                                                      "seed": 0, "run": "abl-mask-seed0"}))
    return run_dir


def _wandb_records(path: str) -> tuple[list[dict], object, list[str]]:
    """History rows, the run record and the config keys of an offline W&B run file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(path)
    history, run, config = [], None, []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            row.setdefault("_step", record.history.step.num)
            history.append(row)
        elif kind == "run":
            run = record.run
        elif kind == "config":
            config += [item.key for item in record.config.update]
    return history, run, config


@pytest.mark.slow
def test_trackers_receive_the_tidy_rows_with_config_and_ablation_grouping(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    with_wandb = importlib.util.find_spec("wandb") is not None
    loggers = {"tensorboard": {}, "mlflow": {}, **({"wandb": {}} if with_wandb else {})}
    config = tiny_config({"name": "abl-mask-seed0", "trainer": SHORT, "scheduler": {"warmup": "2ba"},
                          "eval": {"interval": "4ba"}, "algorithms": {"token_masking": {"rate": 0.25}},
                          "loggers": loggers})
    run_dir = _ablation_run_dir(tmp_path)
    train(config, run_dir=run_dir)
    tidy = _tidy(run_dir)
    assert {"train/loss", "val/ar_nll", "val/ar_ppl", "val/unigram_entropy"} <= set(tidy)
    assert [step for step, _ in tidy["val/ar_nll"]] == [4, 8]

    # TensorBoard: events under <ablation>/tensorboard/<run>, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "abl" / "tensorboard" / config.name))
    events.Reload()
    assert set(tidy) <= set(events.Tags()["scalars"])
    assert not any(tag.startswith(("metrics/", "loss/")) for tag in events.Tags()["scalars"])  # no raw names
    for name, rows in tidy.items():
        _assert_same([(e.step, e.value) for e in events.Scalars(name)], rows, name, rel=1e-6)  # float32 events

    # MLflow: experiment = ablation, tags = variant/seed, params = config + algorithms, metrics = tidy rows
    import mlflow

    client = mlflow.MlflowClient((tmp_path / "abl" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("abl")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == config.name and run.info.status == "FINISHED"
    assert (run.data.tags["ablation"], run.data.tags["variant"], run.data.tags["seed"]) == ("abl", "mask", "0")
    params = run.data.params
    assert params["config.model.d_model"] == "64" and params["config.optimizer.lr"] == "0.003"
    assert params["algorithms.token_masking.rate"] == "0.25" and params["algorithms.objective.name"] == "ar"
    assert params["group.variant"] == "mask"
    assert set(run.data.metrics) == set(tidy)
    for name, rows in tidy.items():
        _assert_same(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)), rows, name)

    if with_wandb:  # offline: no account, no network; the run file read back record by record
        (path,) = glob.glob(str(tmp_path / "abl" / "wandb" / "offline-run-*" / "run-*.wandb"))
        history, wandb_run, config_keys = _wandb_records(path)
        assert (wandb_run.run_group, wandb_run.job_type, wandb_run.display_name) == ("abl", "mask", config.name)
        assert {"config.model.n_layers", "algorithms.token_masking.rate", "group.ablation"} <= set(config_keys)
        logged: dict[str, list[tuple[int, float]]] = {}
        for row in history:
            for key, value in row.items():
                if not key.startswith("_"):
                    logged.setdefault(key, []).append((row["_step"], value))
        assert logged.keys() == tidy.keys()
        for name, rows in tidy.items():
            _assert_same(logged[name], rows, name)


def test_no_tracker_by_default(tiny_config, tmp_path):
    config = tiny_config()
    assert (config.loggers.tensorboard, config.loggers.mlflow, config.loggers.wandb) == (None, None, None)
    assert build_trackers(config, tmp_path / "run", writer=None) == []


def test_missing_tracker_package_is_a_config_error(tiny_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"loggers\.mlflow: needs the mlflow package.*\[trackers\]"):
        check_trackers(tiny_config({"loggers": {"mlflow": {}}}))
    check_trackers(tiny_config({"loggers": {"tensorboard": {}}}))


def test_unknown_logger_key_names_the_dotted_key(tiny_config):
    with pytest.raises(ConfigError, match=r"loggers\.tensorbord: unknown key; allowed in loggers: mlflow, "
                       r"tensorboard, wandb"):
        tiny_config({"loggers": {"tensorbord": {}}})
    with pytest.raises(ConfigError, match=r"loggers\.wandb\.mode"):
        tiny_config({"loggers": {"wandb": {"mode": "cloud"}}})


def test_run_group_from_the_files_ablations_and_studies_leave(tmp_path):
    run_dir = _ablation_run_dir(tmp_path)
    group = run_group(run_dir)
    assert (group["kind"], group["group"], group["job"], group["root"]) == ("ablation", "abl", "mask", tmp_path / "abl")
    assert group["tags"] == {"ablation": "abl", "variant": "mask", "variant_group": "mask", "seed": "0"}

    trial = tmp_path / "study-x" / "trial-3" / "seed-1"
    trial.mkdir(parents=True)
    (trial / "summary.json").write_text(json.dumps({"study": "study-x", "trial": 3, "params": {}}))
    group = run_group(trial)
    assert (group["kind"], group["group"], group["job"], group["root"]) == ("study", "study-x", "trial-3",
                                                                            tmp_path / "study-x")
    lone = tmp_path / "results" / "my-run"
    assert run_group(lone)["root"] == tmp_path / "results" and run_group(lone)["group"] is None


def test_flatten_gives_scalar_parameters():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None}}, "config") == {
        "config.a.b": 1, "config.a.c": "[1, 2]", "config.a.d": "null"}


def test_turning_a_tracker_on_does_not_make_a_stored_run_a_different_run(tiny_config, tmp_path):
    """Trackers only mirror the rows: adding loggers: to an ablation must not refuse its completed runs."""
    from workbench.config import dump_config
    from workbench.results import write_summary
    from workbench.train import check_run_dir

    stored = tiny_config({"name": "r"})
    (tmp_path / "config.yaml").write_text(dump_config(stored))
    write_summary(tmp_path, status="complete")
    assert check_run_dir(tiny_config({"name": "r", "loggers": {"tensorboard": {}}}), tmp_path, resume=True) == \
        "complete"
