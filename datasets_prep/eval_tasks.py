"""Check the zero-shot task files and write fixed item subsets.

    python -m datasets_prep.eval_tasks check [--tasks all] [--tokenizer gpt2|bert|FILE.json] [--seq-len 128]
    python -m datasets_prep.eval_tasks subset --limit 500 [--seed 1234] [--tasks all] --out subsets.json

``check`` reads every task file with the same reader the evaluators use and reports, per task: items, malformed
lines (with file:line), choices per item, the gold-label distribution with its chance and majority baselines,
and, with a tokenizer, the token lengths of contexts and continuations, boundary merges and how many items a
model of ``--seq-len`` tokens would truncate. Exit status 1 when a file is missing or has malformed lines, so it
can guard a data update in CI.

``subset`` writes the item indices (0-based line numbers in the task file) of the fixed seeded subset that
``eval.downstream`` (same ``limit`` and ``seed``) evaluates, so outside tools can score exactly the same items.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any


def _tokenizer(spec: str | None):
    if spec is None:
        return None
    from workbench.config import TokenizerConfig
    from workbench.tokenizer import from_tokenizer_json, load_tokenizer

    if spec in ("gpt2", "bert"):
        path = "${data}/tokenizers/gpt2" if spec == "gpt2" else "${data}/tokenizers/bert-base-uncased"
        return load_tokenizer(TokenizerConfig(kind=spec, path=path))
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--tokenizer: {spec} is neither gpt2, bert nor a tokenizer.json file")
    return from_tokenizer_json(spec)


def _quantiles(values: list[int]) -> str:
    ordered = sorted(values)
    pick = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
    return f"median {pick[0]}, p90 {pick[1]}, p99 {pick[2]}, max {ordered[-1]}"


def check_task(name: str, tokenizer=None, seq_len: int = 128) -> dict[str, Any]:
    """Statistics of one task file (see the module docstring); ``problems`` lists what makes ``check`` fail."""
    from workbench.evaluation.tasks import TASKS, encode_items, read_task, split_tokens, task_path

    spec = TASKS[name]
    report: dict[str, Any] = {"task": name, "file": str(task_path(name)), "schema": spec.schema, "problems": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # collected in data.skipped and reported below
            data = read_task(name)
    except (FileNotFoundError, ValueError) as err:
        report["problems"].append(str(err))
        return report
    items = data.items
    report.update(lines=data.lines, items=len(items), skipped=len(data.skipped), skipped_lines=data.skipped[:10])
    report["problems"] += data.skipped
    choices = Counter(len(item.continuations) for item in items)
    report["choices"] = dict(sorted(choices.items()))
    if spec.schema != "language_modeling":
        gold = Counter(item.gold for item in items)
        report["gold"] = dict(sorted(gold.items()))
        report["chance"] = sum(1 / len(item.continuations) for item in items) / len(items)
        report["majority"] = max(gold.values()) / len(items)
    if tokenizer is not None:
        contexts = [c for item in items for c in item.contexts]
        continuations = [x for item in items for x in item.continuations]
        pairs = split_tokens(tokenizer, contexts, continuations)
        report["context_tokens"] = _quantiles([len(ctx) for ctx, _, _ in pairs])
        report["continuation_tokens"] = _quantiles([len(cont) for _, cont, _ in pairs])
        report["boundary_merges"] = sum(merged for _, _, merged in pairs)
        encoded, stats = encode_items(items, tokenizer, seq_len)
        report["truncated_items"] = sum(item.truncated for item in encoded)
        report["truncated_contexts"] = stats.context_truncated
        report["truncated_continuations"] = stats.continuation_truncated
    return report


def _print_report(report: dict[str, Any], seq_len: int) -> None:
    print(f"{report['task']} ({report['schema']}): {report['file']}")
    if "items" not in report:
        print(f"  ERROR: {report['problems'][0]}")
        return
    print(f"  {report['items']:,} items from {report['lines']:,} lines; {report['skipped']} malformed lines skipped")
    for line in report["skipped_lines"]:
        print(f"    {line}")
    print(f"  choices per item: {report['choices']}")
    if "gold" in report:
        print(f"  gold labels: {report['gold']}; chance {report['chance']:.3f}, "
              f"majority class {report['majority']:.3f}")
    if "context_tokens" in report:
        print(f"  context tokens: {report['context_tokens']}\n  continuation tokens: {report['continuation_tokens']}")
        print(f"  boundary merges: {report['boundary_merges']}; at seq_len {seq_len}: {report['truncated_items']} "
              f"items truncated ({report['truncated_contexts']} contexts, {report['truncated_continuations']} "
              "continuations)")


def subsets(tasks: list[str], limit: int | None, seed: int) -> dict[str, Any]:
    """``{task: {"items": [indices], "available": n}}`` for the evaluators' fixed subset."""
    from workbench.evaluation.tasks import read_task, select_items

    out: dict[str, Any] = {"limit": limit, "seed": seed, "tasks": {}}
    for name in tasks:
        data = read_task(name)
        chosen = select_items(data.items, limit, seed)
        out["tasks"][name] = {"file": str(data.path), "available": len(data.items),
                              "items": [item.index for item in chosen]}
    return out


def main(argv: list[str] | None = None) -> int:
    from workbench.config import ConfigError
    from workbench.evaluation.tasks import check_tasks, parse_task_list

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate task files and report statistics")
    check.add_argument("--tasks", default="all")
    check.add_argument("--tokenizer", help="gpt2, bert or a tokenizer.json (adds token statistics)")
    check.add_argument("--seq-len", type=int, default=128)
    check.add_argument("--json", help="also write the reports to this JSON file")
    subset = sub.add_parser("subset", help="write the fixed seeded item subset of each task")
    subset.add_argument("--tasks", default="all")
    subset.add_argument("--limit", type=int, required=True)
    subset.add_argument("--seed", type=int, default=1234)
    subset.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    tasks = parse_task_list(args.tasks)
    try:
        if args.command == "subset":
            check_tasks(tasks, "command line")
            payload = subsets(tasks, args.limit, args.seed)
            Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
            print(f"wrote {sum(len(t['items']) for t in payload['tasks'].values())} item indices of "
                  f"{len(tasks)} tasks to {args.out}")
            return 0
        from workbench.evaluation.tasks import TASKS

        unknown = [name for name in tasks if name not in TASKS]
        if unknown:
            raise ConfigError("command line", "--tasks", f"unknown task {unknown[0]!r}; allowed: {', '.join(TASKS)}")
        tokenizer = _tokenizer(args.tokenizer)
        reports = [check_task(name, tokenizer, args.seq_len) for name in tasks]
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for report in reports:
        _print_report(report, args.seq_len)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    bad = [r["task"] for r in reports if r["problems"]]
    print(f"{len(reports) - len(bad)} of {len(reports)} task files clean" + (f"; problems in: {', '.join(bad)}"
                                                                             if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
