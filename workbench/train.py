"""The one place a run config becomes Composer objects, and the training entry point every path uses
(``workbench train``, ablations, Optuna trials)."""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.config import ConfigError, RunConfig, dump_config
from workbench.durations import epochs_in_tokens
from workbench.paths import results_dir
from workbench.results import CHECKPOINTS, CONFIG_FILE, MetricsWriter, read_summary, write_summary


class RunExistsError(RuntimeError):
    """A run folder already holds a different config, or a run that was not asked to resume."""


@dataclass
class BuiltRun:
    trainer: Any
    model: Any
    prepared: Any
    run_dir: Path


def active_algorithms(config: RunConfig) -> dict[str, Any]:
    """Objective and regularizers with their strengths, as stored in the run's metadata."""
    active: dict[str, Any] = {"objective": {"name": config.objective.name, "z_loss": config.objective.z_loss}}
    for section in ("diffusion", "dual", "prefix_lm"):
        value = getattr(config.objective, section)
        if value is not None:
            active["objective"][section] = value.__dict__ if not hasattr(value, "time_sampler") else {
                **value.__dict__, "time_sampler": value.time_sampler.__dict__}
    for name in ("token_masking", "dropout", "weight_decay"):
        value = getattr(config.algorithms, name)
        if value is not None:
            active[name] = json.loads(json.dumps(value, default=lambda o: o.__dict__))
    if config.optimizer.weight_decay:
        active["optimizer_weight_decay"] = {"value": config.optimizer.weight_decay, "optimizer": config.optimizer.name}
    return active


def run_dir_for(config: RunConfig, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir) if run_dir is not None else results_dir() / config.name


# keys that change what is shown or mirrored, never a result: a stored run with other values is the same run
NOT_IDENTITY = ("loggers", "trainer.progress_bar")  # trackers; the terminal's bar or plain lines


def check_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> str:
    """'new', 'resume' or 'complete'; refuses a changed config or an existing run without ``resume``."""
    from workbench.config import config_differences

    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        return "new"
    try:  # by value: a key added to the schema since the run was stored takes its default and changes nothing
        differences = config_differences(config_path, config, ignore=NOT_IDENTITY)
    except ConfigError as err:
        raise RunExistsError(f"{run_dir} holds a run with a different config that cannot be compared ({err}); "
                             "refusing to mix results: choose another run name or delete the folder") from None
    if differences:
        raise RunExistsError(f"{run_dir} holds a run with a different config ({config_path}: "
                             f"{'; '.join(differences)}); refusing to mix results: choose another run name or "
                             "delete the folder")
    summary = read_summary(run_dir) or {}
    if summary.get("status") == "complete":
        return "complete"
    if not resume:
        raise RunExistsError(f"{run_dir} already holds this run (status {summary.get('status', 'unknown')}); "
                             "pass --resume to continue it from its latest checkpoint")
    return "resume"


def _device(config: RunConfig) -> str:
    """Composer's name (``gpu``/``cpu``) of the device trainer.device resolves to."""
    from workbench.devices import composer_device, resolve_device

    return composer_device(resolve_device(config.trainer.device, "config", "trainer.device"))


def _precision(config: RunConfig, device: str) -> str:
    if config.trainer.precision != "auto":
        if device == "cpu" and config.trainer.precision != "fp32":  # Composer 0.32.1 trains only fp32 on a CPU
            raise ConfigError("config", "trainer.precision", f"{config.trainer.precision} needs a GPU; use fp32 (or "
                              "auto) on CPU")
        return config.trainer.precision
    return "amp_bf16" if device == "gpu" else "fp32"


def build_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "decoupled_adamw":
        from composer.optim import DecoupledAdamW

        return DecoupledAdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                             fused=fused)


def build_scheduler(config: RunConfig):
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    sched = config.scheduler
    if sched.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=sched.warmup, alpha_f=sched.alpha_f)
    if sched.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=sched.warmup, alpha_f=sched.alpha_f)
    return ConstantWithWarmupScheduler(t_warmup=sched.warmup)


def objective_algorithm(config: RunConfig, mask_id: int):
    """The algorithm that installs the run's training objective; None for plain AR (the model's default)."""
    from workbench.algorithms import DualObjectiveMixing, MaskedDiffusion, PrefixLM

    objective = config.objective
    if objective.name == "mdm":
        return MaskedDiffusion(objective.diffusion, mask_id, objective.z_loss)
    if objective.name == "dual":
        return DualObjectiveMixing(objective.diffusion, objective.dual, mask_id, objective.z_loss)
    if objective.name == "prefix_lm":
        return PrefixLM(objective.prefix_lm, objective.z_loss)
    return None


def build_model(config: RunConfig, tokenizer, install_objective: bool = False):
    """The WorkbenchLM for ``config`` (random init). Training lets the objective algorithm install the loss at
    Event.INIT; evaluation of a checkpoint (``install_objective``) needs it installed now so scorers resolve."""
    from workbench.lm import WorkbenchLM
    from workbench.model import Transformer, TransformerConfig
    from workbench.objectives import ARObjective

    m = config.model
    net = Transformer(TransformerConfig(
        vocab_size=tokenizer.vocab_size, max_seq_len=config.data.seq_len, n_layers=m.n_layers, d_model=m.d_model,
        n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, norm=m.norm, tie_embeddings=m.tie_embeddings,
        rope_theta=m.rope_theta, init_std=m.init_std, attention=m.attention))
    diffusion = config.objective.diffusion
    model = WorkbenchLM(net, tokenizer.mask_id, tokenizer.eos_id, tokenizer.vocab_size, config.shifted,
                        tuple(config.eval_metrics), config.eval.nelbo_samples,
                        subs=diffusion.subs if diffusion is not None else True)
    if install_objective:
        algorithm = objective_algorithm(config, tokenizer.mask_id)
        model.objective = algorithm.objective if algorithm is not None else ARObjective(config.objective.z_loss)
    return model


def build_algorithms(config: RunConfig, mask_id: int, eos_id: int, vocab_size: int,
                     special_ids: tuple[int, ...] = ()) -> list:
    """``special_ids``: the tokenizer's special tokens, never drawn as random replacements by token masking."""
    from composer.algorithms import GradientClipping

    from workbench.algorithms import Dropout, TokenMasking, WeightDecay

    algos = config.algorithms
    objective = objective_algorithm(config, mask_id)
    out: list = [objective] if objective is not None else []
    if algos.token_masking is not None:
        out.append(TokenMasking(algos.token_masking, mask_id, eos_id, vocab_size, special_ids))
    if algos.dropout is not None:
        out.append(Dropout(algos.dropout))
    if algos.weight_decay is not None:
        out.append(WeightDecay(algos.weight_decay))
    if config.trainer.grad_clip_norm:
        out.append(GradientClipping(clipping_type="norm", clipping_threshold=config.trainer.grad_clip_norm))
    return out


def build_callbacks(config: RunConfig) -> list:
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor

    from workbench.callbacks import RNGCheckpoint

    available = {"speed_monitor": SpeedMonitor, "lr_monitor": LRMonitor, "memory_monitor": MemoryMonitor,
                 "runtime_estimator": RuntimeEstimator}
    callbacks: list = [RNGCheckpoint()]
    if "speed_monitor" not in config.callbacks:
        callbacks.append(SpeedMonitor(window_size=config.trainer.log_interval))
    for name, options in config.callbacks.items():
        try:
            callbacks.append(available[name](**options))
        except TypeError as err:
            raise ConfigError("config", f"callbacks.{name}", f"bad options: {err}") from None
    return callbacks


def build_run(config: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
              extra_callbacks: Sequence = (), log: Callable[[str], None] = print, prepared=None,
              progress: bool = False) -> BuiltRun:
    """Prepare data, build the model and a Composer Trainer for ``config`` (does not train).

    ``progress``: show the run moving (:class:`workbench.callbacks.TrainProgress`: a bar on a terminal when
    ``trainer.progress_bar``, else lines through ``log``); off for library callers such as the benchmark.

    ``prepared``: already prepared shards (:class:`datasets_prep.corpus.PreparedData`) to use instead of the
    data section's corpus (the benchmark trains on random-token shards of a given shape)."""
    from composer.core import Evaluator
    from composer.utils.reproducibility import seed_all

    from datasets_prep.corpus import prepare
    from workbench import composer_patches  # noqa: F401 (Composer's engine patch, applied once at its import)
    from workbench.algorithms.token_masking import special_token_ids
    from workbench.callbacks import TidyMetricsLogger, TrainProgress
    from workbench.data import build_loader
    from workbench.trainer import WorkbenchTrainer
    run_dir = run_dir_for(config, run_dir)
    state = check_run_dir(config, run_dir, resume)
    downstream = config.eval.downstream
    if downstream is not None and downstream.tasks:
        from workbench.evaluation.tasks import check_tasks

        check_tasks(downstream.tasks)  # bad task names/files fail before any data is prepared
    from workbench.trackers import build_trackers, check_trackers

    check_trackers(config)  # a configured tracker whose package is missing fails here too
    point, recovered = None, None
    if state == "resume":
        from workbench.resume import find_resume_point, recover_metrics

        point = find_resume_point(run_dir, log)  # a broken checkpoint or metrics file is refused before data prep
        recovered = recover_metrics(run_dir, point, log)
    device = _device(config)
    precision = _precision(config, device)

    if prepared is None:
        prepared = prepare(config.data, log=log)
    tokenizer = prepared.tokenizer
    seed_all(config.seed)  # before the model is built: Trainer(seed=) would come too late for the init
    model = build_model(config, tokenizer)
    net = model.net

    train_spec = build_loader(prepared.train.path, config.data.batch_size, shuffle=True, seed=config.seed,
                              num_workers=config.data.num_workers, view=run_dir / CHECKPOINTS / "shards" / "train")
    val_spec = build_loader(prepared.val.path, config.eval.batch_size, shuffle=False, seed=0,
                            num_workers=config.data.num_workers, view=run_dir / CHECKPOINTS / "shards" / "val")
    evaluators = [Evaluator(label="val", dataloader=val_spec, metric_names=list(config.eval_metrics),
                            eval_interval=config.eval.interval)]
    if downstream is not None and downstream.tasks:
        from workbench.evaluation.tasks import build_task_evaluators

        evaluators += build_task_evaluators(model, tokenizer, downstream, config.eval.interval, config.data.seq_len,
                                            log=log, objective=config.objective.name)

    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"workbench.config": config.to_dict(), "workbench.algorithms": active_algorithms(config),
                "workbench.data": {"train": prepared.train.manifest, "val": prepared.val.manifest}}
    writer = MetricsWriter(run_dir, metadata, rows=recovered)
    tidy = TidyMetricsLogger(writer, config.name, prepared.train.manifest["num_tokens"], config.trainer.log_interval,
                             prepared.val.manifest.get("unigram_entropy"))
    display = [TrainProgress(tidy, log=log, bar=config.trainer.progress_bar and sys.stdout.isatty())] if progress \
        else []
    checkpoints = run_dir / CHECKPOINTS
    load_path = str(point.path) if point is not None else None
    if load_path is not None:
        log(f"[train] resuming {config.name} from {load_path}")
    trackers = build_trackers(config, run_dir, writer, resume=load_path is not None, log=log)

    logging.getLogger("composer").setLevel(logging.WARNING)
    trainer = WorkbenchTrainer(  # Composer's Trainer without per-step device reads (workbench/trainer.py)
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators,
        max_duration=epochs_in_tokens(config.trainer.max_duration, prepared.train.manifest["num_tokens"]),
        optimizers=build_optimizer(config, model.parameters()),
        schedulers=build_scheduler(config),
        algorithms=build_algorithms(config, tokenizer.mask_id, tokenizer.eos_id, tokenizer.vocab_size,
                                    special_token_ids(tokenizer)),
        callbacks=[*build_callbacks(config), *extra_callbacks],
        loggers=[tidy, *display, *trackers],  # the tidy writer first: the display and trackers read its rows
        run_name=config.name,
        seed=config.seed,
        device=device,
        precision=precision,
        device_train_microbatch_size=config.trainer.microbatch_size,
        save_folder=str(checkpoints),
        save_interval=config.trainer.checkpoint_interval,
        save_num_checkpoints_to_keep=config.trainer.keep_checkpoints,
        save_overwrite=True,
        load_path=load_path,
        progress_bar=False,  # the display above instead (why: workbench.callbacks.TrainProgress)
        log_to_console=False,
        python_log_level="warning",
        dist_timeout=300,
        log_interval=config.trainer.log_interval,  # losses read from the device once per interval
    )
    if config.model.compile:
        net.compile()  # in place: parameter names (and checkpoints) stay the same
    return BuiltRun(trainer, model, prepared, run_dir)


def train(config: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
          extra_callbacks: Sequence = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one run to completion (or resume it) and return its summary. Rank 0 holds the run folder's claim
    (:mod:`workbench.claims`) throughout, so a second live process refuses it, naming the holder."""
    from workbench.claims import ClaimHeldError, distributed_rank, hold

    target = run_dir_for(config, run_dir)
    if distributed_rank() != 0:
        return _train_held(config, target, resume, extra_callbacks, log)
    try:
        with hold(target):
            return _train_held(config, target, resume, extra_callbacks, log)
    except ClaimHeldError as err:
        raise RunExistsError(str(err)) from None


def _train_held(config: RunConfig, target: Path, resume: bool, extra_callbacks: Sequence,
                log: Callable[[str], None]) -> dict[str, Any]:
    if check_run_dir(config, target, resume) == "complete":
        from workbench.resume import check_complete_run

        check_complete_run(target)  # its metrics.parquet unreadable or gone: say so, never "complete" in silence
        log(f"[train] {config.name}: already complete in {target}")
        return read_summary(target) or {}
    from workbench.results import atomic_write_bytes

    built = build_run(config, target, resume, extra_callbacks, log, progress=True)
    atomic_write_bytes(built.run_dir / CONFIG_FILE, dump_config(config).encode())  # other processes read it
    net = built.model.net
    write_summary(built.run_dir, run=config.name, status="running", params=net.num_params(non_embedding=False),
                  non_embedding_params=net.num_params(), unique_tokens=built.prepared.train.manifest["num_tokens"],
                  train_shards=str(built.prepared.train.path), val_shards=str(built.prepared.val.path),
                  device=str(built.trainer.state.device.name), precision=str(built.trainer.state.precision.value))
    try:
        with warnings.catch_warnings():
            # Composer's "No batches were trained" after a resume from a checkpoint at an epoch's last batch: the
            # rest of that epoch is empty by design (its evaluation and the next epoch follow)
            warnings.filterwarnings("ignore", message="No batches were trained", category=UserWarning)
            built.trainer.fit()
    except BaseException as err:
        status = "pruned" if type(err).__name__ == "TrialPruned" else "failed"  # Optuna stops trials by raising
        write_summary(built.run_dir, status=status, error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8))
        _close(built)
        raise
    _close(built)
    return finish_summary(built)


def _close(built: BuiltRun) -> None:
    """Close the trainer and the run's Streaming shared memory (see data.release_shared_memory)."""
    from workbench.data import release_shared_memory

    state = built.trainer.state
    datasets = [getattr(state.train_dataloader, "dataset", None)]
    datasets += [getattr(evaluator.dataloader.dataloader, "dataset", None) for evaluator in state.evaluators]
    built.trainer.close()
    release_shared_memory(datasets)


def finish_summary(built: BuiltRun) -> dict[str, Any]:
    """Status complete plus the final and best validation numbers (from metrics.parquet)."""
    from workbench.results import METRICS_FILE, read_metrics

    timestamp = built.trainer.state.timestamp
    fields: dict[str, Any] = {"status": "complete", "tokens_seen": int(timestamp.token),
                              "steps": int(timestamp.batch), "epochs": int(timestamp.epoch)}
    frame = read_metrics(built.run_dir / METRICS_FILE)
    if frame is not None:
        val = frame.filter(frame["split"] == "val")
        for metric in val["metric"].unique().to_list():
            rows = val.filter(val["metric"] == metric).sort("step")
            if metric == "unigram_entropy":
                fields[metric] = rows["value"][0]
                continue
            fields[f"final_{metric}"] = rows["value"][-1]
            fields[f"best_{metric}"] = rows["value"].min()
        fields["wall_time_s"] = frame["wall_time"].max()
    return write_summary(built.run_dir, **fields)
