"""``workbench report results/X``: derived tables (CSV + markdown) and figures (PNG + SVG) in ``results/X/report/``.

Files: ``headline`` (one row per variant, mean over seeds), ``best_loss``, ``overfitting``, ``tokens_to_target``
(+ ``speedup``), ``downstream`` (when task rows exist) and ``seeds`` (mean/std/min/max over seeds) as ``.csv`` and
``.md``; figures ``val_loss_vs_epoch``, ``val_loss_vs_tokens``, ``downstream_acc_vs_epoch``,
``best_loss_vs_strength`` and ``alpha_repetition_heatmap`` where the results have what they show; and
``report.md`` tying them together. The target of tokens-to-target defaults to the largest best validation loss
over runs, i.e. the best loss that every run reaches, so every variant gets a tokens count; the speed-up
baseline defaults to the first variant in declared order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from workbench.analysis import figures
from workbench.analysis.load import load_results
from workbench.analysis.tables import (
    best_validation,
    downstream_accuracy,
    overfitting_onset,
    seed_summary,
    speedup,
    tokens_to_target,
    unigram_entropy,
)


@dataclass
class Report:
    out_dir: Path
    headline: pl.DataFrame
    tables: dict[str, pl.DataFrame]
    figures: dict[str, list[Path]] = field(default_factory=dict)
    target: float | None = None
    baseline: str | None = None


def _format_value(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def to_markdown(frame: pl.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (floats to ``digits`` decimals, nulls empty)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(_format_value(v, digits) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def headline_table(best: pl.DataFrame, onset: pl.DataFrame, reach: pl.DataFrame, ratio: pl.DataFrame | None,
                   downstream: pl.DataFrame | None) -> pl.DataFrame:
    """One row per variant (mean over seeds): best and final loss, where the best is, overfitting onset,
    tokens to target and speed-up, and the downstream task average when there is one."""
    runs = best.join(onset.select("run", "onset_epoch", "overfit"), on="run").join(
        reach.select("run", pl.col("tokens").alias("tokens_to_target")), on="run")
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
        pl.col("tokens_to_target").mean().alias("tokens_to_target"),
    )
    if ratio is not None:
        table = table.join(ratio.select("variant", "speedup"), on="variant", how="left", maintain_order="left")
    if downstream is not None and not downstream.is_empty():
        average = (downstream.filter(pl.col("task") == "average").group_by("variant")
                   .agg(pl.col("final_acc").mean().alias("downstream_final_acc"),
                        pl.col("best_acc").mean().alias("downstream_best_acc")))
        table = table.join(average, on="variant", how="left", maintain_order="left")
    return table


def write_report(root: str | Path, out_dir: str | Path | None = None, metric: str = "val_loss",
                 tolerance: float = 0.01, target: float | None = None, baseline: str | None = None,
                 formats: tuple[str, ...] = ("png", "svg"), draw: bool = True) -> Report:
    """Load ``root``, compute every derived table, write tables and figures, and return them."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    frame = load_results(root)
    best = best_validation(frame, metric)
    if best.is_empty():
        raise FileNotFoundError(f"{root}: no validation rows for {metric} in any run")
    onset = overfitting_onset(frame, tolerance, metric)
    target = float(best["best"].max()) if target is None else target
    reach = tokens_to_target(frame, target, metric)
    variants = best["variant"].unique(maintain_order=True).to_list()
    baseline = baseline or variants[0]
    ratio = speedup(reach, baseline)
    downstream = downstream_accuracy(frame)
    seeds = seed_summary(best.join(onset.select("run", "onset_epoch"), on="run")
                         .join(reach.select("run", pl.col("tokens").alias("tokens_to_target")), on="run"),
                         ["best", "best_epoch", "final", "onset_epoch", "tokens_to_target"])
    headline = headline_table(best, onset, reach, ratio, downstream if not downstream.is_empty() else None)

    run_cols = ["variant", "seed", "objective", "metric"]
    tables = {
        "headline": headline,
        "best_loss": best.select([*run_cols, "best", "best_epoch", "best_tokens", "final", "final_epoch",
                                  "final_minus_best", "evals", "run"]),
        "overfitting": onset.select([*run_cols, "overfit", "onset_epoch", "onset_tokens", "min_before_onset",
                                     "final_minus_best", "tolerance", "run"]),
        "tokens_to_target": reach.select([*run_cols, "target", "reached", "tokens", "epoch", "run"]),
        "speedup": ratio,
        "seeds": seeds,
    }
    if not downstream.is_empty():
        tables["downstream"] = downstream.select(["variant", "seed", "task",
                                                  *[c for c in downstream.columns if c.startswith(("final_", "best_"))],
                                                  "run"])
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.write_csv(out / f"{name}.csv")
        (out / f"{name}.md").write_text(to_markdown(table) + "\n")

    report = Report(out, headline, tables, target=target, baseline=baseline)
    if draw:
        drawn = {
            "val_loss_vs_epoch": figures.validation_curves(frame, metric),
            "val_loss_vs_tokens": figures.validation_curves(frame, metric, x="tokens_seen", target=target),
            "downstream_acc_vs_epoch": figures.downstream_curves(frame),
            "best_loss_vs_strength": figures.best_vs_strength(frame, metric),
            "alpha_repetition_heatmap": figures.alpha_repetition_heatmap(frame),
        }
        for name, fig in drawn.items():
            if fig is not None:
                report.figures[name] = figures.save(fig, out, name, formats)
    _write_index(report, root, frame, metric, tolerance)
    return report


def _write_index(report: Report, root: Path, frame: pl.DataFrame, metric: str, tolerance: float) -> None:
    entropy = unigram_entropy(frame)
    metrics = ", ".join(sorted(report.tables["best_loss"]["metric"].unique().to_list()))
    lines = [f"# Report: {root.name}", "",
             f"{frame['run'].n_unique()} runs, {frame['variant'].n_unique()} variants. Validation loss: "
             f"{'each run' + chr(39) + 's own objective metric' if metric == 'val_loss' else metric} ({metrics}; "
             "ar_nll is the exact AR NLL, mdm_nelbo the MDM NELBO bound), nats per token.",
             f"Unigram entropy (context-free baseline): {entropy:.4f}" if entropy is not None else "",
             f"Overfitting onset: first evaluation more than {tolerance:g} nats above the running minimum. "
             f"Tokens-to-target: first evaluation at or below {report.target:.4f}; speed-up relative to "
             f"`{report.baseline}`.", "", "## Headline (mean over seeds)", "", to_markdown(report.headline), ""]
    for name in report.figures:
        lines += [f"![{name}]({name}.png)", ""]
    for name, table in report.tables.items():
        if name != "headline":
            lines += [f"## {name.replace('_', ' ')}", "", to_markdown(table), ""]
    (report.out_dir / "report.md").write_text("\n".join(lines))
