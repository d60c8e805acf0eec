"""Analysis of results folders with polars and seaborn: ``load_results`` -> derived tables -> figures -> report.

    from workbench.analysis import load_results, best_validation, overfitting_onset, validation_curves
    frame = load_results("results/regularizers")          # tidy: one row per run, step, split, metric
    best_validation(frame)                                 # best val loss per run, and where it occurs

Submodules: :mod:`~workbench.analysis.load` (the tidy frame and how a run's validation loss is chosen),
:mod:`~workbench.analysis.tables` (derived tables and their definitions), :mod:`~workbench.analysis.figures`
(seaborn figures) and :mod:`~workbench.analysis.report` (``workbench report``). Names are imported lazily so the
command line starts without loading polars, seaborn or matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

_EXPORTS = {
    "load_results": "load", "load_run_rows": "load", "find_runs": "load", "run_table": "load", "ResultsWarning": "load",
    "run_status": "load", "default_targets": "tables",
    "best_validation": "tables", "overfitting_onset": "tables", "tokens_to_target": "tables", "speedup": "tables",
    "downstream_accuracy": "tables", "seed_summary": "tables", "validation_rows": "tables",
    "unigram_entropy": "tables", "with_val_metric": "tables", "compute_gap": "tables", "single_epoch_runs": "tables",
    "validation_curves": "figures", "downstream_curves": "figures", "best_vs_strength": "figures",
    "best_loss_vs_repetition": "figures", "best_loss_vs_alpha": "figures", "alpha_repetition_heatmap": "figures",
    "save": "figures",
    "write_report": "report", "headline_table": "report", "to_markdown": "report", "resolve_targets": "report",
}
__all__ = [*_EXPORTS, "add_arguments", "run"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="a results folder: one ablation (results/X), a run, or results/")
    parser.add_argument("--out", help="output folder (default <results>/report)")
    parser.add_argument("--metric", default="val_loss", choices=["val_loss", "ar_nll", "mdm_nelbo"],
                        help="val_loss: each run's own objective metric (ar_nll for AR/dual, mdm_nelbo for MDM)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="overfitting onset: rise above the running minimum, in nats (default 0.01)")
    parser.add_argument("--target", help="tokens-to-target threshold per metric, e.g. ar_nll=5.7,mdm_nelbo=6.5 "
                        "(a bare number only when all runs report one metric; default per metric: the largest best "
                        "loss of its runs, which every run of that metric reaches)")
    parser.add_argument("--baseline", help="variant(s) the speed-ups are relative to, at most one per metric, "
                        "comma-separated (default: each metric's first variant; metrics not named get none)")
    parser.add_argument("--formats", default="png,svg", help="figure formats (default png,svg)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")


def parse_target(text: str | None) -> float | dict[str, float] | None:
    """``5.7`` or ``ar_nll=5.7,mdm_nelbo=6.5`` -> a number or metric -> number (ReportArgumentError otherwise)."""
    from workbench.analysis.report import ReportArgumentError

    if text is None:
        return None
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ReportArgumentError(f"--target: expected a number or metric=number pairs, got {text!r}") from None
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ReportArgumentError(f"--target: {item!r} is not metric=number (e.g. ar_nll=5.7)") from None
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from workbench.analysis.report import ReportArgumentError, to_markdown, write_report

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    baseline = [b.strip() for b in args.baseline.split(",") if b.strip()] if args.baseline else None
    try:
        report = write_report(args.results, args.out, metric=args.metric, tolerance=args.tolerance,
                              target=parse_target(args.target), baseline=baseline, formats=formats,
                              draw=not args.no_figures)
    except ReportArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report.headline))
    print(f"\n[report] tables and {len(report.figures)} figures in {report.out_dir} (see report.md)")
    return 0
