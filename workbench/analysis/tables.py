"""Derived tables over the tidy results frame (see :mod:`workbench.analysis.load`), one function each.

All take the long frame (one row per run, step, split, metric) and return one row per run (or per run and
task), carrying whichever run columns the frame has (variant, seed, objective, ...). ``metric="val_loss"``
means each run's own validation loss (column ``val_metric``: ``ar_nll`` for AR/dual/prefix-LM runs,
``mdm_nelbo`` for MDM runs); any metric name selects that metric for every run instead.

Definitions:
- best validation loss: the minimum over evaluations, with the epoch/tokens/step of its first occurrence;
  final = the last evaluation.
- overfitting onset: the first evaluation whose loss exceeds the running minimum of the evaluations before it
  by more than ``tolerance`` (nats), i.e. ``value - cummin(value) > tolerance``; null if that never happens.
- tokens-to-target: the first evaluation at which the loss is <= the target (``direction="above"``: >=, for
  accuracies); with ``interpolate=True`` the crossing is placed linearly between that evaluation and the one
  before it. Null if never reached. Targets are per metric: ``ar_nll`` (exact NLL) and ``mdm_nelbo`` (an upper
  bound) are different quantities, so one number is never a target for both (:func:`default_targets`: per
  metric, the largest best loss, which every run of that metric reaches).
- speed-up: within one metric (and target) only, the baseline's mean tokens-to-target over its seeds divided by
  the variant's. A variant whose metric has no baseline (none named for it, or the only variant of its metric)
  gets no speed-up rather than a ratio against another quantity.
- downstream accuracy: per task, the final and best ``acc`` and ``acc_norm``; the task ``average`` of a metric
  is taken per evaluation over every task reporting that metric (all report ``acc``; schema and language-modelling
  tasks have no ``acc_norm``), then its final and best.
- seed summary: mean, standard deviation (ddof 1; null for one seed), min, max and count over seeds.
- compute gap (SMDM's question, single epoch only): for each token count b at which the AR reference was
  evaluated, the first token count at which an MDM variant's seed-mean NELBO is <= the AR's seed-mean NLL at b,
  and the ratio of the two. The NELBO is an upper bound on the MDM's NLL, so the MDM's true NLL may reach the AR
  loss sooner: the ratio is an upper bound on the extra tokens (compute, at equal model size) MDM needs for equal
  likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from workbench.analysis.load import LOSS_METRICS, RUN_COLUMNS

NON_TASK_SPLITS = ("train", "val")
ACCURACY_METRICS = ("acc", "acc_norm")


def _run_keys(frame: pl.DataFrame) -> list[str]:
    """Run-level columns present in ``frame`` (always including ``run``)."""
    sweep = [c for c in frame.columns if c.startswith("sweep.")]
    return ["run", *[c for c in [*RUN_COLUMNS, *sweep] if c in frame.columns and c != "run"]]


def with_val_metric(frame: pl.DataFrame) -> pl.DataFrame:
    """Add ``val_metric`` when a hand-made frame lacks it: ``mdm_nelbo`` for objective mdm (or runs that only
    have it), else ``ar_nll``."""
    if "val_metric" in frame.columns:
        return frame
    val = frame.filter(pl.col("split") == "val")
    has_ar = val.group_by("run").agg((pl.col("metric") == "ar_nll").any().alias("_has_ar"))
    frame = frame.join(has_ar, on="run", how="left")
    objective = pl.col("objective") if "objective" in frame.columns else pl.lit(None, dtype=pl.String)
    choice = (pl.when((objective == "mdm") | ~pl.col("_has_ar").fill_null(False)).then(pl.lit("mdm_nelbo"))
              .otherwise(pl.lit("ar_nll")))
    return frame.with_columns(choice.alias("val_metric")).drop("_has_ar")


def validation_rows(frame: pl.DataFrame, metric: str = "val_loss") -> pl.DataFrame:
    """The validation curve rows used for ``metric`` (``val_loss``: each run's own ``val_metric``)."""
    if metric == "val_loss":
        frame = with_val_metric(frame)
        rows = frame.filter((pl.col("split") == "val") & (pl.col("metric") == pl.col("val_metric")))
    else:
        rows = frame.filter((pl.col("split") == "val") & (pl.col("metric") == metric))
    return rows.sort([c for c in ("order", "seed", "run", "step") if c in rows.columns], nulls_last=True)


def unigram_entropy(frame: pl.DataFrame) -> float | None:
    """The context-free baseline (mean over runs; equal for runs sharing a tokenizer and validation set)."""
    rows = frame.filter((pl.col("split") == "val") & (pl.col("metric") == "unigram_entropy"))
    return float(rows.group_by("run").agg(pl.col("value").first())["value"].mean()) if rows.height else None


def best_validation(frame: pl.DataFrame, metric: str = "val_loss") -> pl.DataFrame:
    """Per run: best (minimum) validation loss and where it occurs, and the final value."""
    rows = validation_rows(frame, metric)
    keys = _run_keys(rows)
    return rows.group_by(keys, maintain_order=True).agg(
        pl.col("metric").first().alias("metric"),
        pl.col("value").min().alias("best"),
        pl.col("epoch").get(pl.col("value").arg_min()).alias("best_epoch"),
        pl.col("tokens_seen").get(pl.col("value").arg_min()).alias("best_tokens"),
        pl.col("step").get(pl.col("value").arg_min()).alias("best_step"),
        pl.col("value").last().alias("final"),
        pl.col("epoch").last().alias("final_epoch"),
        pl.col("tokens_seen").last().alias("final_tokens"),
        pl.len().alias("evals"),
    ).with_columns((pl.col("final") - pl.col("best")).alias("final_minus_best"))


def overfitting_onset(frame: pl.DataFrame, tolerance: float = 0.01, metric: str = "val_loss") -> pl.DataFrame:
    """Per run: the first epoch whose validation loss exceeds the running minimum by more than ``tolerance``."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    rows = validation_rows(frame, metric)
    keys = _run_keys(rows)
    rows = rows.with_columns(pl.col("value").cum_min().over("run").alias("_running_min"))
    rows = rows.with_columns((pl.col("value") - pl.col("_running_min") > tolerance).alias("_rise"))
    first = pl.col("_rise").arg_max()
    return rows.group_by(keys, maintain_order=True).agg(
        pl.col("metric").first().alias("metric"),
        pl.col("_rise").any().alias("overfit"),
        pl.when(pl.col("_rise").any()).then(pl.col("epoch").get(first)).alias("onset_epoch"),
        pl.when(pl.col("_rise").any()).then(pl.col("tokens_seen").get(first)).alias("onset_tokens"),
        pl.when(pl.col("_rise").any()).then(pl.col("step").get(first)).alias("onset_step"),
        pl.when(pl.col("_rise").any()).then(pl.col("_running_min").get(first)).alias("min_before_onset"),
        (pl.col("value").last() - pl.col("value").min()).alias("final_minus_best"),
    ).with_columns(pl.lit(tolerance).alias("tolerance"))


def default_targets(best: pl.DataFrame) -> dict[str, float]:
    """Per metric of a :func:`best_validation` table: the largest best loss of its runs (every one reaches it)."""
    per = best.group_by("metric", maintain_order=True).agg(pl.col("best").max())
    return {metric: float(value) for metric, value in per.iter_rows() if value is not None}


def tokens_to_target(frame: pl.DataFrame, target: float | Mapping[str, float], metric: str = "val_loss",
                     direction: str = "below", interpolate: bool = False) -> pl.DataFrame:
    """Per run: the first tokens_seen (and epoch) at which ``metric`` reaches its target.

    ``target`` is one number when every run reports the same metric, else a mapping metric -> target (runs of a
    metric without one get a null target and are not reached); one number over ar_nll and mdm_nelbo runs at once
    raises ValueError, because it would compare an NLL with a bound."""
    if direction not in ("below", "above"):
        raise ValueError(f"direction is 'below' (losses) or 'above' (accuracies), got {direction!r}")
    if metric in ("val_loss", *LOSS_METRICS):
        rows = validation_rows(frame, metric)
    else:  # e.g. a downstream accuracy: frame pre-filtered by the caller to one split
        rows = frame.filter(pl.col("metric") == metric)
        rows = rows.sort([c for c in ("order", "seed", "run", "step") if c in rows.columns], nulls_last=True)
    keys = _run_keys(rows)
    metrics = rows["metric"].unique(maintain_order=True).to_list()
    if isinstance(target, Mapping):
        goal = pl.col("metric").replace_strict({m: float(v) for m, v in target.items()}, default=None,
                                               return_dtype=pl.Float64)
    elif len(metrics) > 1:
        raise ValueError(f"target {target:g} is one number, but the runs report different quantities "
                         f"({', '.join(metrics)}); give one target per metric, e.g. {{{metrics[0]!r}: ...}}")
    else:
        goal = pl.lit(float(target), dtype=pl.Float64)
    rows = rows.with_columns(goal.alias("_target"))
    hit = (pl.col("value") <= pl.col("_target") if direction == "below" else pl.col("value") >= pl.col("_target"))
    rows = rows.with_columns(hit.fill_null(False).alias("_hit"),
                             pl.col("tokens_seen").shift(1).over("run").alias("_prev_tokens"),
                             pl.col("value").shift(1).over("run").alias("_prev_value"),
                             pl.col("epoch").shift(1).over("run").alias("_prev_epoch"))
    first = pl.col("_hit").arg_max()
    table = rows.group_by(keys, maintain_order=True).agg(
        pl.col("metric").first().alias("metric"),
        pl.col("_target").first().alias("_goal"),
        pl.col("_hit").any().alias("reached"),
        pl.col("tokens_seen").get(first).cast(pl.Float64).alias("_tokens"),
        pl.col("epoch").get(first).alias("_epoch"),
        pl.col("value").get(first).alias("_value"),
        pl.col("_prev_tokens").get(first).cast(pl.Float64).alias("_p_tokens"),
        pl.col("_prev_epoch").get(first).alias("_p_epoch"),
        pl.col("_prev_value").get(first).alias("_p_value"),
    )
    if interpolate:
        # linear between the evaluation before the crossing and the crossing (if there is one before it)
        span = pl.col("_value") - pl.col("_p_value")
        fraction = pl.when(pl.col("_p_value").is_not_null() & (span != 0)).then(
            (pl.col("_goal") - pl.col("_p_value")) / span).otherwise(1.0).clip(0.0, 1.0)
        tokens = pl.col("_p_tokens") + fraction * (pl.col("_tokens") - pl.col("_p_tokens"))
        epoch = pl.col("_p_epoch") + fraction * (pl.col("_epoch") - pl.col("_p_epoch"))
        table = table.with_columns(pl.coalesce(tokens, pl.col("_tokens")).alias("_tokens"),
                                   pl.coalesce(epoch, pl.col("_epoch")).alias("_epoch"))
    return table.with_columns(
        pl.when(pl.col("reached")).then(pl.col("_tokens")).alias("tokens"),
        pl.when(pl.col("reached")).then(pl.col("_epoch")).alias("epoch"),
        pl.col("_goal").alias("target"),
    ).drop([c for c in table.columns if c.startswith("_")])


def speedup(table: pl.DataFrame, baseline: str | Sequence[str] | None = None, by: str = "variant") -> pl.DataFrame:
    """Per ``by`` value and metric: mean tokens-to-target over the seeds that reached it and the speed-up over
    the baseline of the same metric and target (baseline tokens / variant tokens; > 1: fewer tokens).

    ``baseline`` names one ``by`` value per metric (a string or several); a metric none is named for gets no
    speed-up. Without ``baseline``, each metric's first ``by`` value (table order, i.e. declared order) is its
    baseline, and a metric with a single ``by`` value gets none: there is nothing of its kind to compare with."""
    named = [baseline] if isinstance(baseline, str) else list(baseline or [])
    known = table[by].unique(maintain_order=True).to_list()
    for name in named:
        if name not in known:
            raise ValueError(f"baseline {name!r} is not a {by}; choose one of {sorted(known, key=str)}")
    family = ["metric", "target"] if "target" in table.columns else ["metric"]
    per = table.group_by([by, *family], maintain_order=True).agg(
        pl.col("tokens").mean().alias("tokens_mean"),
        pl.col("reached").sum().alias("seeds_reached"),
        pl.len().alias("seeds"),
    )
    parts = []
    for _, group in per.group_by(family, maintain_order=True):
        members = group[by].to_list()
        chosen = [name for name in named if name in members]
        if len(chosen) > 1:
            raise ValueError(f"baselines {chosen} both report {group['metric'][0]}; name one per metric")
        base_name = chosen[0] if chosen else (members[0] if not named and len(members) > 1 else None)
        base = group.filter(pl.col(by) == base_name)["tokens_mean"].mean() if base_name is not None else None
        parts.append(group.with_columns((pl.lit(base, dtype=pl.Float64) / pl.col("tokens_mean")).alias("speedup"),
                                        pl.lit(base_name, dtype=pl.String).alias("baseline")))
    if not parts:
        return per.with_columns(pl.lit(None, dtype=pl.Float64).alias("speedup"),
                                pl.lit(None, dtype=pl.String).alias("baseline"))
    order = {value: i for i, value in enumerate(known)}
    out = pl.concat(parts, how="vertical_relaxed")
    return out.with_columns(pl.col(by).replace_strict(order, return_dtype=pl.Int64).alias("_o")).sort(
        "_o", maintain_order=True).drop("_o")


def downstream_accuracy(frame: pl.DataFrame) -> pl.DataFrame:
    """Per run and task (plus ``average``): final and best acc / acc_norm and the epoch of the best."""
    rows = frame.filter(~pl.col("split").is_in(NON_TASK_SPLITS) & pl.col("metric").is_in(ACCURACY_METRICS))
    keys = _run_keys(rows)
    if rows.is_empty():
        return pl.DataFrame(schema={**{k: frame.schema[k] for k in keys}, "task": pl.String})
    tasks = rows.rename({"split": "task"})
    average = (tasks.group_by([*keys, "step", "epoch", "tokens_seen", "metric"], maintain_order=True)
               .agg(pl.col("value").mean(), pl.col("task").n_unique().alias("_n"))
               .with_columns(pl.lit("average").alias("task")))
    n_tasks = tasks.group_by("run", "metric").agg(pl.col("task").n_unique().alias("_all"))
    average = average.join(n_tasks, on=["run", "metric"]).filter(pl.col("_n") == pl.col("_all")).drop("_n", "_all")
    combined = pl.concat([tasks.select([*keys, "task", "step", "epoch", "tokens_seen", "metric", "value"]),
                          average.select([*keys, "task", "step", "epoch", "tokens_seen", "metric", "value"])])
    combined = combined.sort(["run", "task", "metric", "step"])
    per = combined.group_by([*keys, "task", "metric"], maintain_order=True).agg(
        pl.col("value").last().alias("final"),
        pl.col("value").max().alias("best"),
        pl.col("epoch").get(pl.col("value").arg_max()).alias("best_epoch"),
    )
    wide = per.pivot(on="metric", index=[*keys, "task"], values=["final", "best", "best_epoch"])
    order = ["final_acc", "best_acc", "best_epoch_acc", "final_acc_norm", "best_acc_norm", "best_epoch_acc_norm"]
    return wide.select([*keys, "task", *[c for c in order if c in wide.columns]])


def seed_summary(table: pl.DataFrame, values: Sequence[str], by: Sequence[str] = ("variant",)) -> pl.DataFrame:
    """Mean, standard deviation (ddof 1), min, max and count over seeds of each column in ``values``."""
    aggregations = []
    for value in values:
        column = pl.col(value).cast(pl.Float64)
        aggregations += [column.mean().alias(f"{value}_mean"), column.std(ddof=1).alias(f"{value}_std"),
                         column.min().alias(f"{value}_min"), column.max().alias(f"{value}_max")]
    return table.group_by(list(by), maintain_order=True).agg(pl.len().alias("seeds"), *aggregations)


COMPUTE_GAP_SCHEMA = {"ar_variant": pl.String, "mdm_variant": pl.String, "ar_tokens": pl.Int64,
                      "ar_loss": pl.Float64, "mdm_tokens": pl.Int64, "reached": pl.Boolean, "ratio": pl.Float64,
                      "mdm_tokens_lower_bound": pl.Int64, "mdm_best_mean": pl.Float64}
SINGLE_EPOCH_TOLERANCE = 0.01  # planned epochs are tokens / unique tokens: 1 up to whole-sequence rounding


def declared_order(frame: pl.DataFrame, column: str) -> list:
    """Values of ``column`` in declared variant order (the ``order`` column when present, else sorted)."""
    if "order" in frame.columns:
        ranked = frame.group_by(column).agg(pl.col("order").min()).sort(["order", column], nulls_last=True)
        return ranked[column].to_list()
    return sorted(frame[column].unique().to_list())


def single_epoch_runs(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows of the runs that see each unique token once: planned_epochs ~ 1, or (no planned epochs known) whose
    last evaluation is within the first epoch."""
    planned = pl.col("planned_epochs") if "planned_epochs" in frame.columns else pl.lit(None, dtype=pl.Float64)
    last_epoch = pl.col("epoch").max().over("run")
    one = pl.when(planned.is_not_null()).then((planned - 1.0).abs() <= SINGLE_EPOCH_TOLERANCE).otherwise(
        last_epoch <= 1.0 + SINGLE_EPOCH_TOLERANCE)
    return frame.filter(one)


def _mean_curve(rows: pl.DataFrame, by: str) -> pl.DataFrame:
    """Seed-mean validation curve per ``by`` value, at the token counts where every run of that value has a row
    (a run cut short does not turn the tail of the mean into the mean of fewer seeds)."""
    runs = rows.group_by(by).agg(pl.col("run").n_unique().alias("_runs"))
    return (rows.group_by([by, "tokens_seen"]).agg(pl.col("value").mean(), pl.col("run").n_unique().alias("_n"))
            .join(runs, on=by).filter(pl.col("_n") == pl.col("_runs")).drop("_n", "_runs")
            .sort([by, "tokens_seen"]))


def compute_gap(frame: pl.DataFrame, ar_variant: str | None = None) -> pl.DataFrame:
    """SMDM's question at one epoch: how many tokens an MDM needs to reach the loss AR reaches after b tokens.

    Single-epoch runs only (:func:`single_epoch_runs`). The AR reference (column ``ar_variant``) is the seed-mean
    ``ar_nll`` curve of the AR-objective group ``ar_variant`` (default: the first in declared order), at each
    evaluated b > 0 where every AR seed has a row. For each MDM-objective group (``group``, else ``variant``),
    its seed-mean ``mdm_nelbo`` curve (token counts every seed has) gives ``mdm_tokens``, the first token count at
    which it is <= the AR loss at b (null and ``reached`` false when never), ``ratio`` = mdm_tokens / b,
    ``mdm_tokens_lower_bound`` = its last evaluated token count when not reached (the answer is "more than
    that"), and ``mdm_best_mean``.

    This compares the MDM NELBO, an upper bound on the MDM's NLL, with the AR NLL: the MDM's true NLL may reach
    the AR loss sooner, so ``ratio`` is an upper bound on the tokens (compute, at equal model size) MDM needs for
    equal likelihood. Empty when there are no single-epoch AR and MDM runs."""
    empty = pl.DataFrame(schema=COMPUTE_GAP_SCHEMA)
    if "objective" not in frame.columns:
        return empty
    val = single_epoch_runs(frame.filter(pl.col("split") == "val"))
    by = "group" if "group" in val.columns else "variant"
    ar = val.filter((pl.col("objective") == "ar") & (pl.col("metric") == "ar_nll"))
    mdm = val.filter((pl.col("objective") == "mdm") & (pl.col("metric") == "mdm_nelbo"))
    if ar.is_empty() or mdm.is_empty():
        return empty
    ar_groups = declared_order(ar, by)
    if ar_variant is not None and ar_variant not in ar_groups:
        raise ValueError(f"AR reference {ar_variant!r} is not a single-epoch AR {by}; choose one of {ar_groups}")
    ar_variant = ar_variant or ar_groups[0]
    reference = ar.filter(pl.col(by) == ar_variant)
    ar_curve = (_mean_curve(reference, by).filter(pl.col("tokens_seen") > 0)
                .select(pl.lit(ar_variant).alias("ar_variant"), pl.col("tokens_seen").alias("ar_tokens"),
                        pl.col("value").alias("ar_loss")))
    mdm_curve = _mean_curve(mdm, by).rename({by: "mdm_variant"})
    summary = mdm_curve.group_by("mdm_variant").agg(pl.col("value").min().alias("mdm_best_mean"),
                                                     pl.col("tokens_seen").max().alias("_last"))
    first = (mdm_curve.join(ar_curve, how="cross").filter(pl.col("value") <= pl.col("ar_loss"))
             .group_by("mdm_variant", "ar_tokens").agg(pl.col("tokens_seen").min().alias("mdm_tokens")))
    order = {name: i for i, name in enumerate(declared_order(mdm, by))}
    table = (summary.join(ar_curve, how="cross").join(first, on=["mdm_variant", "ar_tokens"], how="left")
             .with_columns(pl.col("mdm_tokens").is_not_null().alias("reached"),
                           (pl.col("mdm_tokens") / pl.col("ar_tokens")).alias("ratio"),
                           pl.col("mdm_variant").replace_strict(order, return_dtype=pl.Int64).alias("_o")))
    table = table.with_columns(pl.when(~pl.col("reached")).then(pl.col("_last")).alias("mdm_tokens_lower_bound"))
    return table.sort("_o", "ar_tokens").select(
        [pl.col(name).cast(dtype) for name, dtype in COMPUTE_GAP_SCHEMA.items()])
