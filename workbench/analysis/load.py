"""Loading a results folder into one tidy polars DataFrame: every run's metric rows joined with its config.

A run folder is any folder (outside ``checkpoints/`` and ``report/``) holding ``metrics.parquet``; its config
comes from the metrics file's metadata (``workbench.config``), else ``config.yaml``; ablation fields (variant,
group, repetition, seed, declared order, swept values) from ``variant.json`` when the ablation runner wrote one,
else from the folder and the config. A missing, half-written or corrupted metrics file gives a warning naming the
run and the run is left out of the frame; loading never fails because of one bad run. :func:`run_status` lists
every run folder (loaded or not) with its status and error line, so a report can say what it left out.

A run is identified by its folder (column ``run``: the folder relative to the loaded root), never by the config
``name`` (column ``run_name``): two folders trained from configs with the same name stay two runs.

The validation loss of a run (column ``val_metric``, used by every derived table when ``metric="val_loss"``)
is the metric of its objective: ``mdm_nelbo`` (the NELBO, an upper bound on the NLL) for MDM, ``ar_nll`` for AR,
prefix-LM and dual runs (dual models are compared as AR models; their ``mdm_nelbo`` rows stay available).
When a run lacks that metric, the other one is used. The papers compare exactly these two numbers.

Columns added per run (constant within a run): run_name, ablation, variant, group, repetition, seed, order, run_dir,
status, objective, val_metric, ar_fraction (dual), time_sampler (mdm/dual), token_masking (rate or max rate),
token_masking_replacement, dropout_mlp, dropout_attention, weight_decay, regularizer + strength (the single
active regularizer and its value; ``none``/0 for none, null strength for combinations), planned_epochs,
seq_len, n_layers, d_model, params, and ``sweep.<axis>`` for every swept ablation axis.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from workbench.durations import epoch_tokens, split_duration
from workbench.results import (
    CHECKPOINTS,
    CONFIG_FILE,
    METRICS_FILE,
    SCHEMA,
    VARIANT_FILE,
    read_json_object,
    read_metadata,
    read_metrics,
    read_summary,
)

RUN_COLUMNS = ["run_name", "ablation", "variant", "group", "repetition", "seed", "order", "run_dir", "status",
               "objective", "val_metric", "ar_fraction", "time_sampler", "token_masking", "token_masking_replacement",
               "dropout_mlp", "dropout_attention", "weight_decay", "regularizer", "strength", "planned_epochs",
               "seq_len", "n_layers", "d_model", "params"]
RUN_SCHEMA: dict[str, Any] = {
    "run_name": pl.String, "ablation": pl.String, "variant": pl.String, "group": pl.String, "repetition": pl.String,
    "seed": pl.Int64, "order": pl.Int64, "run_dir": pl.String, "status": pl.String, "objective": pl.String,
    "val_metric": pl.String,
    "ar_fraction": pl.Float64, "time_sampler": pl.String, "token_masking": pl.Float64,
    "token_masking_replacement": pl.String, "dropout_mlp": pl.Float64, "dropout_attention": pl.Float64,
    "weight_decay": pl.Float64, "regularizer": pl.String, "strength": pl.Float64, "planned_epochs": pl.Float64,
    "seq_len": pl.Int64, "n_layers": pl.Int64, "d_model": pl.Int64, "params": pl.Int64,
}
LOSS_METRICS = ("ar_nll", "mdm_nelbo")
SKIP_DIRS = {CHECKPOINTS, "report", ".ipynb_checkpoints"}


class ResultsWarning(UserWarning):
    """A run that could not be (fully) loaded; the rest of the results are still returned."""


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (or ``root`` itself): folders holding metrics.parquet, config.yaml or
    variant.json, outside checkpoints/ and report/ folders."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such results folder")
    found = []
    for path in sorted(root.rglob("*")):
        if path.name not in (METRICS_FILE, CONFIG_FILE, VARIANT_FILE) or SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        if path.parent not in found:
            found.append(path.parent)
    return sorted(found)


def _get(tree: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def planned_epochs_of(config: dict[str, Any]) -> float | None:
    """Epochs of the unique-token budget the config trains for (from trainer.max_duration); None when the config
    does not say."""
    seq_len = int(_get(config, "data.seq_len", 0) or 0)
    unique = int(_get(config, "data.unique_tokens", 0) or 0)
    if not seq_len or not unique:
        return None
    try:
        duration = split_duration(str(_get(config, "trainer.max_duration", "")))
        return duration.epochs(epoch_tokens(unique, seq_len), seq_len, int(_get(config, "data.batch_size", 1)))
    except ValueError:
        return None


def _sampler_name(sampler: dict[str, Any] | None) -> str | None:
    if not sampler:
        return None
    name = sampler.get("name")
    if name == "beta":
        return f"beta({sampler.get('a'):g},{sampler.get('b'):g})"
    if name in ("logit_normal", "truncated_normal"):
        return f"{name}({sampler.get('mu'):g},{sampler.get('sigma'):g})"
    return name


def regularizers_of(config: dict[str, Any]) -> dict[str, float | None]:
    """Active regularizers and their strengths: token_masking (rate), token_masking_max (U(0, max) rates),
    token_masking_sampled (rates from a time sampler: no single strength), dropout_<site>, weight_decay."""
    active: dict[str, float | None] = {}
    masking = _get(config, "algorithms.token_masking")
    if masking:
        if masking.get("rate") is not None:
            active["token_masking"] = float(masking["rate"])
        elif masking.get("max_rate") is not None:
            active["token_masking_max"] = float(masking["max_rate"])
        else:
            active["token_masking_sampled"] = None
    for site in ("mlp", "attention", "residual", "embedding"):
        value = _get(config, f"algorithms.dropout.{site}", 0.0)
        if value:
            active[f"dropout_{site}"] = float(value)
    decay = _get(config, "algorithms.weight_decay.value", 0.0) or _get(config, "optimizer.weight_decay", 0.0)
    if decay:
        active["weight_decay"] = float(decay)
    return active


def run_columns(config: dict[str, Any], record: dict[str, Any] | None, summary: dict[str, Any] | None,
                run_dir: Path, root: Path) -> dict[str, Any]:
    """The per-run columns (see the module docstring) from a run's config, variant.json and summary."""
    record = record or {}
    objective = _get(config, "objective.name", "ar")
    active = regularizers_of(config)
    if not active:
        regularizer, strength = "none", 0.0
    elif len(active) == 1:
        (regularizer, strength), = active.items()
    else:
        regularizer, strength = "+".join(sorted(active)), None
    relative = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    seed = record.get("seed", _get(config, "seed"))
    variant = record.get("variant")
    if variant is None:  # not from an ablation: the folder path, without a trailing seed<k>
        parts = [p for p in relative.split("/") if p and not re.fullmatch(r"seed\d+", p)]
        variant = "/".join(parts) or run_dir.name
    masking = _get(config, "algorithms.token_masking") or {}
    return {
        "run_name": (summary or {}).get("run") or record.get("run") or _get(config, "name"),
        "ablation": record.get("ablation", root.name),
        "variant": variant,
        "group": record.get("group", variant),
        "repetition": record.get("repetition"),
        "seed": seed,
        "order": record.get("index"),
        "run_dir": relative,
        "status": (summary or {}).get("status", "unknown"),
        "objective": objective,
        "val_metric": "mdm_nelbo" if objective == "mdm" else "ar_nll",
        "ar_fraction": _get(config, "objective.dual.ar_fraction") if objective == "dual" else
        (1.0 if objective in ("ar", "prefix_lm") else 0.0),
        "time_sampler": _sampler_name(_get(config, "objective.diffusion.time_sampler")),
        "token_masking": masking.get("rate", masking.get("max_rate")) if masking else None,
        "token_masking_replacement": masking.get("replacement") if masking else None,
        "dropout_mlp": _get(config, "algorithms.dropout.mlp", 0.0),
        "dropout_attention": _get(config, "algorithms.dropout.attention", 0.0),
        "weight_decay": active.get("weight_decay", 0.0),
        "regularizer": regularizer,
        "strength": strength,
        "planned_epochs": planned_epochs_of(config),
        "seq_len": _get(config, "data.seq_len"),
        "n_layers": _get(config, "model.n_layers"),
        "d_model": _get(config, "model.d_model"),
        "params": (summary or {}).get("params"),
    }


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config: the metrics file's metadata, else config.yaml; None when neither is readable."""
    config: Any = None
    try:
        config = read_metadata(run_dir / METRICS_FILE).get("config")
    except Exception:  # metadata is optional (and the file may be missing or truncated): fall back to config.yaml
        config = None
    if not config and (run_dir / CONFIG_FILE).is_file():
        try:
            config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            config = None
    return config if isinstance(config, dict) else None


def load_run_rows(run_dir: Path, root: Path) -> pl.DataFrame | None:
    """One run's rows with its run columns, or None (with a ResultsWarning naming the run) when unreadable."""
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        warnings.warn(f"run {name}: no {METRICS_FILE} yet (not started, or killed before its first evaluation); "
                      "left out", ResultsWarning, stacklevel=3)
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = read_metrics(metrics_path)
    if frame is None:
        reason = "; ".join(str(w.message) for w in caught) or "unreadable"
        warnings.warn(f"run {name}: metrics file could not be read, run left out ({reason})", ResultsWarning,
                      stacklevel=3)
        return None
    config = _read_config(run_dir)
    if config is None:
        warnings.warn(f"run {name}: no readable config (metrics metadata or {CONFIG_FILE}); config columns are "
                      "empty", ResultsWarning, stacklevel=3)
        config = {}
    record = read_json_object(run_dir / VARIANT_FILE)
    columns = run_columns(config, record, read_summary(run_dir), run_dir, root)
    available = set(frame.filter(pl.col("split") == "val")["metric"].unique().to_list())
    if columns["val_metric"] not in available:
        other = next((m for m in LOSS_METRICS if m in available), None)
        columns["val_metric"] = other or columns["val_metric"]
    frame = frame.unique(subset=["step", "split", "metric"], keep="last", maintain_order=True)
    if columns["run_name"] is None and frame.height:
        columns["run_name"] = frame["run"][0]
    # the folder, not the config name, identifies the run: equal names in two folders stay two runs
    out = frame.with_columns(pl.lit(columns["run_dir"], dtype=pl.String).alias("run"),
                             *(pl.lit(columns[c], dtype=RUN_SCHEMA[c]).alias(c) for c in RUN_COLUMNS))
    for axis, value in ((record or {}).get("swept") or {}).items():
        out = out.with_columns(pl.lit(value if isinstance(value, int | float | str | bool) else str(value))
                               .alias(f"sweep.{axis}"))
    return out


def _align(frames: list[pl.DataFrame]) -> list[pl.DataFrame]:
    """Give every frame the same sweep columns, numeric where all values are numbers, else strings."""
    sweep = sorted({c for f in frames for c in f.columns if c.startswith("sweep.")})
    dtypes: dict[str, Any] = {}
    for column in sweep:
        kinds = {f.schema[column] for f in frames if column in f.columns}
        dtypes[column] = pl.Float64 if all(k.is_numeric() for k in kinds) else pl.String
    out = []
    for frame in frames:
        frame = frame.with_columns(*(pl.col(c).cast(dtypes[c]) if c in frame.columns else
                                     pl.lit(None, dtype=dtypes[c]).alias(c) for c in sweep))
        out.append(frame.select([*RUN_COLUMNS, *SCHEMA, *sweep]))
    return out


def load_results(root: str | Path) -> pl.DataFrame:
    """Every run under ``root`` as one tidy frame (metric rows + run columns, see the module docstring).

    When ``root`` holds several ablations (e.g. ``results/``), variant and group names are prefixed with
    ``<ablation>/`` so equal variant names of different ablations stay apart.

    Runs without a readable metrics file are left out with a :class:`ResultsWarning`; raises
    FileNotFoundError when ``root`` holds no readable run at all."""
    root = Path(root)
    frames = [f for f in (load_run_rows(run_dir, root) for run_dir in find_runs(root)) if f is not None]
    if not frames:
        raise FileNotFoundError(f"{root}: no readable runs (no metrics.parquet below it)")
    frame = pl.concat(_align(frames), how="vertical")
    if frame["ablation"].n_unique() > 1:  # several ablations (e.g. results/): keep their variants apart
        frame = frame.with_columns(*(pl.concat_str([pl.col("ablation"), pl.lit("/"), pl.col(c)]).alias(c)
                                     for c in ("variant", "group")))
    order = (frame.group_by("variant").agg(pl.col("order").min().alias("_o")).sort(["_o", "variant"], nulls_last=True)
             .with_row_index("_rank").select("variant", "_rank"))
    frame = frame.join(order, on="variant").with_columns(pl.col("_rank").cast(pl.Int64).alias("order")).drop("_rank")
    return frame.sort(["order", "seed", "step", "split", "metric"], nulls_last=True)


def run_table(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per run with its run columns (and sweep columns)."""
    columns = [c for c in [*RUN_COLUMNS, *[c for c in frame.columns if c.startswith("sweep.")]] if c in frame.columns]
    return frame.group_by("run", maintain_order=True).agg(pl.col(c).first() for c in columns)


STATUS_SCHEMA: dict[str, Any] = {"run": pl.String, "run_name": pl.String, "variant": pl.String, "seed": pl.Int64,
                                 "status": pl.String, "val_evals": pl.Int64, "error": pl.String}


def run_status(root: str | Path, frame: pl.DataFrame | None = None, metric: str = "val_loss") -> pl.DataFrame:
    """Every run folder under ``root``, loaded or not: run (folder), run_name, variant, seed, status, val_evals,
    error (its first line).

    ``status`` is summary.json's (complete, running -- also what a killed run says --, resuming, failed, pruned;
    ``unknown`` without a summary), or ``no metrics`` / ``unreadable metrics`` for a run :func:`load_results`
    left out. ``val_evals`` counts the evaluations of ``metric`` (``val_loss``: the run's own validation metric)
    in ``frame``: a run with none has no row in the derived tables. A report lists every run that is not complete
    or has no evaluation, so none is dropped silently."""
    root = Path(root)
    loaded = run_table(frame) if frame is not None else None
    evals: dict[str, int] = {}
    if frame is not None:
        wanted = pl.col("val_metric") if metric == "val_loss" else pl.lit(metric)
        counts = frame.filter((pl.col("split") == "val") & (pl.col("metric") == wanted)).group_by("run").len()
        evals = dict(counts.iter_rows())
    rows = []
    for run_dir in find_runs(root):
        relative = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        summary = read_summary(run_dir) or {}
        error = str(summary.get("error") or "").strip().splitlines()
        if loaded is not None and relative in loaded["run"].to_list():
            known = loaded.filter(pl.col("run") == relative).row(0, named=True)
            status = known["status"]
            variant, seed, name = known["variant"], known["seed"], known["run_name"]
        else:
            columns = run_columns(_read_config(run_dir) or {}, read_json_object(run_dir / VARIANT_FILE), summary,
                                  run_dir, root)
            variant, seed, name = columns["variant"], columns["seed"], columns["run_name"]
            if loaded is not None and loaded["ablation"].n_unique() > 1:  # as load_results names them
                variant = f"{columns['ablation']}/{variant}"
            if (run_dir / METRICS_FILE).is_file():
                status, reason = "unreadable metrics", f"{METRICS_FILE} could not be read (half-written or corrupted)"
            else:
                status, reason = "no metrics", f"no {METRICS_FILE} (not started, or killed before its first write)"
            status = f"{summary['status']}, {status}" if summary.get("status") else status
            error = error or [reason]
        rows.append({"run": relative, "run_name": name, "variant": variant, "seed": seed, "status": status,
                     "val_evals": evals.get(relative, 0), "error": error[0][:200] if error else None})
    table = pl.DataFrame(rows, schema=STATUS_SCHEMA, orient="row")
    if loaded is None:
        return table
    order = loaded.select("variant", "order").unique("variant")  # declared order; runs not loaded go last
    return table.join(order, on="variant", how="left").sort(["order", "seed", "run"], nulls_last=True).drop("order")
