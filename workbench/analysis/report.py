"""``workbench report results/X``: derived tables (CSV + markdown) and figures (PNG + SVG) in ``results/X/report/``.

Files: ``headline`` (one row per variant, mean over seeds), ``runs`` (every run folder with its status and error
line), ``best_loss``, ``overfitting``, ``tokens_to_target`` (+ ``speedup``), ``downstream`` (when task rows exist),
``seeds`` (mean/std/min/max over seeds) and ``compute_gap`` (MDM tokens to reach AR's single-epoch loss, when
there are single-epoch AR and MDM runs) as ``.csv`` and ``.md``; figures ``val_loss_vs_epoch``,
``val_loss_vs_tokens``, ``downstream_acc_vs_epoch``, ``best_loss_vs_strength``, ``best_loss_vs_repetition``
(a repetition sweep), ``best_loss_vs_alpha`` and ``alpha_repetition_heatmap`` (dual runs at several AR fractions)
where the results have what they show; ``report.md`` tying them together, which lists every run that is
not complete or has no evaluation in the tables; and ``arguments.json``, the report's own arguments (targets,
baselines), so that a committed report can be regenerated exactly (``saved_arguments``).

Tokens-to-target and speed-ups never cross metrics (AR NLL vs. MDM NELBO): each metric has its own target
(default: the largest best loss of its runs, which every run of that metric reaches) and its own baseline
(default: its first variant in declared order; a metric with one variant gets no speed-up).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from workbench.analysis import figures
from workbench.analysis.load import load_results, run_status
from workbench.analysis.tables import (
    best_validation,
    compute_gap,
    default_targets,
    downstream_accuracy,
    overfitting_onset,
    seed_summary,
    speedup,
    tokens_to_target,
    unigram_entropy,
)

ARGUMENTS_FILE = "arguments.json"  # the report's own arguments, so a test can regenerate it exactly


def saved_arguments(report_dir: str | Path) -> dict[str, Any]:
    """The ``write_report`` keyword arguments a committed report was made with (metric, tolerance, target,
    baseline; empty for a report older than the file), so regenerating it uses the same targets."""
    path = Path(report_dir) / ARGUMENTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class ReportArgumentError(ValueError):
    """A target or baseline the results cannot use (reported in one line by ``workbench report``)."""


@dataclass
class Report:
    out_dir: Path
    headline: pl.DataFrame
    tables: dict[str, pl.DataFrame]
    figures: dict[str, list[Path]] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)  # metric -> tokens-to-target threshold
    baselines: dict[str, str | None] = field(default_factory=dict)  # metric -> speed-up baseline (None: no speed-up)


def _format_value(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value).replace("|", "\\|")  # a pipe in an error line must not split the table cell


def to_markdown(frame: pl.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (floats to ``digits`` decimals, nulls empty)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(_format_value(v, digits) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def headline_table(best: pl.DataFrame, onset: pl.DataFrame, reach: pl.DataFrame, ratio: pl.DataFrame | None,
                   downstream: pl.DataFrame | None) -> pl.DataFrame:
    """One row per variant (mean over seeds): best and final loss, where the best is, overfitting onset,
    tokens to its metric's target, speed-up over its metric's baseline, and the downstream task average."""
    runs = best.join(onset.select("run", "onset_epoch", "overfit"), on="run").join(
        reach.select("run", "target", pl.col("tokens").alias("tokens_to_target")), on="run")
    table = runs.group_by("variant", maintain_order=True).agg(
        pl.col("objective").first() if "objective" in runs.columns else pl.lit(None).alias("objective"),
        pl.col("metric").first(),
        pl.len().alias("seeds"),
        pl.col("best").mean().alias("best"),
        pl.col("best").std(ddof=1).alias("best_std"),
        pl.col("best_epoch").mean().alias("best_epoch"),
        pl.col("final").mean().alias("final"),
        pl.col("onset_epoch").mean().alias("onset_epoch"),
        pl.col("overfit").sum().alias("seeds_overfit"),
        pl.col("target").first().alias("target"),
        pl.col("tokens_to_target").mean().alias("tokens_to_target"),
    )
    if ratio is not None:
        table = table.join(ratio.select("variant", "metric", "speedup", "baseline"), on=["variant", "metric"],
                           how="left", maintain_order="left")
    if downstream is not None and not downstream.is_empty():
        average = (downstream.filter(pl.col("task") == "average").group_by("variant")
                   .agg(pl.col("final_acc").mean().alias("downstream_final_acc"),
                        pl.col("best_acc").mean().alias("downstream_best_acc")))
        table = table.join(average, on="variant", how="left", maintain_order="left")
    return table


def resolve_targets(best: pl.DataFrame, target: float | dict[str, float] | None = None) -> dict[str, float]:
    """Per metric of ``best``: the given target, else the default (largest best loss of that metric's runs).
    One bare number is accepted only when every run reports the same metric."""
    targets = default_targets(best)
    if target is None:
        return targets
    if not isinstance(target, dict):
        if len(targets) > 1:
            raise ReportArgumentError(f"--target {target:g} is one number, but the runs report {', '.join(targets)}"
                                      f" (different quantities); give one per metric, e.g. --target "
                                      f"{next(iter(targets))}={target:g}")
        return {metric: float(target) for metric in targets}
    unknown = sorted(set(target) - set(targets))
    if unknown:
        raise ReportArgumentError(f"--target names {', '.join(unknown)}, which no run reports; metrics here: "
                                  f"{', '.join(targets)}")
    return {**targets, **{k: float(v) for k, v in target.items()}}


def write_report(root: str | Path, out_dir: str | Path | None = None, metric: str = "val_loss",
                 tolerance: float = 0.01, target: float | dict[str, float] | None = None,
                 baseline: str | list[str] | None = None, formats: tuple[str, ...] = ("png", "svg"),
                 draw: bool = True) -> Report:
    """Load ``root``, compute every derived table, write tables and figures, and return them.

    ``target``: one number (results of a single metric) or metric -> number; metrics not given use the default.
    ``baseline``: variant name(s), at most one per metric; metrics without one get no speed-up."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    frame = load_results(root)
    status = run_status(root, frame, metric)
    best = best_validation(frame, metric)
    if best.is_empty():
        raise FileNotFoundError(f"{root}: no validation rows for {metric} in any run")
    onset = overfitting_onset(frame, tolerance, metric)
    targets = resolve_targets(best, target)
    reach = tokens_to_target(frame, targets, metric)
    try:
        ratio = speedup(reach, baseline)
    except ValueError as err:
        raise ReportArgumentError(str(err).replace("baseline", "--baseline", 1)) from None
    baselines = {m: b for m, b in ratio.group_by("metric", maintain_order=True).agg(pl.col("baseline").first())
                 .iter_rows()}
    downstream = downstream_accuracy(frame)
    seeds = seed_summary(best.join(onset.select("run", "onset_epoch"), on="run")
                         .join(reach.select("run", pl.col("tokens").alias("tokens_to_target")), on="run"),
                         ["best", "best_epoch", "final", "onset_epoch", "tokens_to_target"])
    headline = headline_table(best, onset, reach, ratio, downstream if not downstream.is_empty() else None)

    run_cols = ["variant", "seed", "objective", "metric"]
    tables = {
        "headline": headline,
        "runs": status,
        "best_loss": best.select([*run_cols, "best", "best_epoch", "best_tokens", "final", "final_epoch",
                                  "final_minus_best", "evals", "status", "run"]),
        "overfitting": onset.select([*run_cols, "overfit", "onset_epoch", "onset_tokens", "min_before_onset",
                                     "final_minus_best", "tolerance", "run"]),
        "tokens_to_target": reach.select([*run_cols, "target", "reached", "tokens", "epoch", "run"]),
        "speedup": ratio,
        "seeds": seeds,
    }
    gap = compute_gap(frame)
    if not gap.is_empty():
        tables["compute_gap"] = gap
    if not downstream.is_empty():
        tables["downstream"] = downstream.select(["variant", "seed", "task",
                                                  *[c for c in downstream.columns if c.startswith(("final_", "best_"))],
                                                  "run"])
    out.mkdir(parents=True, exist_ok=True)
    arguments = {"metric": metric, "tolerance": tolerance, "target": target,
                 "baseline": [baseline] if isinstance(baseline, str) else baseline}
    (out / ARGUMENTS_FILE).write_text(json.dumps(arguments, indent=2, sort_keys=True) + "\n")
    for name, table in tables.items():
        table.write_csv(out / f"{name}.csv")
        (out / f"{name}.md").write_text(to_markdown(table) + "\n")

    report = Report(out, headline, tables, targets=targets, baselines=baselines)
    if draw:
        drawn = {
            "val_loss_vs_epoch": figures.validation_curves(frame, metric),
            "val_loss_vs_tokens": figures.validation_curves(frame, metric, x="tokens_seen", target=targets),
            "downstream_acc_vs_epoch": figures.downstream_curves(frame),
            "best_loss_vs_strength": figures.best_vs_strength(frame, metric),
            "best_loss_vs_repetition": figures.best_loss_vs_repetition(frame, metric),
            "best_loss_vs_alpha": figures.best_loss_vs_alpha(frame),
            "alpha_repetition_heatmap": figures.alpha_repetition_heatmap(frame),
        }
        for name, fig in drawn.items():
            if fig is not None:
                report.figures[name] = figures.save(fig, out, name, formats)
    _write_index(report, root, frame, metric, tolerance)
    return report


def target_sentence(targets: dict[str, float], baselines: dict[str, str | None]) -> str:
    """How tokens-to-target and speed-ups were computed, one clause per metric."""
    parts = []
    for metric, value in targets.items():
        base = baselines.get(metric)
        parts.append(f"{metric}: target {value:.4f}, " + (f"speed-up relative to `{base}`" if base is not None else
                                                          "no speed-up (no other variant of this metric)"))
    return ("Tokens-to-target: first evaluation at or below the target of the run's own metric; speed-ups only "
            "between variants of the same metric (" + "; ".join(parts) + ").")


SECTION_TEXT = {"compute_gap": [  # what a table's section in report.md says above it
    "Single-epoch runs only; losses are means over seeds, at token counts every seed was evaluated at. For each "
    "token count b at which the AR reference `ar_variant` was evaluated (`ar_tokens`, AR NLL `ar_loss`), "
    "`mdm_tokens` is the first token count at which the MDM variant's NELBO is at or below it, and `ratio` = "
    "mdm_tokens / b; when it is never reached, `mdm_tokens_lower_bound` is the last evaluated MDM token count (the "
    "answer is more than that). This compares the MDM NELBO, an upper bound on the MDM's NLL, with the AR NLL: "
    "the MDM's true NLL may reach the AR loss sooner, so each ratio is an upper bound on the tokens (compute, at "
    "equal model size) MDM needs for equal likelihood.", ""]}


def _write_index(report: Report, root: Path, frame: pl.DataFrame, metric: str, tolerance: float) -> None:
    entropy = unigram_entropy(frame)
    metrics = ", ".join(sorted(report.tables["best_loss"]["metric"].unique().to_list()))
    status = report.tables["runs"]
    complete = status.filter(pl.col("status") == "complete")
    left = status.filter((pl.col("status") != "complete") | (pl.col("val_evals") == 0))
    in_tables = report.tables["best_loss"]
    lines = [f"# Report: {root.name}", "",
             f"{status.height} run folders ({complete.height} complete); {in_tables.height} runs of "
             f"{in_tables['variant'].n_unique()} variants in the tables"
             + (f"; {left.height} not complete or without evaluations, listed below." if left.height else ".")
             + " Validation loss: "
             f"{'each run' + chr(39) + 's own objective metric' if metric == 'val_loss' else metric} ({metrics}; "
             "ar_nll is the exact AR NLL, mdm_nelbo the MDM NELBO bound), nats per token.",
             f"Unigram entropy (context-free baseline): {entropy:.4f}" if entropy is not None else "",
             f"Overfitting onset: first evaluation more than {tolerance:g} nats above the running minimum. "
             + target_sentence(report.targets, report.baselines), ""]
    if left.height:
        lines += ["## Runs not complete or without evaluations", "",
                  "Runs with evaluations are in the tables with the curve they have; the others are not.", "",
                  to_markdown(left.select("run_name", "run", "status", "val_evals", "error")), ""]
    lines += ["## Headline (mean over seeds)", "", to_markdown(report.headline), ""]
    for name in report.figures:
        lines += [f"![{name}]({name}.png)", ""]
    for name, table in report.tables.items():
        if name != "headline":
            lines += [f"## {name.replace('_', ' ')}", "", *SECTION_TEXT.get(name, []), to_markdown(table), ""]
    (report.out_dir / "report.md").write_text("\n".join(lines))
