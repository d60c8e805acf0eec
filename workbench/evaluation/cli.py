"""``workbench eval CHECKPOINT``: zero-shot downstream evaluation of any trained run or checkpoint.

    workbench eval results/my-run --tasks hellaswag,piqa --limit 1000 --scorer mc-elbo --samples 128

Settings default to the run's ``eval.downstream`` section (else the DownstreamConfig defaults), so a standalone
evaluation of the final checkpoint reproduces the numbers logged during training; flags override them.

Output: the same tidy rows as inside training (split = task, metrics acc, acc_norm, stderr, ...; step, epoch and
tokens_seen of the checkpoint; wall_time = seconds the task took) go to ``<run>/downstream.parquet``, or to
``--out FILE``. The file is kept across evaluations: rows of the same (step, task, metric) are replaced, others
kept, so it accumulates checkpoints and tasks. Its metadata holds the run config (``workbench.config``) and, per
task, the settings of its latest evaluation (``workbench.downstream``: scorer, samples, limit, seed,
checkpoint...). Compare scorers by writing each to its own ``--out`` file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from workbench.devices import DEVICE_CHOICES, DEVICE_HELP, resolve_device
from workbench.run_files import DOWNSTREAM_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (uses checkpoints/latest-rank0.pt) or a .pt file in it")
    parser.add_argument("--tasks", help="comma-separated task names or 'all' (default: the run's "
                        "eval.downstream.tasks)")
    parser.add_argument("--limit", help="items per task (fixed seeded subset), or 'all'")
    parser.add_argument("--scorer", choices=["auto", "ar", "mc-elbo", "chain", "pll"],
                        help="auto: ar for AR/prefix-LM/dual models, mc-elbo for masked diffusion")
    parser.add_argument("--task-scorer", action="append", default=[], metavar="TASK=SCORER",
                        help="per-task scorer, e.g. lambada_openai=chain (repeatable)")
    parser.add_argument("--samples", type=int, help="Monte Carlo samples per choice for mc-elbo")
    parser.add_argument("--masking", choices=["exact", "bernoulli"], help="mc-elbo masking (default exact)")
    parser.add_argument("--cfg-weight", type=float, help="unsupervised classifier-free guidance weight w")
    parser.add_argument("--batch-size", type=int, help="rows per forward pass")
    parser.add_argument("--seed", type=int, help="item subset and estimator noise seed")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--out", help=f"tidy rows file (default <run>/{DOWNSTREAM_FILE})")
    parser.add_argument("--harness", nargs="+", metavar="TASK",
                        help="run lm-evaluation-harness tasks instead (wb_piqa, wb_arc_easy... read the bundled "
                        "files offline; any harness task name works where the harness can load it); --limit is "
                        "then the harness's (first N documents); needs the harness extra")
    parser.add_argument("--num-fewshot", type=int, help="harness few-shot examples (with --harness)")


def downstream_settings(base: Any, args: argparse.Namespace) -> Any:
    """The run's DownstreamConfig (or defaults) with command-line overrides, validated like a config file."""
    import dataclasses

    from workbench.config import ConfigError, DownstreamConfig, build_dataclass
    from workbench.evaluation.tasks import parse_task_list

    values = dataclasses.asdict(base) if base is not None else {}
    values.pop("interval", None)
    if args.tasks is not None:
        values["tasks"] = parse_task_list(args.tasks)
    if args.limit is not None:
        values["limit"] = None if str(args.limit).lower() in ("all", "none", "null") else args.limit
    flags = {"scorer": args.scorer, "samples": args.samples, "masking": args.masking, "cfg_weight": args.cfg_weight,
             "batch_size": args.batch_size, "seed": args.seed}
    values.update({key: value for key, value in flags.items() if value is not None})
    if args.task_scorer:
        scorers = dict(values.get("scorers") or {})
        for item in args.task_scorer:
            if "=" not in item:
                raise ConfigError("command line", "--task-scorer", f"expected TASK=SCORER, got {item!r}")
            task, scorer = item.split("=", 1)
            scorers[task.strip()] = scorer.strip()
        values["scorers"] = scorers
    values["scorers"] = {k: v for k, v in (values.get("scorers") or {}).items() if k in values.get("tasks", [])}
    if isinstance(values.get("limit"), str):
        try:
            values["limit"] = int(values["limit"])
        except ValueError:
            raise ConfigError("command line", "--limit", f"expected a number or 'all', got {values['limit']!r}") \
                from None
    if not values.get("tasks"):
        raise ConfigError("command line", "--tasks", "name the tasks (e.g. --tasks hellaswag,piqa or --tasks all); "
                          "the run's config has no eval.downstream.tasks")
    return build_dataclass(DownstreamConfig, values, "command line", "eval.downstream")


def check_rows_file(path: Path) -> None:
    """Refuses an existing rows file that does not read whole: the writer would start it again empty, and every
    earlier evaluation in it would be lost without a word. Called before any task is scored."""
    from workbench.config import ConfigError
    from workbench.results import metrics_problem

    problem = metrics_problem(path) if path.exists() else None
    if problem is not None:
        first = problem.splitlines()[0] if problem.strip() else "unreadable"
        raise ConfigError(str(path), "", f"{first}; refusing to overwrite the rows it holds: move it away or "
                          "write to another file with --out")


def tidy_file(path: Path, metadata: dict[str, Any]):
    """A MetricsWriter (the one results writer) on ``path`` instead of ``<run>/metrics.parquet``, holding the
    file's existing rows; ``metadata`` values are merged into the file's existing metadata of the same key. An
    unreadable file is refused (:func:`check_rows_file`), never replaced."""
    from workbench.results import MetricsWriter, read_metadata

    check_rows_file(path)
    previous = read_metadata(path) if path.is_file() else {}
    merged = {}
    for key, value in metadata.items():
        old = previous.get(key.removeprefix("workbench."))
        merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return MetricsWriter(path.parent, merged, filename=path.name)


def tidy_row(loaded, split: str, metric: str, value: float, wall_time: float) -> dict[str, Any]:
    """One tidy row at the loaded checkpoint's training position."""
    return {"run": loaded.config.name, "step": loaded.step, "epoch": loaded.tokens_seen / max(loaded.unique_tokens, 1),
            "tokens_seen": loaded.tokens_seen, "unique_tokens": loaded.unique_tokens, "split": split,
            "metric": metric, "value": float(value), "wall_time": wall_time}


def run(args: argparse.Namespace) -> int:
    import importlib.util
    import time

    import torch

    from workbench.config import ConfigError
    from workbench.evaluation.checkpoint import load_run
    from workbench.evaluation.scoring import resolve_scorer
    from workbench.evaluation.tasks import check_tasks, evaluate_task, prepare_task
    from workbench.progress import Progress

    if getattr(args, "harness", None):  # lm-evaluation-harness tasks through the registered workbench model
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("command line", "--harness", "needs lm-evaluation-harness: pip install -e '.[harness]'")
        from workbench.evaluation.harness import run_cli

        return run_cli(args)
    device = resolve_device(args.device)
    loaded = load_run(args.checkpoint, device)
    settings = downstream_settings(loaded.config.eval.downstream, args)
    check_tasks(settings.tasks, "command line")
    for task, scorer in settings.scorers.items():
        if scorer not in ("auto", "ar", "mc-elbo", "chain", "pll"):
            raise ConfigError("command line", f"--task-scorer {task}", f"unknown scorer {scorer!r}")
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    autocast = torch.bfloat16 if use_bf16 else None
    out = Path(args.out) if args.out else loaded.run_dir / DOWNSTREAM_FILE
    check_rows_file(out)  # before any task is scored
    seq_len = loaded.config.data.seq_len
    objective = loaded.config.objective.name
    print(f"[eval] {loaded.config.name} ({objective}) at step {loaded.step}, {loaded.tokens_seen:,} tokens "
          f"({loaded.checkpoint.name}) on {device}")
    rows, task_settings = [], {}
    for name in settings.tasks:
        task = prepare_task(name, loaded.tokenizer, settings, seq_len)
        start = time.time()
        try:  # progress over items (a line every 30 s in logs); per batch, no device sync
            scorer = resolve_scorer(task.options.scorer, objective, loaded.config.shifted)
            samples = f", {task.options.samples} samples" if scorer == "mc-elbo" else ""
            with Progress(len(task.items), f"[eval] {name} ({scorer}{samples})", "items") as progress:
                values = evaluate_task(loaded.model, task, device, autocast, on_batch=progress.update)
        except ValueError as err:  # e.g. a scorer that does not fit this model
            raise ConfigError("command line", "--scorer", f"task {name}: {err}") from None
        seconds = time.time() - start
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"  {task.describe()}\n    {scorer}: {shown} ({len(task.items) / max(seconds, 1e-9):.1f} items/s)")
        rows += [tidy_row(loaded, name, metric, value, seconds) for metric, value in values.items()]
        task_settings[name] = {
            "scorer": scorer, "samples": settings.samples, "masking": settings.masking,
            "cfg_weight": settings.cfg_weight, "limit": settings.limit, "seed": settings.seed,
            "items": len(task.items), "available": task.available, "checkpoint": str(loaded.checkpoint),
            "step": loaded.step,
            "truncated_contexts": task.stats.context_truncated,
            "truncated_continuations": task.stats.continuation_truncated, "skipped_lines": len(task.skipped)}
    writer = tidy_file(out, {"workbench.config": loaded.config.to_dict(), "workbench.downstream": task_settings})
    writer.replace(rows)
    writer.flush()
    print(f"[eval] {len(rows)} rows -> {out}")
    return 0
