"""``workbench tune --summary``: trial counts, best trials or the Pareto front, parameter importances,
trials.csv and seaborn figures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import ConfigError
from workbench.tune.study import safe_url

if TYPE_CHECKING:
    import optuna

    from workbench.tune.spec import StudySpec


def summarize(spec: StudySpec, storage: optuna.storages.RDBStorage, url: str) -> int:
    """Best trials, parameter importances, trials.csv and figures of the study."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        raise ConfigError(spec.source, "name", f"no study {spec.name!r} in {safe_url(url)} yet") from None
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    print(f"study {spec.name} ({safe_url(url)}): {len(trials)} trials: "
          + ", ".join(f"{count} {name}" for name, count in states.items() if count))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print("no completed trials yet")
    elif len(spec.objectives) == 1:
        sign = 1 if spec.directions[0] == "minimize" else -1
        best = sorted(complete, key=lambda t: sign * t.value)[:5]
        print(f"best trials by {spec.objectives[0].name} ({spec.directions[0]}):")
        for t in best:
            print(f"  trial {t.number}: {t.value:.4f}  {json.dumps(t.params)}  {', '.join(t.user_attrs['run_dirs'])}")
    else:
        print("Pareto front (" + ", ".join(f"{o.name} {o.direction}" for o in spec.objectives) + "):")
        for t in sorted(study.best_trials, key=lambda t: t.number):
            print(f"  trial {t.number}: " + ", ".join(f"{v:.4f}" for v in t.values) + f"  {json.dumps(t.params)}")
    _print_importances(spec, study, complete)
    frame = _trials_frame(spec, trials)
    spec.results.mkdir(parents=True, exist_ok=True)
    frame.write_csv(spec.results / "trials.csv")
    figures = _plot(spec, frame)
    print(f"wrote {spec.results / 'trials.csv'} and {len(figures)} figures in {spec.results / 'figures'}")
    print(f"dashboard: optuna-dashboard {safe_url(url)}")
    return 0


def _print_importances(spec: StudySpec, study: optuna.Study, complete: list) -> None:
    import optuna

    if len(complete) < 2 or not spec.params:
        print("parameter importances: need at least 2 completed trials")
        return
    for i, objective in enumerate(spec.objectives):
        target = (lambda t, i=i: t.values[i]) if len(spec.objectives) > 1 else None
        method = "fANOVA"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    scores = optuna.importance.get_param_importances(
                        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target)
                except ImportError:  # fANOVA's random forest is scikit-learn's
                    method = "PED-ANOVA (fANOVA needs scikit-learn)"
                    scores = optuna.importance.get_param_importances(
                        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target)
        except (RuntimeError, ValueError) as err:
            print(f"parameter importances for {objective.name}: unavailable ({err})")
            continue
        print(f"parameter importances for {objective.name} ({method}):")
        for name, score in scores.items():
            print(f"  {name}: {score:.3f}")


def _trials_frame(spec: StudySpec, trials: list) -> Any:
    import polars as pl

    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(),
                               "retry_of": t.system_attrs.get("failed_trial")}
        for i, objective in enumerate(spec.objectives):
            row[objective.name] = t.values[i] if t.values is not None else None
        for param in spec.params:
            value = t.params.get(param.path)
            row[param.path] = None if value is None else str(value) if param.kind == "categorical" else float(value)
        row["run_dirs"] = ";".join(t.user_attrs.get("run_dirs", []))
        row["worker"] = t.user_attrs.get("worker")
        row["error"] = t.user_attrs.get("error")
        rows.append(row)
    schema = {"trial": pl.Int64, "state": pl.String, "retry_of": pl.Int64,
              **{o.name: pl.Float64 for o in spec.objectives},
              **{p.path: pl.String if p.kind == "categorical" else pl.Float64 for p in spec.params},
              "run_dirs": pl.String, "worker": pl.String, "error": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _plot(spec: StudySpec, frame: Any) -> list[Path]:
    """Optimisation history and objective vs. each parameter (pruned trials at their last reported value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl
    import seaborn as sns

    out_dir = spec.results / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = "pruned (last evaluation)"
    shown = frame.filter(pl.col("state").is_in(["complete", "pruned"])).with_columns(
        pl.col("state").replace("pruned", pruned))
    palette = {"complete": "tab:blue", pruned: "tab:orange"}
    written = []
    columns = len(spec.objectives)
    fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), squeeze=False)
    for ax, objective in zip(axes[0], spec.objectives):
        data = shown.select("trial", "state", pl.col(objective.name).alias("value")).drop_nulls("value").to_pandas()
        if len(data):
            sns.scatterplot(data=data, x="trial", y="value", hue="state", palette=palette, ax=ax)
            done = data[data["state"] == "complete"].sort_values("trial")
            if len(done):
                best = done["value"].cummin() if objective.direction == "minimize" else done["value"].cummax()
                ax.step(done["trial"], best, where="post", color="black", label="best so far")
                ax.legend()
        ax.set(xlabel="trial", ylabel=objective.name, title=f"{spec.name}: optimisation history")
    fig.tight_layout()
    fig.savefig(out_dir / "history.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "history.png")
    for param in spec.params:
        fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), squeeze=False)
        for ax, objective in zip(axes[0], spec.objectives):
            data = shown.select("state", pl.col(param.path).alias("x"), pl.col(objective.name).alias("value"))
            data = data.drop_nulls().to_pandas()
            if len(data):
                if param.kind == "categorical":
                    sns.stripplot(data=data, x="x", y="value", hue="state", palette=palette, ax=ax)
                else:
                    sns.scatterplot(data=data, x="x", y="value", hue="state", palette=palette, ax=ax)
                    if param.log:
                        ax.set_xscale("log")
            ax.set(xlabel=param.path, ylabel=objective.name)
        fig.suptitle(f"{spec.name}: {objective.name if columns == 1 else 'objectives'} vs. {param.path}")
        fig.tight_layout()
        path = out_dir / f"param-{param.path.replace('.', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
