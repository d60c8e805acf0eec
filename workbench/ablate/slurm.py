"""Submitting an ablation's runs as one job array through submitit: Slurm (``--executor slurm``) or submitit's
local executor (``--executor submitit-local``: real processes on this machine, the same code path without a
scheduler). The submitter claims each run and hands the claim to its array task (the claim names the job, so a
rerun skips runs whose job is still queued or running; :mod:`workbench.claims`); the task adopts it, trains the run
in its own process (or through Composer's launcher on its GPUs) and releases it.

The ``slurm:`` section of an ablation file (command-line flags win)::

    slurm:
      partition: gpu
      gpus_per_run: 4          # GPUs of one node per run; > 1 runs Composer's launcher inside the task
      time: "12:00:00"         # per run: minutes, HH:MM:SS or D-HH:MM:SS
      account: my-lab
      cpus_per_run: 16
      mem: 128G
      array_parallelism: 8     # at most this many runs at once
      setup: ["module load cuda/12.4"]   # shell lines before each task
      sbatch: {constraint: a100, qos: high}   # any other sbatch option
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import claims
from workbench.ablate.spec import Ablation, PlannedRun
from workbench.config import ConfigError, check_keys

SLURM_KEYS = ("partition", "gpus_per_run", "time", "account", "cpus_per_run", "mem", "array_parallelism", "setup",
              "sbatch")
EXECUTORS = ("local", "slurm", "submitit-local")
_TIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?")


@dataclass
class SlurmSpec:
    """Resources of one array task (one run)."""

    partition: str | None = None
    gpus_per_run: int = 1
    time_min: int = 240
    account: str | None = None
    cpus_per_run: int | None = None
    mem: str | None = None
    array_parallelism: int | None = None
    setup: list[str] = field(default_factory=list)
    sbatch: dict[str, str] = field(default_factory=dict)


def parse_time(value: Any, source: str, key: str) -> int:
    """Minutes from ``90``, ``"1:30:00"`` (H:MM:SS), ``"90:00"`` (MM:SS is not meant: M:SS reads as H:MM) or
    ``"2-00:00:00"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _TIME.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(source, key, f"expected minutes > 0, HH:MM:SS or D-HH:MM:SS, got {value!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ConfigError(source, key, f"must be longer than zero, got {value!r}")
    return total


def parse_slurm(raw: Any, source: str, key: str = "slurm") -> SlurmSpec:
    """The ablation file's ``slurm:`` section (or the command line's flags, source 'command line')."""
    spec = SlurmSpec()
    if raw is None:
        return spec
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"expected a mapping with {', '.join(SLURM_KEYS)}, got {raw!r}")
    check_keys(raw, SLURM_KEYS, source, key)
    for name in ("partition", "account", "mem"):
        if raw.get(name) is not None:
            setattr(spec, name, _non_empty_string(raw[name], source, f"{key}.{name}"))
    for name, least in (("gpus_per_run", 0), ("cpus_per_run", 1), ("array_parallelism", 1)):
        if raw.get(name) is not None:
            setattr(spec, name, _whole_number(raw[name], least, source, f"{key}.{name}"))
    if raw.get("time") is not None:
        spec.time_min = parse_time(raw["time"], source, f"{key}.time")
    if raw.get("setup") is not None:
        spec.setup = _setup_lines(raw["setup"], source, f"{key}.setup")
    if raw.get("sbatch") is not None:
        spec.sbatch = _sbatch_options(raw["sbatch"], source, f"{key}.sbatch")
    return spec


def _non_empty_string(value: Any, source: str, key: str) -> str:
    """A name such as a partition (YAML may read a numeric one as an int)."""
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(source, key, f"expected a non-empty string, got {value!r}")
    return str(value)


def _whole_number(value: Any, least: int, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(source, key, f"expected a whole number >= {least}, got {value!r}")
    return value


def _setup_lines(setup: Any, source: str, key: str) -> list[str]:
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise ConfigError(source, key, f"expected a list of shell lines, got {setup!r}")
    return list(setup)


def _sbatch_options(sbatch: Any, source: str, key: str) -> dict[str, Any]:
    """Extra ``#SBATCH`` options, option: value (leading dashes dropped; values as strings, booleans kept)."""
    if not isinstance(sbatch, dict):
        raise ConfigError(source, key, f"expected a mapping option: value, got {sbatch!r}")
    for option, value in sbatch.items():
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(source, f"{key}.{option}", f"expected a plain value, got {value!r}")
    return {str(k).lstrip("-"): str(v) if not isinstance(v, bool) else v for k, v in sbatch.items()}


def slurm_parameters(spec: SlurmSpec, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one run per array task."""
    params: dict[str, Any] = {"job_name": name, "time": spec.time_min, "nodes": 1, "ntasks_per_node": 1,
                              "stderr_to_stdout": True}
    if spec.gpus_per_run:
        params["gpus_per_node"] = spec.gpus_per_run
    for key, value in (("partition", spec.partition), ("account", spec.account), ("cpus_per_task", spec.cpus_per_run),
                       ("mem", spec.mem), ("array_parallelism", spec.array_parallelism)):
        if value is not None:
            params[key] = value
    if spec.setup:
        params["setup"] = spec.setup
    if spec.sbatch:
        params["additional_parameters"] = dict(spec.sbatch)
    return params


def make_executor(kind: str, folder: Path, spec: SlurmSpec, name: str) -> Any:
    """A submitit executor writing its pickles and logs under ``folder``."""
    import submitit

    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(spec, name))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=spec.time_min, gpus_per_node=spec.gpus_per_run, tasks_per_node=1,
                               stderr_to_stdout=True, setup=spec.setup)
    return executor


def _job_record(kind: str, job: Any) -> dict[str, Any]:
    if kind == "slurm":
        return {"scheduler": "slurm", "id": job.job_id}
    pid = int(job.job_id)  # submitit's local jobs are processes of this machine
    return {"scheduler": "local", "id": job.job_id, **claims.identity(pid)}


def submit(ablation: Ablation, runs: list[PlannedRun], spec: SlurmSpec, kind: str,
           log: Callable[[str], None] = print) -> list[Any]:
    """Claim the runs that are free, submit them as one job array and hand each claim to its task; returns the
    jobs (empty when every run is complete or held)."""
    from workbench.ablate.runner import _state

    taken: list[tuple[PlannedRun, claims.Claim]] = []
    for run in runs:
        try:
            claim = claims.acquire(run.run_dir, role="submit")
        except claims.ClaimHeldError as err:
            log(f"[ablate] {run.name} is held by {claims.describe(err.holder)}; not submitted")
            continue
        state = _state(run)
        if state not in ("new", "resume"):
            claim.release()
            log(f"[ablate] {run.name} is {state} by now; not submitted")
            continue
        taken.append((run, claim))
    if not taken:
        return []
    folder = runs[0].run_dir.parent.parent / ".submitit"
    executor = make_executor(kind, folder, spec, f"workbench-{ablation.name}")
    tasks = [{"ablation": str(ablation.path), "smoke": ablation.smoke, "scale": ablation.scale,
              "variant": run.variant.name, "run": run.name,
              "results": str(run.run_dir.parent.parent.parent), "token": claim.token, "gpus": spec.gpus_per_run}
             for run, claim in taken]
    try:
        jobs = executor.map_array(run_task, tasks)
    except BaseException:
        for _, claim in taken:
            claim.release()
        raise
    for (_, claim), job in zip(taken, jobs):
        claim.hand_over(job=_job_record(kind, job))
    return jobs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_task(task: dict[str, Any]) -> str:
    """One array task: adopt the run's claim, prepare its data (a no-op when prepared), train it, release."""
    from workbench.ablate.runner import Slot, launch_subprocess, prepare_data, write_run_files
    from workbench.ablate.spec import load_ablation
    from workbench.results import CHECKPOINTS, TRAIN_LOG, read_summary

    ablation = load_ablation(task["ablation"], smoke=task["smoke"], only=[task["variant"]],
                             results_root=task["results"], scale=task.get("scale"))
    run = next(r for r in ablation.runs if r.name == task["run"])
    claim = claims.acquire(run.run_dir, role="ablate", adopt=task["token"])
    try:
        prepare_data([run])
        write_run_files(run, ablation)
        if task["gpus"] > 1:  # one node's GPUs through Composer's launcher, as `--launcher composer` does
            log_path = run.run_dir / CHECKPOINTS / TRAIN_LOG
            log_path.parent.mkdir(parents=True, exist_ok=True)
            code = launch_subprocess(run, Slot(None, task["gpus"], _free_port(), None), "composer", claim, log_path)
            if code != 0:
                raise RuntimeError(f"{run.name}: Composer's launcher exited with {code}; see {log_path}")
        else:
            from workbench.train import train

            train(run.config, run_dir=run.run_dir, resume=True)
    finally:
        claim.release()
    return str((read_summary(run.run_dir) or {}).get("status"))


def run_command_task(argv: list[str]) -> int:
    """An array task that runs one ``workbench`` command (``workbench tune`` workers: each task is one worker)."""
    from workbench.cli import main

    code = main(list(argv))
    if code:
        raise RuntimeError(f"workbench {' '.join(argv)} exited with {code}")
    return code


def submit_commands(kind: str, folder: Path, spec: SlurmSpec, name: str, argvs: list[list[str]]) -> list[Any]:
    """One array task per ``workbench`` command line (no claims: the tasks coordinate through their storage)."""
    return make_executor(kind, folder, spec, name).map_array(run_command_task, argvs)


def follow_text(kind: str, jobs: list[Any], folder: Path) -> str:
    """How to follow a submission."""
    if kind == "slurm":
        array = str(jobs[0].job_id).split("_")[0]
        return (f"submitted {len(jobs)} task(s) as Slurm job array {array}; follow with `squeue -j {array}` and "
                f"`tail -f {folder}/{array}_*_0_log.out`")
    pids = ", ".join(str(job.job_id) for job in jobs)
    return f"submitted {len(jobs)} task(s) to submitit's local executor (processes {pids}); logs in {folder}"
