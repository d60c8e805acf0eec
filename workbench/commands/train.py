"""``workbench train RUN.yaml``: train one model with Composer; ``--resume`` continues a stopped run."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its latest checkpoint")
    parser.add_argument("--run-dir", help="results folder of this run (default results/<name>)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and stop")


def run(args: argparse.Namespace) -> int:
    from workbench.config import dump_config, load_run_config

    config = load_run_config(args.config, args.overrides)
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
