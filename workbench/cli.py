"""``workbench`` command line. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, composer) happen inside ``run`` so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

QUIET_RANK_WAIT_S = 10.0  # see main(): how long ranks other than 0 wait after an input error before exiting

COMMANDS = {
    "prep": ("workbench.commands.prep", "corpus -> Streaming MDS shards with an exact unique-token budget"),
    "train": ("workbench.commands.train", "train one model from a run YAML"),
    "eval": ("workbench.evaluation.cli", "zero-shot downstream evaluation of a checkpoint"),
    "generate": ("workbench.commands.generate", "sample text from an AR or masked-diffusion checkpoint"),
    "ablate": ("workbench.commands.ablate", "expand and run an ablation YAML (resumable)"),
    "report": ("workbench.analysis", "tables and figures for a results folder"),
    "tune": ("workbench.commands.tune", "Optuna study over regularization strengths"),
    "bench": ("workbench.commands.bench", "throughput: plain PyTorch loop vs. the workbench trainer"),
}


def global_options(default: object = None) -> argparse.ArgumentParser:
    """Options every command takes, before or after the command name (``workbench --data-dir D train X`` and
    ``workbench train X --data-dir D``). After the name they default to SUPPRESS, so an option given before it is
    not reset by the subcommand's parser."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--data-dir", default=default, help="data folder (default: $WORKBENCH_DATA or ../shared/data)")
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="Data-efficiency ablation workbench: AR vs. "
                                     "masked diffusion under repeated data (Composer + Streaming + Optuna).",
                                     parents=[global_options()])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    after = [global_options(argparse.SUPPRESS)]
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text, parents=after))
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides written after an option (argparse stops positionals at the first flag)
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.data_dir:
        os.environ["WORKBENCH_DATA"] = os.path.abspath(args.data_dir)
    from datasets_prep.corpus import CorpusError
    from workbench.config import ConfigError
    from workbench.paths import FolderError
    from workbench.train import RunExistsError

    try:
        return int(modules[args.command].run(args) or 0)
    except (ConfigError, CorpusError, RunExistsError, FileNotFoundError, FolderError) as err:
        if os.environ.get("RANK", "0") not in ("", "0"):
            # every rank of a distributed run meets the same input: rank 0 alone reports it, and the others wait for
            # the launcher to stop the group on rank 0's exit (exiting first could get rank 0 killed before it prints)
            time.sleep(QUIET_RANK_WAIT_S)
            return 2
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
