"""Derived tables on hand-made frames with known answers; loading, figures and the report on the shared smoke
ablation (tests/ablation_smoke.py), including a results folder with a corrupted metrics file."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
from ablation_smoke import smoke_results

from workbench.analysis import (
    ResultsWarning,
    alpha_repetition_heatmap,
    best_validation,
    best_vs_strength,
    downstream_accuracy,
    downstream_curves,
    load_results,
    overfitting_onset,
    save,
    seed_summary,
    speedup,
    tokens_to_target,
    validation_curves,
    with_val_metric,
)
from workbench.analysis.report import to_markdown, write_report
from workbench.results import SCHEMA

UNIQUE = 1000


def rows(run: str, metric: str, values: list[float], split: str = "val", **columns) -> list[dict]:
    """Evaluations at epochs 1, 2, ... of a 1000-unique-token budget (100 steps per epoch)."""
    out = []
    for i, value in enumerate(values, 1):
        out.append({"run": run, "step": 100 * i, "epoch": float(i), "tokens_seen": UNIQUE * i, "unique_tokens": UNIQUE,
                    "split": split, "metric": metric, "value": float(value), "wall_time": float(i), **columns})
    return out


def frame(*groups: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([row for group in groups for row in group], infer_schema_length=None).with_columns(
        pl.col("step").cast(pl.Int64), pl.col("tokens_seen").cast(pl.Int64))


def run_rows(run, variant, seed, objective, metric, values, **extra):
    return rows(run, metric, values, variant=variant, seed=seed, objective=objective, **extra)


CURVE = [5.0, 4.0, 3.5, 3.7, 3.9]  # best 3.5 at epoch 3, rising after it


def test_best_validation_finds_minimum_and_final():
    df = frame(run_rows("a", "A", 0, "ar", "ar_nll", CURVE), run_rows("b", "B", 0, "mdm", "mdm_nelbo", [6, 5, 4.5]),
               rows("a", "ar_ppl", [100, 50, 30, 40, 45], variant="A", seed=0, objective="ar"))
    best = best_validation(df).sort("run")
    assert best["metric"].to_list() == ["ar_nll", "mdm_nelbo"]
    assert best["best"].to_list() == [3.5, 4.5]
    assert best["best_epoch"].to_list() == [3.0, 3.0] and best["best_tokens"].to_list() == [3000, 3000]
    assert best["final"].to_list() == [3.9, 4.5] and best["final_epoch"].to_list() == [5.0, 3.0]
    assert best["final_minus_best"].to_list() == pytest.approx([0.4, 0.0])
    assert best["evals"].to_list() == [5, 3]
    # an explicit metric ignores the per-run choice
    assert best_validation(df, "mdm_nelbo")["run"].to_list() == ["b"]


def test_validation_metric_follows_the_objective():
    df = frame(run_rows("ar", "A", 0, "ar", "ar_nll", [3]),
               run_rows("mdm", "M", 0, "mdm", "mdm_nelbo", [4]),
               run_rows("dual", "D", 0, "dual", "ar_nll", [5]), run_rows("dual", "D", 0, "dual", "mdm_nelbo", [6]),
               run_rows("mdm-with-ar", "M2", 0, "mdm", "ar_nll", [7]), run_rows("mdm-with-ar", "M2", 0, "mdm",
                                                                                "mdm_nelbo", [8]))
    chosen = dict(with_val_metric(df).select("run", "val_metric").unique().iter_rows())
    assert chosen == {"ar": "ar_nll", "mdm": "mdm_nelbo", "dual": "ar_nll", "mdm-with-ar": "mdm_nelbo"}
    unknown = frame(rows("x", "mdm_nelbo", [1.0], variant="X", seed=0))  # no objective column: what it has
    assert with_val_metric(unknown)["val_metric"].to_list() == ["mdm_nelbo"]
    assert dict(best_validation(df).select("run", "best").iter_rows()) == {"ar": 3, "mdm": 4, "dual": 5,
                                                                            "mdm-with-ar": 8}


@pytest.mark.parametrize(("tolerance", "onset"), [(0.0, 4.0), (0.1, 4.0), (0.3, 5.0), (0.5, None)])
def test_overfitting_onset_is_the_first_rise_above_the_running_minimum(tolerance, onset):
    df = frame(run_rows("a", "A", 0, "ar", "ar_nll", CURVE))
    table = overfitting_onset(df, tolerance=tolerance)
    assert table["onset_epoch"].to_list() == [onset]
    assert table["overfit"].to_list() == [onset is not None]
    assert table["onset_tokens"].to_list() == [None if onset is None else int(onset * UNIQUE)]
    if onset is not None:
        assert table["min_before_onset"].to_list() == [3.5]


def test_overfitting_onset_ignores_noise_within_tolerance_and_never_rising_runs():
    df = frame(run_rows("noisy", "N", 0, "ar", "ar_nll", [4.0, 3.0, 3.005, 2.9, 2.905]),
               run_rows("mono", "M", 0, "mdm", "mdm_nelbo", [6.0, 5.0, 4.0]),
               run_rows("late", "L", 0, "ar", "ar_nll", [4.0, 3.0, 3.005, 3.02, 2.0]))
    table = dict(overfitting_onset(df, tolerance=0.01).select("run", "onset_epoch").iter_rows())
    assert table == {"noisy": None, "mono": None, "late": 4.0}  # 3.02 - 3.0 > 0.01; a later recovery still counts
    with pytest.raises(ValueError, match="tolerance"):
        overfitting_onset(df, tolerance=-1)


def test_tokens_to_target_and_speedup():
    df = frame(run_rows("a0", "A", 0, "ar", "ar_nll", CURVE),
               run_rows("a1", "A", 1, "ar", "ar_nll", [5, 4.5, 4, 3.9, 3.7]),
               run_rows("b0", "B", 0, "ar", "ar_nll", [4.5, 3.0]), run_rows("c0", "C", 0, "ar", "ar_nll", [6, 5]))
    table = tokens_to_target(df, 3.8).sort("run")
    assert table["reached"].to_list() == [True, True, True, False]
    assert table["tokens"].to_list() == [3000, 5000, 2000, None]
    assert table["epoch"].to_list() == [3.0, 5.0, 2.0, None]
    interpolated = tokens_to_target(df, 3.8, interpolate=True).sort("run")
    # a0: between (2000, 4.0) and (3000, 3.5): 40% of the way; b0: between (1000, 4.5) and (2000, 3.0)
    assert interpolated["tokens"].to_list()[:3] == pytest.approx([2400, 4500, 1000 + 1000 * 0.7 / 1.5])
    assert interpolated["epoch"][0] == pytest.approx(2.4)
    first = tokens_to_target(df, 5.5, interpolate=True).filter(pl.col("run") == "a0")
    assert first["tokens"].to_list() == [1000]  # reached at the first evaluation: nothing to interpolate from
    ratio = speedup(table, baseline="A").sort("variant")
    assert ratio["tokens_mean"].to_list() == [4000, 2000, None]
    assert ratio["speedup"].to_list() == [1.0, 2.0, None]
    assert ratio["seeds_reached"].to_list() == [2, 1, 0]
    with pytest.raises(ValueError, match="baseline 'Z'"):
        speedup(table, baseline="Z")
    accuracy = frame(rows("a0", "acc", [0.2, 0.3, 0.5], split="piqa", variant="A", seed=0))
    assert tokens_to_target(accuracy, 0.3, metric="acc", direction="above")["tokens"].to_list() == [2000]


def test_downstream_accuracy_per_task_and_average():
    meta = {"variant": "A", "seed": 0, "objective": "ar"}
    df = frame(run_rows("a", "A", 0, "ar", "ar_nll", [4, 3, 2]),
               rows("a", "acc", [0.25, 0.30, 0.28], split="hellaswag", **meta),
               rows("a", "acc_norm", [0.26, 0.27, 0.29], split="hellaswag", **meta),
               rows("a", "stderr", [0.01, 0.01, 0.01], split="hellaswag", **meta),
               rows("a", "acc", [0.50, 0.55, 0.60], split="piqa", **meta),
               rows("a", "acc_norm", [0.52, 0.50, 0.51], split="piqa", **meta),
               rows("a", "acc", [0.5, 0.5, 0.5], split="winogrande", **meta))  # schema tasks have no acc_norm
    table = downstream_accuracy(df).sort("task")
    assert table["task"].to_list() == ["average", "hellaswag", "piqa", "winogrande"]
    by_task = {row["task"]: row for row in table.iter_rows(named=True)}
    assert by_task["hellaswag"]["final_acc"] == 0.28 and by_task["hellaswag"]["best_acc"] == 0.30
    assert by_task["hellaswag"]["best_epoch_acc"] == 2.0 and by_task["piqa"]["best_acc_norm"] == 0.52
    assert by_task["piqa"]["best_epoch_acc_norm"] == 1.0
    assert by_task["winogrande"]["final_acc_norm"] is None
    # the average is taken per evaluation over the tasks reporting the metric, then its final and best
    assert by_task["average"]["final_acc"] == pytest.approx(0.46)
    assert by_task["average"]["best_acc"] == pytest.approx(0.46)
    assert by_task["average"]["final_acc_norm"] == pytest.approx(0.40)
    assert by_task["average"]["best_acc_norm"] == pytest.approx(0.40) and by_task["average"]["best_epoch_acc_norm"] == 3
    assert downstream_accuracy(frame(run_rows("a", "A", 0, "ar", "ar_nll", [4]))).is_empty()


def test_seed_summary_mean_and_spread():
    table = pl.DataFrame({"variant": ["A", "A", "A", "B"], "best": [1.0, 2.0, 3.0, 5.0],
                          "onset_epoch": [2.0, None, 4.0, None]})
    summary = seed_summary(table, ["best", "onset_epoch"]).sort("variant")
    a, b = summary.row(0, named=True), summary.row(1, named=True)
    assert (a["seeds"], a["best_mean"], a["best_std"], a["best_min"], a["best_max"]) == (3, 2.0, 1.0, 1.0, 3.0)
    assert a["onset_epoch_mean"] == 3.0  # runs that never overfit do not count
    assert (b["seeds"], b["best_mean"], b["best_std"]) == (1, 5.0, None)


def test_figures_on_hand_made_dual_and_downstream_frames(tmp_path):
    groups = []
    for alpha in (0.0, 0.5, 1.0):
        for epochs, rep in ((1, "u4k-ep1"), (4, "u1k-ep4")):
            run = f"a{alpha}-{rep}"
            extra = {"variant": run, "group": f"alpha{alpha:g}", "repetition": rep, "seed": 0, "objective": "dual",
                     "ar_fraction": alpha, "planned_epochs": float(epochs), "order": 0}
            groups.append(rows(run, "ar_nll", [5 - alpha, 4.5 - alpha / epochs], **extra))
            groups.append(rows(run, "mdm_nelbo", [5.5, 5 + alpha / 2], **extra))
            groups.append(rows(run, "unigram_entropy", [6.0], **extra))
            groups.append(rows(run, "acc", [0.3, 0.3 + alpha / 10], split="piqa", **extra))
    df = frame(*groups)
    heatmap = alpha_repetition_heatmap(df)
    assert heatmap is not None and len(heatmap.axes) == 4  # two heatmaps and their colour bars
    assert downstream_curves(df) is not None
    curves = validation_curves(df)
    assert _has_baseline(curves, 6.0)
    assert len(curves.axes) == 2  # one panel per repetition point
    paths = save(curves, tmp_path, "curves")
    assert [p.name for p in paths] == ["curves.png", "curves.svg"] and all(p.stat().st_size > 1000 for p in paths)
    assert best_vs_strength(df) is None  # no regularizers here


def _has_baseline(fig, entropy: float) -> bool:
    """A horizontal line at the unigram entropy in every panel."""
    return all(any(len(set(line.get_ydata())) == 1 and abs(line.get_ydata()[0] - entropy) < 1e-9
                   for line in ax.get_lines()) for ax in fig.axes)


# --------------------------------------------------------------------------------------------------------------
# on the smoke ablation


@pytest.fixture(scope="module")
def smoke_root():
    return smoke_results()[0]


@pytest.mark.slow
def test_load_results_joins_metrics_with_configs(smoke_root):
    df = load_results(smoke_root)
    assert list(SCHEMA) == [c for c in df.columns if c in SCHEMA]
    runs = df.group_by("variant", maintain_order=True).agg(
        pl.col("objective").first(), pl.col("val_metric").first(), pl.col("regularizer").first(),
        pl.col("strength").first(), pl.col("seed").first(), pl.col("order").first(), pl.col("ablation").first(),
        pl.col("status").first(), pl.col("planned_epochs").first())
    assert runs["variant"].to_list() == ["ar", "mask", "mdm"]  # declared order
    assert runs["objective"].to_list() == ["ar", "ar", "mdm"]
    assert runs["val_metric"].to_list() == ["ar_nll", "ar_nll", "mdm_nelbo"]
    assert runs["regularizer"].to_list() == ["none", "token_masking", "none"]
    assert runs["strength"].to_list()[1] > 0 and runs["order"].to_list() == [0, 1, 2]
    assert set(runs["ablation"]) == {"demo"} and set(runs["status"]) == {"complete"}
    assert set(runs["seed"]) == {0} and set(runs["planned_epochs"]) == {3.0}
    assert df.filter(pl.col("metric") == "unigram_entropy").height == 3
    best = best_validation(df)
    assert best.height == 3 and best["best_epoch"].max() <= 3.0


@pytest.mark.slow
def test_corrupted_metrics_file_is_skipped_with_a_warning_naming_the_run(smoke_root, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(smoke_root, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    path = copy / "mask" / "seed0" / "metrics.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a half-written file
    (copy / "extra" / "seed0").mkdir(parents=True)
    (copy / "extra" / "seed0" / "config.yaml").write_text("name: started-but-no-metrics\n")
    with pytest.warns(ResultsWarning) as caught:
        df = load_results(copy)
    messages = " | ".join(str(w.message) for w in caught)
    assert "run mask/seed0: metrics file could not be read" in messages and "run extra/seed0: no metrics" in messages
    assert sorted(df["variant"].unique()) == ["ar", "mdm"]
    with pytest.warns(ResultsWarning):
        report = write_report(copy, draw=False)
    assert report.headline["variant"].to_list() == ["ar", "mdm"]

    # a folder of several ablations keeps equal variant names of different ablations apart
    other = tmp_path / "all"
    shutil.copytree(copy, other / "demo")
    shutil.copytree(smoke_root / "ar", other / "other" / "ar", ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((other / "other" / "ar" / "seed0" / "variant.json").read_text())
    (other / "other" / "ar" / "seed0" / "variant.json").write_text(json.dumps({**record, "ablation": "other"}))
    with pytest.warns(ResultsWarning):
        both = load_results(other)
    assert sorted(both["variant"].unique()) == ["demo/ar", "demo/mdm", "other/ar"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable runs"):
        load_results(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such results folder"):
        load_results(tmp_path / "missing")


@pytest.mark.slow
def test_report_writes_tables_and_figures(smoke_root, tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "report"
    assert main(["report", str(smoke_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| variant | objective | metric | seeds | best |")
    assert "| mdm | mdm | mdm_nelbo |" in printed
    for name in ("headline", "best_loss", "overfitting", "tokens_to_target", "speedup", "seeds"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").read_text().startswith("| ")
    for name in ("val_loss_vs_epoch", "val_loss_vs_tokens", "best_loss_vs_strength"):
        assert (out / f"{name}.png").stat().st_size > 5000 and (out / f"{name}.svg").is_file()
    assert not (out / "alpha_repetition_heatmap.png").exists()  # no dual-ratio axis in this ablation
    downstream = pl.read_csv(out / "downstream.csv")  # the demo evaluates PIQA and ARC-Easy at the end
    assert set(downstream["task"]) == {"piqa", "arc_easy", "average"} and set(downstream["variant"]) == {"ar", "mask",
                                                                                                       "mdm"}
    assert downstream["final_acc"].is_between(0, 1).all() and (out / "downstream_acc_vs_epoch.png").is_file()
    index = (out / "report.md").read_text()
    assert "![val_loss_vs_epoch](val_loss_vs_epoch.png)" in index and "Unigram entropy" in index
    headline = pl.read_csv(out / "headline.csv")
    assert headline["variant"].to_list() == ["ar", "mask", "mdm"]
    best = pl.read_csv(out / "best_loss.csv")
    assert headline["best"].to_list() == pytest.approx(best["best"].to_list())
    speed = pl.read_csv(out / "speedup.csv")
    assert speed.filter(pl.col("variant") == "ar")["speedup"].to_list() == [1.0]
    assert pl.read_csv(out / "tokens_to_target.csv")["reached"].all()  # the default target every run reaches

    df = load_results(smoke_root)
    entropy = df.filter(pl.col("metric") == "unigram_entropy")["value"][0]
    assert _has_baseline(validation_curves(df), entropy)
    strength = best_vs_strength(df)
    assert strength is not None and _has_baseline(strength, entropy)
    assert to_markdown(pl.DataFrame({"a": [1.23456, None], "b": ["x", "y"]})) == "| a | b |\n| --- | --- |\n" \
        "| 1.2346 | x |\n|  | y |"


# --------------------------------------------------------------------------------------------------------------
# hand-built run folders written through workbench.results (what train writes): report semantics


def write_run(root, folder: str, curves: dict[str, list[float]], overrides: dict | None = None,
              status: str | None = "complete", error: str | None = None, split: str = "val"):
    """A run folder: metrics.parquet (one evaluation per epoch of a 1000-token budget), config.yaml, summary."""
    from conftest import make_config

    from workbench.config import dump_config
    from workbench.results import CONFIG_FILE, MetricsWriter, write_summary

    config = make_config(overrides)
    run_dir = root / folder
    writer = MetricsWriter(run_dir, {"config": config.to_dict()})
    for metric, values in curves.items():
        for i, value in enumerate(values, 1):
            writer.add(run=config.name, step=100 * i, epoch=float(i), tokens_seen=UNIQUE * i, unique_tokens=UNIQUE,
                       split=split, metric=metric, value=float(value), wall_time=float(i))
    writer.flush()
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    if status is not None:
        write_summary(run_dir, run=config.name, status=status, **({"error": error} if error else {}))
    return run_dir


MDM = {"objective": {"name": "mdm"}}


@pytest.fixture
def mixed_root(tmp_path):
    """AR and AR + masking (ar_nll) and MDM (mdm_nelbo, far above both AR curves)."""
    root = tmp_path / "mixed"
    write_run(root, "ar/seed0", {"ar_nll": [5.0, 4.0, 3.5, 3.7]}, {"name": "mixed-ar-seed0"})
    write_run(root, "mask/seed0", {"ar_nll": [5.0, 4.5, 3.8, 3.6]}, {"name": "mixed-mask-seed0"})
    write_run(root, "mdm/seed0", {"mdm_nelbo": [7.0, 6.5, 6.2, 6.0]}, {"name": "mixed-mdm-seed0", **MDM})
    return root


def test_targets_and_speedups_never_cross_metrics(mixed_root, tmp_path):
    """Before: one target (the largest best loss of all runs: the MDM NELBO, 6.0) for every run, so AR runs
    'reached' it at their first evaluation and MDM got a speed-up of 0.25 against an AR baseline."""
    report = write_report(mixed_root, tmp_path / "out", draw=False)
    reach = {row["variant"]: row for row in report.tables["tokens_to_target"].iter_rows(named=True)}
    assert {v: (r["target"], r["tokens"]) for v, r in reach.items()} == {
        "ar": (3.6, 3000), "mask": (3.6, 4000), "mdm": (6.0, 4000)}
    assert report.targets == {"ar_nll": 3.6, "mdm_nelbo": 6.0}
    headline = {row["variant"]: row for row in report.headline.iter_rows(named=True)}
    assert headline["ar"]["speedup"] == 1.0 and headline["mask"]["speedup"] == pytest.approx(0.75)
    assert headline["ar"]["baseline"] == headline["mask"]["baseline"] == "ar"
    assert headline["mdm"]["speedup"] is None and headline["mdm"]["baseline"] is None  # nothing of its kind
    index = (report.out_dir / "report.md").read_text()
    assert "ar_nll: target 3.6000, speed-up relative to `ar`" in index and "mdm_nelbo: target 6.0000, no speed-up" \
        in index

    # a baseline of one metric gives no speed-up to another; one bare number is no target for both
    frame = load_results(mixed_root)
    with pytest.raises(ValueError, match="different quantities"):
        tokens_to_target(frame, 5.0)
    ratio = speedup(tokens_to_target(frame, {"ar_nll": 4.0, "mdm_nelbo": 6.5}), baseline="mask")
    assert dict(ratio.select("variant", "speedup").iter_rows()) == {"ar": 1.5, "mask": 1.0, "mdm": None}
    assert dict(ratio.select("variant", "target").iter_rows()) == {"ar": 4.0, "mask": 4.0, "mdm": 6.5}


def test_report_cli_targets_per_metric(mixed_root, tmp_path, capsys):
    from workbench.cli import main

    assert main(["report", str(mixed_root), "--out", str(tmp_path / "a"), "--no-figures", "--target", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --target 5 is one number") and "ar_nll, mdm_nelbo" in err and "\n" not in err
    assert main(["report", str(mixed_root), "--out", str(tmp_path / "b"), "--no-figures", "--target",
                 "ar_nll=4.0", "--baseline", "mask"]) == 0
    reach = pl.read_csv(tmp_path / "b" / "tokens_to_target.csv")
    assert dict(reach.select("variant", "tokens").iter_rows()) == {"ar": 2000, "mask": 3000, "mdm": 4000}
    speed = pl.read_csv(tmp_path / "b" / "speedup.csv")
    assert dict(speed.select("variant", "speedup").iter_rows()) == {"ar": 1.5, "mask": 1.0, "mdm": None}
    assert main(["report", str(mixed_root), "--out", str(tmp_path / "c"), "--no-figures", "--baseline", "zz"]) == 2
    assert "--baseline 'zz' is not a variant" in capsys.readouterr().err


def test_runs_are_identified_by_their_folder_not_the_config_name(tmp_path):
    """Two folders trained from configs with the same name (here the default, ``run``) stay two runs; before,
    they merged (headline seeds 4 for one run each, a tokens-to-target averaged over both)."""
    root = tmp_path / "same-name"
    write_run(root, "a", {"ar_nll": [4.0, 3.0, 3.5]}, {"name": "run"})
    write_run(root, "b", {"ar_nll": [5.0, 4.0, 3.2]}, {"name": "run"})
    report = write_report(root, tmp_path / "out", draw=False)
    headline = report.headline.sort("variant")
    assert headline["variant"].to_list() == ["a", "b"] and headline["seeds"].to_list() == [1, 1]
    assert headline["best"].to_list() == [3.0, 3.2] and headline["tokens_to_target"].to_list() == [2000, 3000]
    assert report.tables["best_loss"].height == 2
    frame = load_results(root)
    assert sorted(frame["run"].unique()) == ["a", "b"] and set(frame["run_name"]) == {"run"}


def test_failed_and_incomplete_runs_are_listed_with_status_and_error(tmp_path):
    """Before: a run without evaluations vanished from every table while the header counted it, and runs
    without a readable metrics file were neither counted nor listed."""
    root = tmp_path / "partial"
    write_run(root, "ok/seed0", {"ar_nll": [4.0, 3.0]}, {"name": "partial-ok-seed0"})
    write_run(root, "failed/seed0", {"ar_nll": [4.0, 3.9]}, {"name": "partial-failed-seed0"}, status="failed",
              error="FloatingPointError: loss | grad norm is nan at step 200\nTraceback (most recent call last):")
    write_run(root, "killed/seed0", {"loss": [6.0, 5.5]}, {"name": "partial-killed-seed0"}, status="running",
              split="train")
    corrupt = write_run(root, "corrupt/seed0", {"ar_nll": [4.0]}, {"name": "partial-corrupt-seed0"},
                        status="running")
    data = (corrupt / "metrics.parquet").read_bytes()
    (corrupt / "metrics.parquet").write_bytes(data[: len(data) // 2])
    (root / "queued" / "seed0").mkdir(parents=True)
    (root / "queued" / "seed0" / "config.yaml").write_text("name: partial-queued-seed0\n")
    with pytest.warns(ResultsWarning):
        report = write_report(root, tmp_path / "out", draw=False)
    index = (report.out_dir / "report.md").read_text()
    for name in ("partial-failed-seed0", "partial-killed-seed0", "partial-corrupt-seed0", "partial-queued-seed0"):
        assert name in index
    runs = {row["run_name"]: row for row in report.tables["runs"].iter_rows(named=True)}
    assert {name: (row["status"], row["val_evals"]) for name, row in runs.items()} == {
        "partial-ok-seed0": ("complete", 2), "partial-failed-seed0": ("failed", 2),
        "partial-killed-seed0": ("running", 0), "partial-corrupt-seed0": ("running, unreadable metrics", 0),
        "partial-queued-seed0": ("no metrics", 0)}
    assert runs["partial-failed-seed0"]["error"] == "FloatingPointError: loss | grad norm is nan at step 200"
    assert "5 run folders (1 complete); 2 runs of 2 variants in the tables; 4 not " \
        "complete or without evaluations, listed below." in index
    section = index.split("## Runs not complete or without evaluations")[1].split("## Headline")[0]
    for name in ("partial-failed-seed0", "partial-killed-seed0", "partial-corrupt-seed0", "partial-queued-seed0"):
        assert f"| {name} |" in section
    assert "loss \\| grad norm is nan at step 200" in section and "partial-ok-seed0" not in section
    assert (report.out_dir / "runs.csv").is_file()
    assert dict(report.tables["best_loss"].select("variant", "status").iter_rows()) == {"ok": "complete",
                                                                                         "failed": "failed"}
