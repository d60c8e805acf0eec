"""``workbench ablate ABLATION.yaml``: argument parsing and the command's flow (plan, refuse, prepare, run);
the library is :mod:`workbench.ablate`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from workbench.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ablation", help="ablation YAML (see ablations/)")
    parser.add_argument("--dry-run", action="store_true", help="expand, validate and print the plan; train nothing")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only these variants: names, group names or shell patterns (repeatable, or "
                        "comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="apply the file's smoke: block (tiny, CPU-sized runs); "
                        "the same as --scale smoke")
    parser.add_argument("--scale", metavar="NAME", help="apply the file's scales: NAME: block (e.g. cpu: the "
                        "laptop scale of a GPU-scale study); results go to <name>-<NAME>")
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="runs at once, each a `workbench train` subprocess (CPU threads are split between them); "
                        "default: the file's parallel: key, else 1")
    parser.add_argument("--devices", help="GPU ids, e.g. 0,1,2,3: one run per GPU at a time (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--launcher", choices=["none", "composer"], default="none",
                        help="composer: run each run on --nproc GPUs with Composer's launcher (DDP/FSDP)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (GPUs) per run with --launcher composer "
                        "(default: all of --devices, else all visible GPUs)")
    parser.add_argument("--results", help="results root (default $WORKBENCH_RESULTS or results/)")
    parser.add_argument("--no-probe", action="store_true", help="skip the throughput probe when no runs were measured")
    add_executor_arguments(parser, "the runs", "slurm.")


def add_executor_arguments(parser: argparse.ArgumentParser, what: str, key: str = "") -> None:
    """--executor and the Slurm flags (shared by `workbench ablate` and `workbench tune`)."""
    parser.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                        help=f"local: run here; slurm: submit {what} as a Slurm job array (submitit) and return; "
                        "submitit-local: the same submission to submitit's local executor (processes on this machine)")
    def see(name: str, default: str = "") -> str:  # where the same setting goes in a file
        return f" ({', '.join(filter(None, [f'{key}{name}' if key else '', default]))})" if key or default else ""

    parser.add_argument("--partition", help=f"Slurm partition{see('partition')}")
    parser.add_argument("--gpus-per-run", type=int, metavar="N",
                        help=f"GPUs per task{see('gpus_per_run', 'default 1')}")
    parser.add_argument("--time",
                        help=f"time limit per task: minutes, HH:MM:SS or D-HH:MM:SS{see('time', 'default 4h')}")
    parser.add_argument("--account", help=f"Slurm account{see('account')}")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                        help=f"any other sbatch option, e.g. constraint=a100, repeatable{see('sbatch')}")


def _devices(args: argparse.Namespace, launcher: str) -> tuple[list[str] | None, int]:
    """Validated GPU ids (None: CPU or no pinning) and processes per run."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    nproc = args.nproc
    if launcher != "composer" and not devices:
        if nproc not in (None, 1):
            raise ConfigError("command line", "--nproc", "processes per run need --launcher composer")
        return None, 1
    import torch

    visible = torch.cuda.device_count()
    if devices is None and visible:
        devices = [str(i) for i in range(visible)]
    if devices and any(not d.isdigit() or int(d) >= visible for d in devices):
        raise ConfigError("command line", "--devices", f"{args.devices!r}: this machine has {visible} CUDA device(s)")
    nproc = nproc or (len(devices) if devices and launcher == "composer" else 1)
    if devices and nproc > len(devices):
        raise ConfigError("command line", "--nproc", f"{nproc} processes per run but only {len(devices)} devices")
    return devices, nproc


def run(args: argparse.Namespace) -> int:
    from workbench import ablate
    from workbench.paths import check_writable_folder, results_dir

    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError("command line", "--parallel", "must be >= 1")
    launcher = args.launcher
    ablation = ablate.load_ablation(args.ablation, smoke=args.smoke, only=only or None, results_root=args.results,
                                   scale=args.scale)
    devices, nproc = _devices(args, launcher)
    spec = _slurm_spec(args, ablation)  # a bad slurm: section or flag is named before anything else happens
    root = Path(args.results) if args.results else results_dir()
    check_writable_folder(root / ablation.name, "results folder", "pass --results with a writable folder" if
                          args.results else "set WORKBENCH_RESULTS to a writable folder (or pass --results)")

    ablate.assess(ablation.runs)
    pending = [run for run in ablation.runs if run.state in ("new", "resume")]
    parallel = min(args.parallel or ablation.parallel or 1, max(1, len(pending)))
    subprocesses = parallel > 1 or devices is not None or launcher == "composer"
    slots = ablate.make_slots(parallel, devices, launcher, nproc)
    concurrent = min(len(slots), max(1, len(pending))) if subprocesses else 1
    seconds, source = ablate.estimate(ablation, root, concurrent, probe=not args.no_probe)
    print(ablate.format_plan(ablation, seconds, source, concurrent), flush=True)
    changed = [run for run in ablation.runs if run.state == "changed"]
    if changed:
        for run in changed:
            print(f"error: {run.detail}", file=sys.stderr)
        print(f"error: {len(changed)} run(s) of {ablation.name} exist with a different config; nothing was run",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    if args.executor != "local":
        return _submit(args, ablation, pending, spec)
    return _run_here(ablation, pending, slots if subprocesses else None, launcher, seconds, root)


def _run_here(ablation: Any, pending: list, slots: list | None, launcher: str,
              seconds: dict[str, float] | None, root: Path) -> int:
    """--executor local: train the pending runs on this machine (in-process, or one subprocess per slot)."""
    from workbench import ablate

    for run in ablation.runs:
        if run.state == "complete":
            ablate.write_variant_file(run, ablation)  # keep the metadata current
    if not pending:
        print(f"[ablate] all {len(ablation.runs)} runs are complete; nothing to do")
        return 0
    start = time.time()
    ablate.prepare_data(pending)
    runner = ablate.Runner(pending, ablation, slots, launcher, seconds)
    try:
        outcome = runner.run()
    except KeyboardInterrupt:
        elapsed = ablate.format_seconds(time.time() - start)
        print(f"\n[ablate] interrupted after {elapsed}; run the same command again to "
              "resume (finished runs are kept, interrupted ones continue from their latest checkpoint)",
              file=sys.stderr)
        return 130
    elapsed = ablate.format_seconds(time.time() - start)
    others = f" ({len(outcome.others)} by other processes)" if outcome.others else ""
    print(f"[ablate] {ablation.name}: {outcome.done}/{len(pending)} runs finished{others} in {elapsed}; "
          f"results in {root / ablation.name}")
    print(ablate.best_table(pending, outcome))
    if outcome.failed:
        print(f"[ablate] failed: {', '.join(outcome.failed)} (run the same command again to resume them)",
              file=sys.stderr)
        return 1
    return 0


def _slurm_spec(args: argparse.Namespace, ablation: Any) -> Any:
    """The file's slurm: section (checked against the file) with the command line's flags on top."""
    from workbench.ablate.slurm import parse_slurm

    parse_slurm(ablation.slurm, str(ablation.path))
    return slurm_spec_from_flags(args, dict(ablation.slurm or {}))


def slurm_spec_from_flags(args: argparse.Namespace, raw: dict[str, Any] | None = None) -> Any:
    """--partition/--gpus-per-run/--time/--account/--sbatch on top of ``raw`` (a slurm: section)."""
    from workbench.ablate.slurm import parse_slurm

    raw = dict(raw or {})
    flags = {"partition": args.partition, "gpus_per_run": args.gpus_per_run, "time": args.time,
             "account": args.account}
    sbatch = dict(raw.get("sbatch") or {})
    for item in args.sbatch:
        option, sep, value = item.partition("=")
        if not sep or not option.strip("-"):
            raise ConfigError("command line", "--sbatch", f"expected OPTION=VALUE, got {item!r}")
        sbatch[option.strip().lstrip("-")] = value
    merged = {**raw, **{k: v for k, v in flags.items() if v is not None}, **({"sbatch": sbatch} if sbatch else {})}
    if isinstance(merged.get("time"), str) and merged["time"].isdigit():
        merged["time"] = int(merged["time"])
    return parse_slurm(merged, "command line" + (" (with the ablation file's slurm: section)" if raw else ""))


def _submit(args: argparse.Namespace, ablation: Any, pending: list, spec: Any) -> int:
    """--executor slurm / submitit-local: claim, submit as one job array, print how to follow, return."""
    from workbench import ablate
    from workbench.ablate.slurm import follow_text, submit

    if not pending:
        print(f"[ablate] all {len(ablation.runs)} runs are complete; nothing to submit")
        return 0
    ablate.prepare_data(pending)  # once, before the tasks start (each task's own check is then a no-op)
    jobs = submit(ablation, pending, spec, args.executor)
    if not jobs:
        print(f"[ablate] nothing to submit: every pending run of {ablation.name} is held by a live job or process")
        return 0
    print(f"[ablate] {follow_text(args.executor, jobs, pending[0].run_dir.parent.parent / '.submitit')}")
    return 0
