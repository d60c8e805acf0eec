"""Report views for the reproduction studies: best loss vs. repetition, best loss vs. AR fraction (dual runs),
and the single-epoch compute gap (MDM tokens to reach AR's loss). Tables on hand-made frames with numbers worked
out by hand; figures on small frames; the report on run folders written the way train and the ablation runner
write them (tests/test_analysis.py's ``write_run`` plus a variant.json)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from test_analysis import _has_baseline, write_run

from workbench.analysis import best_loss_vs_alpha, best_loss_vs_repetition, compute_gap, single_epoch_runs
from workbench.analysis.report import write_report

ENTROPY = 6.0


def curve(run: str, metric: str, tokens: list[int], values: list[float], epochs: float | None = 1.0,
          **columns) -> list[dict]:
    """Validation rows of one run at the given token counts (epoch = the fraction of a ``tokens[-1]`` budget
    times ``epochs``)."""
    return [{"run": run, "step": i, "epoch": (epochs or 1.0) * t / tokens[-1], "tokens_seen": t, "split": "val",
             "metric": metric, "value": float(v), "planned_epochs": epochs, **columns}
            for i, (t, v) in enumerate(zip(tokens, values))]


def table(*groups: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([row for group in groups for row in group], infer_schema_length=None).with_columns(
        pl.col("tokens_seen").cast(pl.Int64), pl.col("step").cast(pl.Int64))


K = [0, 1000, 2000, 3000, 4000, 5000, 6000]  # token counts of the evaluations (0: before training)


def gap_frame() -> pl.DataFrame:
    """AR seed means 5, 4, 3 at 1k, 2k, 3k (seed 1 has one more evaluation, at 4k); MDM seed means 6, 5, 4.5, 4,
    3.5, 3.2 at 1k..6k, where seed 0 alone crosses 4.0 at 3k; a one-seed shifted MDM at 4.5, 3.0; an 8-epoch AR
    run far below everything, which the single-epoch table must ignore."""
    ar = {"objective": "ar", "group": "ar", "order": 0}
    mdm = {"objective": "mdm", "group": "mdm", "order": 1}
    shifted = {"objective": "mdm", "group": "mdm-shifted", "order": 2}
    return table(
        curve("ar0", "ar_nll", K[:4], [6.25, 5.25, 4.25, 3.0], seed=0, variant="ar-ep1", **ar),
        curve("ar1", "ar_nll", K[:5], [6.25, 4.75, 3.75, 3.0, 2.5], seed=1, variant="ar-ep1", **ar),
        curve("ar8", "ar_nll", K[:4], [1.0, 1.0, 1.0, 1.0], epochs=8.0, seed=0, variant="ar-ep8", **ar),
        curve("mdm0", "mdm_nelbo", K, [6.5, 6.0, 5.0, 3.75, 4.0, 3.75, 3.2], seed=0, variant="mdm-ep1", **mdm),
        curve("mdm1", "mdm_nelbo", K, [6.5, 6.0, 5.0, 5.25, 4.0, 3.25, 3.2], seed=1, variant="mdm-ep1", **mdm),
        curve("mdm0", "ar_nll", K, [9.0] * 7, seed=0, variant="mdm-ep1", **mdm),  # an MDM's AR-order NLL: unused
        curve("sh0", "mdm_nelbo", K[:3], [6.5, 4.5, 3.0], seed=0, variant="shifted-ep1", **shifted))


def test_compute_gap_on_known_curves():
    gap = compute_gap(gap_frame())
    assert gap.columns == ["ar_variant", "mdm_variant", "ar_tokens", "ar_loss", "mdm_tokens", "reached", "ratio",
                           "mdm_tokens_lower_bound", "mdm_best_mean"]
    assert set(gap["ar_variant"]) == {"ar"}
    rows = {(r["mdm_variant"], r["ar_tokens"]): r for r in gap.iter_rows(named=True)}
    assert gap["mdm_variant"].to_list() == ["mdm"] * 3 + ["mdm-shifted"] * 3  # declared order, b ascending
    # b = 0 is no training; 4k is left out because AR seed 0 has no evaluation there; the 8-epoch run is ignored
    assert gap["ar_tokens"].to_list()[:3] == [1000, 2000, 3000]
    assert gap["ar_loss"].to_list()[:3] == [5.0, 4.0, 3.0]
    # AR 5.0 at 1k: MDM mean 5.0 at 2k; AR 4.0 at 2k: the mean reaches 4.0 at 4k (seed 0 alone would say 3k)
    assert (rows["mdm", 1000]["mdm_tokens"], rows["mdm", 1000]["ratio"]) == (2000, 2.0)
    assert (rows["mdm", 2000]["mdm_tokens"], rows["mdm", 2000]["ratio"]) == (4000, 2.0)
    # AR 3.0 at 3k: the MDM mean bottoms out at 3.2 by 6k, so the answer is "more than 6k tokens"
    never = rows["mdm", 3000]
    assert (never["reached"], never["mdm_tokens"], never["ratio"], never["mdm_tokens_lower_bound"]) == (
        False, None, None, 6000)
    assert never["mdm_best_mean"] == pytest.approx(3.2)
    assert all(rows["mdm", b]["mdm_tokens_lower_bound"] is None for b in (1000, 2000))
    # the shifted MDM (4.5, 3.0 at 1k, 2k) reaches AR's 3k loss at 2k: a ratio below 1 is possible
    assert [rows["mdm-shifted", b]["ratio"] for b in (1000, 2000, 3000)] == pytest.approx([1.0, 1.0, 2 / 3])
    assert gap["reached"].to_list() == [True, True, False, True, True, True]


def test_compute_gap_needs_single_epoch_ar_and_mdm():
    frame = gap_frame()
    assert compute_gap(frame.filter(pl.col("objective") != "mdm")).is_empty()
    multi = frame.with_columns(pl.lit(8.0).alias("planned_epochs"))
    empty = compute_gap(multi)
    assert empty.is_empty() and empty.columns[:3] == ["ar_variant", "mdm_variant", "ar_tokens"]
    # without planned epochs, a run whose evaluations stay within its first epoch counts as single-epoch
    unknown = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("planned_epochs"))
    assert sorted(single_epoch_runs(unknown)["run"].unique()) == ["ar0", "ar1", "mdm0", "mdm1", "sh0"]
    assert compute_gap(unknown).equals(compute_gap(frame))
    with pytest.raises(ValueError, match="AR reference 'zz'"):
        compute_gap(frame, ar_variant="zz")


def repetition_frame(seeds=(0, 1), epochs=(1.0, 8.0, 64.0)) -> pl.DataFrame:
    """AR overfits more with repetition (best rises, final rises faster); MDM barely moves; dual runs too."""
    groups = []
    for e in epochs:
        for s in seeds:
            for group, objective, metric, best, rise in (("ar", "ar", "ar_nll", 4.0 + 0.1 * e ** 0.5, 0.05 * e),
                                                         ("mdm", "mdm", "mdm_nelbo", 4.6, 0.0),
                                                         ("dual", "dual", "ar_nll", 4.3, 0.01)):
                run = f"{group}-ep{e:g}-s{s}"
                values = [5.5, best + 0.01 * s, best + rise + 0.01 * s]
                cols = {"variant": f"{group}-ep{e:g}", "group": group, "repetition": f"ep{e:g}", "seed": s,
                        "objective": objective, "order": ["ar", "mdm", "dual"].index(group),
                        "ar_fraction": {"ar": 1.0, "mdm": 0.0, "dual": 0.5}[group]}
                groups += [curve(run, metric, [1000, 2000, 3000], values, epochs=e, **cols),
                           curve(run, "unigram_entropy", [3000], [ENTROPY], epochs=e, **cols)]
    return table(*groups)


def data_lines(ax, points: int) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata()) == points]


def test_best_loss_vs_repetition_lines_per_group_and_metric():
    fig = best_loss_vs_repetition(repetition_frame())
    assert fig is not None and len(fig.axes) == 1 and _has_baseline(fig, ENTROPY)
    ax = fig.axes[0]
    assert len(data_lines(ax, 3)) == 4  # (ar, mdm) x (best, final); the dual runs are left out
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "ar (ar_nll)" in legend and "mdm (mdm_nelbo)" in legend and not any("dual" in t for t in legend)
    assert "best" in legend and "final" in legend
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [1.0, 8.0, 64.0]
    assert ax.get_ylabel() == "validation loss (nats/token; metric per line)"
    assert ax.collections  # seed spread bands (2 seeds)
    best_ar = sorted(data_lines(ax, 3), key=lambda line: line.get_ydata()[0])[0].get_ydata()
    assert list(best_ar) == pytest.approx([4.105, 4.0 + 0.1 * 8 ** 0.5 + 0.005, 4.805])  # mean over seeds
    single = best_loss_vs_repetition(repetition_frame(seeds=(0,)))
    assert single is not None and not single.axes[0].collections  # one seed: no band
    ar_only = best_loss_vs_repetition(repetition_frame().filter(pl.col("group") != "mdm"))
    assert ar_only.axes[0].get_ylabel() == "validation AR NLL (nats/token)"
    assert best_loss_vs_repetition(repetition_frame(epochs=(8.0,))) is None  # no repetition sweep
    assert best_loss_vs_repetition(repetition_frame().filter(pl.col("group") == "dual")) is None


def dual_frame(alphas=(0.0, 0.5, 1.0), epochs=(1.0, 64.0), seeds=(0, 1)) -> pl.DataFrame:
    groups = []
    for a in alphas:
        for e in epochs:
            for s in seeds:
                cols = {"variant": f"alpha{a:g}-ep{e:g}", "group": f"alpha{a:g}", "repetition": f"ep{e:g}",
                        "seed": s, "objective": "dual", "ar_fraction": a, "order": 0}
                run = f"a{a:g}-ep{e:g}-s{s}"
                groups += [curve(run, "ar_nll", [1000, 2000], [6.0, 4.0 + a / e + 0.01 * s], epochs=e, **cols),
                           curve(run, "mdm_nelbo", [1000, 2000], [5.5, 4.5 - a / 4], epochs=e, **cols),
                           curve(run, "unigram_entropy", [2000], [ENTROPY], epochs=e, **cols)]
    return table(*groups)


def test_best_loss_vs_alpha_panel_per_metric_line_per_repetition():
    fig = best_loss_vs_alpha(dual_frame())
    assert fig is not None and len(fig.axes) == 2 and _has_baseline(fig, ENTROPY)
    assert [ax.get_title() for ax in fig.axes] == ["best ar_nll", "best mdm_nelbo"]
    for ax in fig.axes:
        assert len(data_lines(ax, 3)) == 2  # one line per repetition level over 3 alphas
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1 epoch", "64 epochs"]
    one_epoch = data_lines(fig.axes[0], 3)[0].get_ydata()
    assert list(one_epoch) == pytest.approx([4.005, 4.505, 5.005])  # seed mean of 4 + alpha + 0.01 s
    assert best_loss_vs_alpha(dual_frame(alphas=(0.5,))) is None
    assert best_loss_vs_alpha(repetition_frame().filter(pl.col("objective") != "dual")) is None


# --------------------------------------------------------------------------------------------------------------
# the report on run folders

UNIQUE_TOKENS = 65536  # a whole number of 64-token sequences: planned epochs are exact


def write_study_run(root, variant: str, group: str, seed: int, index: int, epochs: int, curves: dict,
                    objective: dict | None = None) -> None:
    """A run folder as ``workbench ablate`` leaves it for a repetition point: config (its planned epochs from
    unique tokens and max_duration), metrics, summary and variant.json."""
    overrides = {"name": f"study-{variant}-seed{seed}", "seed": seed, "data": {"unique_tokens": UNIQUE_TOKENS},
                 "trainer": {"max_duration": f"{epochs}ep"}, **({"objective": objective} if objective else {})}
    run_dir = write_run(root, f"{variant}/seed{seed}", {**curves, "unigram_entropy": [ENTROPY]}, overrides)
    record = {"ablation": root.name, "variant": variant, "group": group, "repetition": f"ep{epochs}", "seed": seed,
              "index": index}
    (run_dir / "variant.json").write_text(json.dumps(record))


@pytest.fixture
def study_root(tmp_path):
    """AR and MDM at 1 and 8 epochs (2 seeds each), and dual runs at alpha 0 and 1 (1 epoch)."""
    root = tmp_path / "study"
    for s in (0, 1):
        write_study_run(root, "ar-ep1", "ar", s, 0, 1, {"ar_nll": [5.0, 4.0, 3.5 + 0.1 * s]})
        write_study_run(root, "ar-ep8", "ar", s, 1, 8, {"ar_nll": [5.0, 3.8, 4.2]})
        write_study_run(root, "mdm-ep1", "mdm", s, 2, 1, {"mdm_nelbo": [6.0, 5.0, 4.0 - 0.1 * s]},
                        {"name": "mdm"})
        write_study_run(root, "mdm-ep8", "mdm", s, 3, 8, {"mdm_nelbo": [6.0, 4.5, 3.9]}, {"name": "mdm"})
    for i, alpha in enumerate((0.0, 1.0)):
        write_study_run(root, f"dual{alpha:g}-ep1", f"dual{alpha:g}", 0, 4 + i, 1,
                        {"ar_nll": [5.0, 4.5 - alpha], "mdm_nelbo": [5.5, 4.4 + alpha]},
                        {"name": "dual", "dual": {"ar_fraction": alpha}})
    return root


def test_report_writes_study_views_when_they_apply(study_root, tmp_path):
    report = write_report(study_root, tmp_path / "out", formats=("png",))
    out = report.out_dir
    for name in ("best_loss_vs_repetition", "best_loss_vs_alpha", "alpha_repetition_heatmap"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    gap = pl.read_csv(out / "compute_gap.csv")
    # AR mean 5, 4, 3.55 at 1k, 2k, 3k; MDM mean 6, 5, 3.95: 4.0 first reached at 3k, 3.55 never
    assert gap["mdm_variant"].to_list() == ["mdm"] * 3 and gap["ar_tokens"].to_list() == [1000, 2000, 3000]
    assert gap["mdm_tokens"].to_list() == [2000, 3000, None]
    assert gap["ratio"].to_list() == pytest.approx([2.0, 1.5, None], nan_ok=True)
    assert gap["mdm_tokens_lower_bound"].to_list() == [None, None, 3000]
    index = (out / "report.md").read_text()
    section = index.split("## compute gap")[1]
    assert "upper bound on the MDM's NLL" in section and "| ar | mdm | 3000 |" in section
    assert "![best_loss_vs_repetition](best_loss_vs_repetition.png)" in index
    assert "![best_loss_vs_alpha](best_loss_vs_alpha.png)" in index


def test_report_leaves_study_views_out_when_they_do_not_apply(tmp_path):
    """One planned epoch count (2), no dual runs: no repetition or alpha figure, no compute gap (not 1 epoch)."""
    root = tmp_path / "plain"
    write_run(root, "ar/seed0", {"ar_nll": [5.0, 4.0, 3.5]}, {"name": "plain-ar"})
    write_run(root, "mdm/seed0", {"mdm_nelbo": [6.0, 5.0, 4.5]}, {"name": "plain-mdm", "objective": {"name": "mdm"}})
    report = write_report(root, tmp_path / "out", formats=("png",))
    assert set(report.figures) == {"val_loss_vs_epoch", "val_loss_vs_tokens"}
    assert "compute_gap" not in report.tables and not (report.out_dir / "compute_gap.csv").exists()
    assert "compute gap" not in (report.out_dir / "report.md").read_text()


def test_a_report_regenerates_with_its_saved_targets_and_baseline(tmp_path):
    """A committed report made with --target/--baseline records them (arguments.json), so regenerating it from the
    committed runs (tests/test_reproduce.py) uses the same targets instead of the defaults."""
    from workbench.analysis.report import ARGUMENTS_FILE, saved_arguments, write_report
    from workbench.paths import REPO_ROOT

    demo = REPO_ROOT / "results" / "demo"
    first = write_report(demo, tmp_path / "first", target={"ar_nll": 5.9}, baseline="mask", draw=False)
    assert first.tables["tokens_to_target"].filter(pl.col("metric") == "ar_nll")["target"].unique().to_list() == [5.9]
    arguments = saved_arguments(first.out_dir)
    assert arguments == {"metric": "val_loss", "tolerance": 0.01, "target": {"ar_nll": 5.9}, "baseline": ["mask"]}
    again = write_report(demo, tmp_path / "again", draw=False, **arguments)
    for name in ("tokens_to_target", "speedup", "headline"):
        assert again.tables[name].equals(first.tables[name]), name
    assert saved_arguments(tmp_path / "nowhere") == {}
    assert (first.out_dir / ARGUMENTS_FILE).is_file()


def test_validation_curves_name_a_single_metric_and_say_repetition_only_when_there_is_some():
    """An all-MDM one-epoch study's axis says NELBO (a bound) and its title does not claim repetition; the demo
    (AR and MDM, 12 epochs) keeps the generic label, with the metric as line style, and the repetition title."""
    import matplotlib.pyplot as plt

    from workbench.analysis import load_results, validation_curves
    from workbench.paths import REPO_ROOT

    sampling = REPO_ROOT / "results" / "repro" / "time_sampling-cpu"
    if not sampling.is_dir():
        pytest.skip("time_sampling-cpu is not committed")
    one_epoch = validation_curves(load_results(sampling), x="tokens_seen")
    assert one_epoch.axes[0].get_ylabel() == "validation MDM NELBO (nats/token, bound)"
    assert one_epoch._suptitle.get_text() == "Validation loss"
    demo = validation_curves(load_results(REPO_ROOT / "results" / "demo"))
    assert demo.axes[0].get_ylabel() == "validation loss (nats/token)"
    assert demo._suptitle.get_text() == "Validation loss under repetition"
    plt.close("all")
