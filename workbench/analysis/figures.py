"""Figures in the papers' format, drawn with seaborn on the Agg backend (files, no display needed).

Every validation-loss figure draws the unigram entropy of the validation set (the loss of a context-free model
that knows the token frequencies) as a dashed horizontal line. seaborn takes pandas frames, so each function
converts its polars data with ``to_pandas()``. Functions return a matplotlib Figure, or None when the results
have nothing to show for that figure (e.g. no downstream tasks, fewer than two dual ratios).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import polars as pl
import seaborn as sns

from workbench.analysis.tables import (
    ACCURACY_METRICS,
    NON_TASK_SPLITS,
    best_validation,
    unigram_entropy,
    validation_rows,
)
from workbench.analysis.tables import declared_order as _order

LOSS_LABEL = {"val_loss": "validation loss (nats/token)", "ar_nll": "validation AR NLL (nats/token)",
              "mdm_nelbo": "validation MDM NELBO (nats/token, bound)"}
LINE = "group (metric)"  # best_loss_vs_repetition's hue: the metric is part of each line's name
BASELINE_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0, "zorder": 0}


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
    plt.rcParams["svg.hashsalt"] = "workbench"  # deterministic element ids: re-running a report gives no diff


def _hue(frame: pl.DataFrame) -> str:
    """Colour by group (variant without its repetition point) when a repetition axis splits the runs."""
    if "group" in frame.columns and "repetition" in frame.columns and frame["repetition"].n_unique() > 1:
        return "group"
    return "variant"


def draw_baseline(ax, entropy: float | None, label: str = "unigram entropy") -> None:
    """The context-free reference line (dashed) with its label at the right end."""
    if entropy is None:
        return
    ax.axhline(entropy, **BASELINE_STYLE, label="_" + label)
    ax.annotate(label, xy=(0.0, entropy), xycoords=("axes fraction", "data"), xytext=(4, 3),
                textcoords="offset points", ha="left", va="bottom", fontsize=8, color="0.35")


def _multi_seed(frame: pl.DataFrame, hue: str) -> bool:
    return "seed" in frame.columns and frame.group_by(hue).agg(pl.col("seed").n_unique())["seed"].max() > 1


def validation_curves(frame: pl.DataFrame, metric: str = "val_loss", x: str = "epoch",
                      target: float | Mapping[str, float] | None = None):
    """Validation loss vs. epoch (or tokens_seen): one line per variant, bands over seeds (min-max), one panel
    per repetition point when the ablation sweeps one. ``target``: a dotted line per metric (a mapping metric ->
    target, each labelled with its metric when there are several)."""
    rows = validation_rows(frame, metric)
    if rows.is_empty():
        return None
    _theme()
    hue = _hue(rows)
    col = "repetition" if hue == "group" else None
    style = "val_metric" if metric == "val_loss" and rows["val_metric"].n_unique() > 1 else None
    # one metric on the axis: name it (the MDM NELBO is a bound, not an NLL); several: the line style says which
    shown = rows["val_metric"][0] if metric == "val_loss" and style is None else metric
    data = rows.to_pandas()
    grid = sns.relplot(data=data, x=x, y="value", hue=hue, hue_order=_order(rows, hue), style=style, col=col,
                       col_order=_order(rows, col) if col else None, col_wrap=min(3, rows[col].n_unique()) if col
                       else None, kind="line", marker="o", markersize=4,
                       errorbar=("pi", 100) if _multi_seed(rows, hue) else None, height=3.6, aspect=1.35,
                       facet_kws={"sharey": True, "sharex": False})
    entropy = unigram_entropy(frame)
    targets = {} if target is None else dict(target) if isinstance(target, Mapping) else {"": float(target)}
    for ax in grid.axes.flat:
        draw_baseline(ax, entropy)
        for name, value in targets.items():
            ax.axhline(value, color="tab:red", linestyle=":", linewidth=1.0, zorder=0)
            label = f"target ({name})" if name and len(targets) > 1 else "target"
            ax.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                        textcoords="offset points", ha="right", va="bottom", fontsize=8, color="tab:red")
        ax.set_xlabel("epoch (passes over the unique tokens)" if x == "epoch" else "tokens seen")
        ax.set_ylabel(LOSS_LABEL.get(shown, shown))
    repeated = rows["epoch"].max() > 1.0 + 1e-6  # a one-epoch study (e.g. time samplers) sees no repetition
    grid.figure.suptitle("Validation loss under repetition" if repeated else "Validation loss", y=1.02)
    return grid.figure


def downstream_curves(frame: pl.DataFrame):
    """Downstream accuracy vs. epoch, one panel per task (acc_norm where the task reports it, else acc)."""
    rows = frame.filter(~pl.col("split").is_in(NON_TASK_SPLITS) & pl.col("metric").is_in(ACCURACY_METRICS))
    if rows.is_empty():
        return None
    normed = rows.group_by("split").agg((pl.col("metric") == "acc_norm").any().alias("_normed"))
    rows = rows.join(normed, on="split").filter(
        pl.col("metric") == pl.when(pl.col("_normed")).then(pl.lit("acc_norm")).otherwise(pl.lit("acc")))
    rows = rows.with_columns(pl.format("{} ({})", pl.col("split"), pl.col("metric")).alias("task"))
    _theme()
    hue = _hue(rows)
    tasks = sorted(rows["task"].unique().to_list())
    grid = sns.relplot(data=rows.to_pandas(), x="epoch", y="value", hue=hue, hue_order=_order(rows, hue),
                       col="task", col_order=tasks, col_wrap=min(3, len(tasks)), kind="line", marker="o",
                       markersize=4, errorbar=("pi", 100) if _multi_seed(rows, hue) else None, height=3.2,
                       aspect=1.3, facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
    grid.figure.suptitle("Downstream zero-shot accuracy", y=1.02)
    return grid.figure


def best_vs_strength(frame: pl.DataFrame, metric: str = "val_loss"):
    """Best (solid) and final (dashed) validation loss vs. regularization strength, one colour per regularizer
    (AR-side runs); runs without a regularizer are every line's strength-0 point; MDM runs are dotted reference
    lines at their best loss."""
    best = best_validation(frame, metric)
    if "regularizer" not in best.columns:
        return None
    ar_side = best.filter(pl.col("objective") != "mdm")
    single = ar_side.filter(pl.col("strength").is_not_null() & (pl.col("regularizer") != "none"))
    if single.filter(pl.col("strength") > 0).is_empty():
        return None
    lines = []
    baseline = ar_side.filter(pl.col("regularizer") == "none")
    for regularizer in _order(single, "regularizer"):
        lines.append(single.filter(pl.col("regularizer") == regularizer))
        if not baseline.is_empty():
            lines.append(baseline.with_columns(pl.lit(regularizer).alias("regularizer")))
    data = pl.concat(lines, how="vertical_relaxed").unpivot(
        on=["best", "final"], index=["regularizer", "strength", "seed"], variable_name="loss", value_name="value")
    _theme()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=data.to_pandas(), x="strength", y="value", hue="regularizer", style="loss", marker="o", ax=ax,
                 errorbar="sd" if data["seed"].n_unique() > 1 else None)
    palette = sns.color_palette("dark", 4)
    for i, (variant, rows) in enumerate(best.filter(pl.col("objective") == "mdm").group_by("variant",
                                                                                           maintain_order=True)):
        ax.axhline(rows["best"].mean(), color=palette[i % 4], linestyle=":", linewidth=1.3,
                   label=f"{variant[0]} best ({rows['metric'][0]})")
    draw_baseline(ax, unigram_entropy(frame))
    ax.set_xlabel("regularization strength (masking rate, dropout p, weight decay)")
    ax.set_ylabel(LOSS_LABEL.get(metric, metric))
    ax.set_title("Best and final validation loss vs. regularization strength")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _epoch_axis(ax, epochs: Sequence[float]) -> None:
    """A log2 epochs axis with a tick at each epoch value the runs planned (1, 8, 64, not 2^k in general)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(epochs))
    ax.set_xticklabels([f"{e:g}" for e in epochs])
    ax.minorticks_off()


def best_loss_vs_repetition(frame: pl.DataFrame, metric: str = "val_loss"):
    """Best (solid) and final (dashed) validation loss vs. epochs of repetition, one colour per group (variant
    without its repetition point), mean over seeds with a band of their standard deviation. Each line's legend
    label names its metric: an AR NLL and an MDM NELBO (upper bound) are different quantities. Dual runs have
    their own views (:func:`best_loss_vs_alpha`, :func:`alpha_repetition_heatmap`) and are left out; None when
    the runs do not sweep repetition (fewer than two planned epoch counts)."""
    best = best_validation(frame, metric)
    if "planned_epochs" not in best.columns:
        return None
    if "objective" in best.columns:
        best = best.filter(pl.col("objective").ne_missing("dual"))
    best = best.filter(pl.col("planned_epochs").is_not_null())
    if best.is_empty() or best["planned_epochs"].n_unique() < 2:
        return None
    hue = "group" if "group" in best.columns else "variant"
    best = best.with_columns(pl.format("{} ({})", pl.col(hue), pl.col("metric")).alias(LINE))
    index = [c for c in (LINE, hue, "planned_epochs", "seed", "order") if c in best.columns]
    data = best.unpivot(on=["best", "final"], index=index, variable_name="loss", value_name="value")
    _theme()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=data.to_pandas(), x="planned_epochs", y="value", hue=LINE, hue_order=_order(data, LINE),
                 style="loss", style_order=["best", "final"], marker="o", ax=ax,
                 errorbar="sd" if _multi_seed(data, LINE) else None)
    draw_baseline(ax, unigram_entropy(frame))
    _epoch_axis(ax, sorted(best["planned_epochs"].unique().to_list()))
    ax.set_xlabel("epochs of repetition (passes over the unique tokens)")
    metrics = best["metric"].unique().to_list()
    ax.set_ylabel(LOSS_LABEL.get(metrics[0], metrics[0]) if len(metrics) == 1
                  else "validation loss (nats/token; metric per line)")
    ax.set_title("Best and final validation loss vs. repetition")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _dual_runs(frame: pl.DataFrame) -> tuple[pl.DataFrame, list[str]] | None:
    """The dual-objective rows and the validation metrics they report, or None without dual runs at two or
    more AR fractions (nothing to plot against alpha)."""
    if "ar_fraction" not in frame.columns or "objective" not in frame.columns:
        return None
    dual = frame.filter(pl.col("objective") == "dual")
    if dual.is_empty() or dual["ar_fraction"].n_unique() < 2:
        return None
    metrics = [m for m in ("ar_nll", "mdm_nelbo")
               if not dual.filter((pl.col("split") == "val") & (pl.col("metric") == m)).is_empty()]
    return dual, metrics


def _levels_by_label(best: pl.DataFrame) -> bool:
    """Whether repetition levels need their label (e.g. several unique-token budgets at the same epochs)
    rather than the epoch count to tell them apart."""
    return "repetition" in best.columns and best["repetition"].null_count() == 0 and \
        best["repetition"].n_unique() > best["planned_epochs"].n_unique()


def best_loss_vs_alpha(frame: pl.DataFrame):
    """Best validation loss of the dual runs vs. AR fraction alpha, one panel per validation metric they report
    (AR NLL, MDM NELBO), one line per repetition level, mean over seeds with a band of their standard deviation.
    None when there are no dual runs at two or more alphas."""
    found = _dual_runs(frame)
    if found is None:
        return None
    dual, metrics = found
    entropy = unigram_entropy(frame)
    _theme()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        best = _with_repetition_label(best_validation(dual, metric))
        sns.lineplot(data=best.to_pandas(), x="ar_fraction", y="best", hue="repetition level",
                     hue_order=_order(best, "repetition level"), marker="o", ax=ax,
                     errorbar="sd" if _multi_seed(best, "repetition level") else None)
        draw_baseline(ax, entropy)
        ax.set_xticks(sorted(best["ar_fraction"].unique().to_list()))
        ax.set_xlabel("AR fraction α (0: MDM, 1: AR)")
        ax.set_ylabel("best " + LOSS_LABEL.get(metric, metric))
        ax.set_title(f"best {metric}")
        ax.legend(title="repetition", fontsize=8, frameon=False)
    fig.suptitle("Dual objective: best loss vs. AR fraction", y=1.02)
    fig.tight_layout()
    return fig


def _with_repetition_label(best: pl.DataFrame) -> pl.DataFrame:
    """A ``repetition level`` column ("1 epoch", "64 epochs"), ordered by epochs; the repetition label instead
    when several unique-token budgets share one epoch count (as in :func:`alpha_repetition_heatmap`)."""
    by_label = _levels_by_label(best)
    epochs = pl.col("planned_epochs")
    whole = pl.when(epochs == epochs.round()).then(epochs.cast(pl.Int64).cast(pl.String))
    plural = pl.when(epochs == 1).then(pl.lit("epoch")).otherwise(pl.lit("epochs"))
    label = pl.col("repetition") if by_label else pl.format(
        "{} {}", whole.otherwise(epochs.round(3).cast(pl.String)), plural).fill_null("unknown epochs")
    return best.with_columns(label.alias("repetition level"), pl.col("planned_epochs").alias("order"))


def alpha_repetition_heatmap(frame: pl.DataFrame):
    """Best validation loss over AR fraction alpha (rows) x epochs of repetition (columns), one heatmap per
    validation metric the dual runs report (mean over seeds). The unigram entropy is marked on the colour bar."""
    found = _dual_runs(frame)
    if found is None:
        return None
    dual, metrics = found
    entropy = unigram_entropy(frame)
    _theme()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        best = best_validation(dual, metric)
        column = "repetition" if _levels_by_label(best) else "planned_epochs"
        table = (best.group_by(["ar_fraction", column]).agg(pl.col("best").mean())
                 .sort(["ar_fraction", column]).pivot(on=column, index="ar_fraction", values="best",
                                                      sort_columns=True))
        matrix = table.to_pandas().set_index("ar_fraction")
        matrix.columns = [f"{float(c):g}" if column == "planned_epochs" else c for c in matrix.columns]
        sns.heatmap(matrix, annot=True, fmt=".3f", cmap="viridis_r", ax=ax, cbar_kws={"label": "best " + metric})
        if entropy is not None:
            colorbar = ax.collections[0].colorbar
            low, high = colorbar.mappable.get_clim()
            if low <= entropy <= high:
                colorbar.ax.axhline(entropy, **{**BASELINE_STYLE, "color": "white", "linewidth": 1.5})
        ax.set_xlabel("epochs (repetitions)")
        ax.set_ylabel("AR fraction α")
        ax.set_title(f"best {metric}" + (f" (unigram entropy {entropy:.3f})" if entropy is not None else ""))
    fig.suptitle("Dual objective: AR fraction x repetition", y=1.02)
    fig.tight_layout()
    return fig


def save(fig, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<format>`` for each format (deterministic metadata), then close it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        metadata = {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    plt.close(fig)
    return paths
