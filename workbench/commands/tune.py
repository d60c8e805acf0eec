"""``workbench tune STUDY.yaml``: run (or summarize) an Optuna study; see workbench.tune for the design."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study YAML (ablations/studies/*.yaml)")
    parser.add_argument("--storage", help="SQLAlchemy URL of the Optuna storage shared by all workers, e.g. "
                        "postgresql://user@host/db (default: sqlite file results/<study>/study.db)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start on this machine")
    parser.add_argument("--trials", type=int, help="total trials of the study (default: the YAML's n_trials)")
    parser.add_argument("--smoke", action="store_true", help="merge the study's smoke: block (tiny CPU settings)")
    parser.add_argument("--summary", action="store_true",
                        help="print best trials and importances, write trials.csv and figures; run nothing")
    from workbench.commands.ablate import add_executor_arguments

    add_executor_arguments(parser, "--workers N workers (N array tasks against --storage)")


def run(args: argparse.Namespace) -> int:
    import optuna

    from datasets_prep.corpus import prepare
    from workbench.config import ConfigError
    from workbench.paths import check_writable_folder
    from workbench.tune.spec import load_study_spec
    from workbench.tune.study import connect, default_storage, open_study
    from workbench.tune.summary import summarize
    from workbench.tune.worker import work, worker_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.workers < 1:
        raise ConfigError("command line", "--workers", f"must be >= 1, got {args.workers}")
    spec = load_study_spec(args.study, smoke=args.smoke, trials=args.trials)
    url = args.storage or spec.storage or default_storage(spec)
    if args.executor == "slurm" and url.startswith("sqlite"):
        raise ConfigError("command line", "--storage", "Slurm workers run on several nodes: give a server storage "
                          "(postgresql://...); a SQLite file is not safe across hosts")
    check_writable_folder(spec.results, "study results folder", "set WORKBENCH_RESULTS to a writable folder")
    storage = connect(spec, url)
    if args.summary:
        return summarize(spec, storage, url)

    def log(message: str) -> None:
        print(message, flush=True)

    open_study(spec, storage, url, log)
    _, values = spec.trial_values(lambda p: p.representatives()[0])
    prepare(spec.trial_config(values, None, spec.seeds[0]).data, log=log)  # once, before any worker trains
    if args.executor != "local":
        return submit_workers(args, url, spec, log)
    if args.workers > 1:
        return spawn_workers(args, url, args.workers, log)
    try:
        counts = work(spec, storage, log)
    except KeyboardInterrupt:
        log("[tune] interrupted (a running trial was recorded as failed and re-enqueued)")
        return 130
    study = optuna.load_study(study_name=spec.name, storage=storage)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    log(f"[tune] worker {worker_id()} done: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        + f"; study {spec.name} has {len(finished)} finished trials ({spec.n_trials} requested + retries)")
    return 0


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


def submit_workers(args: argparse.Namespace, url: str, spec, log: Callable[[str], None]) -> int:
    """``--executor slurm --workers N``: N array tasks, each one ``workbench tune`` worker on the shared storage."""
    from workbench.ablate.slurm import follow_text, submit_commands
    from workbench.commands.ablate import slurm_spec_from_flags

    argv = ["tune", str(args.study), "--storage", url, *(["--trials", str(args.trials)] if args.trials else []),
            *(["--smoke"] if args.smoke else [])]
    folder = spec.results / ".submitit"
    jobs = submit_commands(args.executor, folder, slurm_spec_from_flags(args), f"workbench-tune-{spec.name}",
                           [argv] * args.workers)
    log(f"[tune] {follow_text(args.executor, jobs, folder)}")
    return 0
