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
    "load_results": "load", "load_run": "load", "find_runs": "load", "run_table": "load", "ResultsWarning": "load",
    "best_validation": "tables", "overfitting_onset": "tables", "tokens_to_target": "tables", "speedup": "tables",
    "downstream_accuracy": "tables", "seed_summary": "tables", "validation_rows": "tables",
    "unigram_entropy": "tables", "with_val_metric": "tables",
    "validation_curves": "figures", "downstream_curves": "figures", "best_vs_strength": "figures",
    "alpha_repetition_heatmap": "figures", "save": "figures",
    "write_report": "report", "headline_table": "report", "to_markdown": "report",
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
    parser.add_argument("--target", type=float, help="tokens-to-target threshold (default: the largest best "
                        "validation loss over runs, which every run reaches)")
    parser.add_argument("--baseline", help="variant the speed-ups are relative to (default: the first)")
    parser.add_argument("--formats", default="png,svg", help="figure formats (default png,svg)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")


def run(args: argparse.Namespace) -> int:
    from workbench.analysis.report import to_markdown, write_report

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    report = write_report(args.results, args.out, metric=args.metric, tolerance=args.tolerance, target=args.target,
                          baseline=args.baseline, formats=formats, draw=not args.no_figures)
    print(to_markdown(report.headline))
    print(f"\n[report] tables and {len(report.figures)} figures in {report.out_dir} (see report.md)")
    return 0
