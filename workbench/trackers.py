"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) through Composer's own logger destinations.

``metrics.parquet`` stays the source of truth; a tracker receives the *same* tidy rows, named ``<split>/<metric>``
(``train/loss``, ``val/ar_nll``, ``piqa/acc_norm``...) at their training step, not Composer's raw metric stream
(``loss/train/total``, ``metrics/val/ar_nll``), so a curve in a tracker is the curve in the parquet file.

:class:`TrackerBridge` wraps one Composer destination (``TensorboardLogger``, ``MLFlowLogger``, ``WandBLogger``):
every Composer event goes to the wrapped logger as usual (it opens, flushes and closes its run), but instead of
Composer's metrics it forwards the rows the tidy writer added since the last event. At INIT it logs the run's
config (``config.<dotted key>``), its active algorithms (``algorithms.<...>``) and where it belongs (ablation,
variant, seed; study, trial) as hyperparameters/parameters.

Grouping: an ablation run (``variant.json`` in its folder) is grouped by ablation and variant: W&B group =
ablation, job type = variant; MLflow experiment = ablation, tags ``ablation``/``variant``/``seed``; TensorBoard
writes every run of the ablation under one ``tensorboard/`` folder (``tensorboard --logdir <ablation>/tensorboard``).
An Optuna trial (``summary.json`` holding ``study``) is grouped by study the same way (job type ``trial-<n>``).
Default locations live in the group folder (the ablation's or study's results folder; for a lone run, the folder
holding the run): ``tensorboard/``, ``mlruns/`` (MLflow's local file store) and ``wandb/``.

Versions: Composer 0.32.1's loggers need ``mlflow<3`` and ``wandb<0.19`` (its WandBLogger calls ``Run.get_url``,
removed later); the ``trackers`` extra pins those ranges, with ``mlflow-skinny`` (the client without the server's
pyarrow pin). MLflow 2's SQL stores do not run on SQLAlchemy 2.1 (Optuna's), hence the file store by default;
``tracking_uri`` takes a server (``http://host:5000``) or any store that works with the installed packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from composer.core import Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from workbench.config import ConfigError, RunConfig
from workbench.results import SUMMARY_FILE, VARIANT_FILE, MetricsWriter, read_json_object

INSTALL_HINT = "pip install -e '.[trackers]'"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(config: RunConfig, source: str = "config") -> None:
    """Fail before any data is prepared when a configured tracker's package is missing."""
    for name, module in _PACKAGES.items():
        if getattr(config.loggers, name) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(source, f"loggers.{name}", f"needs the {module} package, which is not installed: "
                              f"{INSTALL_HINT}")


def run_group(run_dir: Path) -> dict[str, Any]:
    """What a run belongs to, from the files the ablation runner and the study worker leave in its folder:
    ``{"kind": "ablation"|"study"|None, "group": name, "job": variant or trial, "root": group folder, ...}``."""
    run_dir = Path(run_dir)
    info: dict[str, Any] = {"kind": None, "group": None, "job": None, "root": run_dir.parent, "tags": {}}
    variant = read_json_object(run_dir / VARIANT_FILE) or {}
    summary = read_json_object(run_dir / SUMMARY_FILE) or {}
    if variant.get("ablation"):
        info.update(kind="ablation", group=str(variant["ablation"]), job=str(variant.get("variant")))
        info["tags"] = {"ablation": variant["ablation"], "variant": variant.get("variant"),
                        "variant_group": variant.get("group"), "seed": variant.get("seed")}
    elif summary.get("study"):
        info.update(kind="study", group=str(summary["study"]), job=f"trial-{summary.get('trial')}")
        info["tags"] = {"study": summary["study"], "trial": summary.get("trial")}
    if info["group"]:
        for parent in list(run_dir.parents)[:3]:  # <group>/<variant>/seed<k> or <study>/trial-<n>[/seed-<k>]
            if parent.name == info["group"]:
                info["root"] = parent
                break
    info["tags"] = {k: str(v) for k, v in info["tags"].items() if v is not None}
    return info


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts -> ``{"prefix.a.b": value}``; lists and None become strings (trackers take scalars)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if tree is None or isinstance(tree, list | tuple):
        return {prefix: json.dumps(tree)}
    return {prefix: tree}


def run_parameters(config: RunConfig, group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters every tracker gets: the resolved config, active algorithms and the run's group."""
    from workbench.train import active_algorithms

    params = {**flatten(config.to_dict(), "config"), **flatten(active_algorithms(config), "algorithms")}
    params.update({f"group.{key}": value for key, value in group["tags"].items()})
    return params


class TrackerBridge(LoggerDestination):
    """One Composer logger destination fed the tidy rows of ``writer`` instead of Composer's metric names."""

    def __init__(self, inner: LoggerDestination, writer: MetricsWriter, params: dict[str, Any]):
        super().__init__()
        self.inner, self.writer, self.params = inner, writer, params
        self._cursor = len(writer.rows)  # rows from an earlier process were sent by that process

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            # the tidy logger (earlier in the loggers list) has just dropped rows after the resumed checkpoint
            self._cursor = min(self._cursor, len(self.writer.rows))
        self._forward()
        self.inner.run_event(event, state, logger)
        if event == Event.INIT:
            self.inner.log_hyperparameters(self.params)

    def _forward(self) -> None:
        """Send the rows added since the last call, one log_metrics call per step (in the order written)."""
        rows = self.writer.rows
        if self._cursor >= len(rows) or dist.get_global_rank() != 0:
            self._cursor = len(rows)
            return
        batch: dict[str, float] = {}
        step = None
        for row in rows[self._cursor:]:
            if step is not None and row["step"] != step:
                self.inner.log_metrics(batch, step=step)
                batch = {}
            step = int(row["step"])
            batch[f"{row['split']}/{row['metric']}"] = float(row["value"])
        if batch:
            self.inner.log_metrics(batch, step=step)
        self._cursor = len(rows)

    # Composer's own hyperparameters (composer version, seeds...) and other calls go through unchanged;
    # its metrics do not (the tidy rows replace them)
    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self.inner.log_hyperparameters(hyperparameters)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self.inner.log_table(*args, **kwargs)

    def log_images(self, *args: Any, **kwargs: Any) -> None:
        self.inner.log_images(*args, **kwargs)

    def close(self, state: State, logger: Logger) -> None:
        self._forward()
        self.inner.close(state, logger)

    def post_close(self) -> None:
        self.inner.post_close()


def _local_store(uri: str) -> Path | None:
    """The folder or database file of a local MLflow store (None for a server)."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            return Path(uri.removeprefix(prefix))
    return None if "://" in uri else Path(uri)


def build_trackers(config: RunConfig, run_dir: Path, writer: MetricsWriter, resume: bool = False,
                   log=print) -> list[TrackerBridge]:
    """The configured trackers as bridged Composer destinations (empty when ``loggers`` is all off)."""
    cfg = config.loggers
    if cfg.tensorboard is None and cfg.mlflow is None and cfg.wandb is None:
        return []
    check_trackers(config)
    group = run_group(run_dir)
    root: Path = group["root"]
    params = run_parameters(config, group)
    out: list[TrackerBridge] = []
    if cfg.tensorboard is not None:
        from composer.loggers import TensorboardLogger

        folder = Path(cfg.tensorboard.dir).expanduser() if cfg.tensorboard.dir else root / "tensorboard"
        out.append(TrackerBridge(TensorboardLogger(log_dir=str(folder), flush_interval=cfg.tensorboard.flush_interval),
                                 writer, params))
        log(f"[train] tensorboard: {folder / config.name} (tensorboard --logdir {folder})")
    if cfg.mlflow is not None:
        from composer.loggers import MLFlowLogger

        uri = cfg.mlflow.tracking_uri or (root / "mlruns").resolve().as_uri()
        experiment = cfg.mlflow.experiment or group["group"] or "workbench"
        store = _local_store(uri)
        # parallel runs of one ablation share one local store: creating its tables or the experiment twice at once
        # fails, so the constructor (which creates the store on first use, and the experiment) runs under its lock
        from datasets_prep.cache import exclusive

        lock = exclusive(store) if store else contextlib.nullcontext()
        with lock:
            inner = MLFlowLogger(experiment_name=experiment, run_name=config.name, tracking_uri=uri,
                                 tags=dict(group["tags"]), run_group=group["group"], resume=resume,
                                 log_system_metrics=False)
        out.append(TrackerBridge(inner, writer, params))
        log(f"[train] mlflow: experiment {experiment!r} in {uri}")
    if cfg.wandb is not None:
        from composer.loggers import WandBLogger

        folder = Path(cfg.wandb.dir).expanduser() if cfg.wandb.dir else root
        folder.mkdir(parents=True, exist_ok=True)
        # a stable id (run folder + name) lets a resumed workbench run continue its W&B run
        run_id = hashlib.sha256(f"{Path(run_dir).resolve()}|{config.name}".encode()).hexdigest()[:16]
        init: dict[str, Any] = {"mode": cfg.wandb.mode, "dir": str(folder), "id": run_id}
        if cfg.wandb.mode == "online":  # offline runs cannot resume (W&B warns and starts anew)
            init["resume"] = "allow"
        if group["job"]:
            init["job_type"] = group["job"]
        out.append(TrackerBridge(WandBLogger(project=cfg.wandb.project, group=group["group"], name=config.name,
                                             entity=cfg.wandb.entity, init_kwargs=init,
                                             tags=[*cfg.wandb.tags, *(f"{k}:{v}" for k, v in group["tags"].items())]
                                             or None), writer, params))
        log(f"[train] wandb: project {cfg.wandb.project!r} ({cfg.wandb.mode}) in {folder / 'wandb'}")
    return out
