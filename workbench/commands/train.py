"""``workbench train RUN.yaml``: train one model with Composer; ``--resume`` continues a stopped run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its latest checkpoint")
    parser.add_argument("--run-dir", help="results folder of this run (default results/<name>)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and stop")


def world_size() -> int:
    """Processes this run is split over: ``WORLD_SIZE`` as Composer's launcher (or torchrun) sets it, else 1."""
    from workbench.config import ConfigError

    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError("environment", "WORLD_SIZE", f"expected a positive number of processes, got {raw!r}")
    return size


def run(args: argparse.Namespace) -> int:
    from workbench.config import dump_config, load_run_config
    from workbench.paths import check_writable_folder, results_dir

    # everything a user can get wrong is checked here, before data preparation and before the run folder exists
    config = load_run_config(args.config, args.overrides, world_size=world_size())
    run_dir = Path(args.run_dir) if args.run_dir is not None else results_dir() / config.name
    check_writable_folder(run_dir, "results folder", "choose another --run-dir" if args.run_dir is not None else
                          "set WORKBENCH_RESULTS to a writable folder (or pass --run-dir)")
    if args.check:
        print(dump_config(config), end="")
        return 0
    from workbench.train import train

    summary = train(config, run_dir=args.run_dir, resume=args.resume)
    keys = [k for k in summary if k.startswith(("final_", "best_"))]
    print(f"[train] {config.name}: {summary.get('status')} after {summary.get('tokens_seen', 0):,} tokens "
          f"({summary.get('epochs')} epochs of {summary.get('unique_tokens', 0):,} unique tokens)")
    for key in sorted(keys):
        print(f"  {key}: {summary[key]:.4f}")
    return 0
