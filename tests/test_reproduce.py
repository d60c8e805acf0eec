"""Committed results reproduce, so their numbers cannot silently go stale.

``results/demo`` is the output of ``ablations/demo.yaml`` (``make demo DEMO_OUT=results``). The slow test here
retrains the first epochs of two of its variants with the same config, in a temporary folder, and compares every
loss row written up to there with the committed ``metrics.parquet`` rows at the same steps; fast tests check that
the committed summaries and report tables are what the committed metrics give, for the demo and for every study
of the papers' claims under ``results/repro`` (results/repro/README.md). ``WORKBENCH_REPRO_REFERENCE``
points the tests at another results folder of the same ablation (e.g. a fresh ``runs/demo``).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from workbench.paths import REPO_ROOT
from workbench.results import CONFIG_FILE, METRICS_FILE, read_metrics, read_summary

DEMO = REPO_ROOT / "ablations" / "demo.yaml"
REFERENCE = Path(os.environ.get("WORKBENCH_REPRO_REFERENCE", REPO_ROOT / "results" / "demo"))
REGENERATE = "rm -rf results/demo && make demo DEMO_OUT=results"
# the reproduction studies of the papers' claims (results/repro/README.md): one folder per ablation and scale
REPRO = REPO_ROOT / "results" / "repro"
STUDIES = [REFERENCE, *sorted(path.parent.parent for path in REPRO.glob("*/report/headline.csv"))]

# mask: input-token masking (the AR path plus the masking RNG stream); mdm: the diffusion loss, its time and mask
# RNG, and the NELBO estimator; between them every random stream and both validation metrics of the demo
VARIANTS = ("mask", "mdm")
EPOCHS = 4  # a third of the demo's 12: past the first PIQA/ARC-Easy evaluation (epoch 3) and the 4ep checkpoint
TOLERANCE = 1e-3  # nats (and accuracy units); see test_demo_variants_reproduce_the_committed_curves
COMPARED = {"train": {"loss"}, "val": None, "piqa": {"acc", "acc_norm"}, "arc_easy": {"acc", "acc_norm"}}


def regenerate_hint(study: Path) -> str:
    """How to bring a committed study's report back in line with its runs."""
    if study == REFERENCE:
        return REGENERATE
    return f"workbench report {study.relative_to(REPO_ROOT)} (each study's command: results/repro/README.md)"


def compared_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """The deterministic rows: training loss, every validation metric, task accuracies (not speeds or times)."""
    keep = pl.lit(False)
    for split, metrics in COMPARED.items():
        keep = keep | ((pl.col("split") == split) & (pl.lit(True) if metrics is None else pl.col("metric")
                                                     .is_in(sorted(metrics))))
    return frame.filter(keep).select("split", "metric", "step", "value")


def curve_mismatches(fresh: pl.DataFrame, reference: pl.DataFrame, tolerance: float = TOLERANCE) -> list[str]:
    """Rows of ``fresh`` whose (split, metric, step) is missing from ``reference`` or differs by > tolerance."""
    joined = compared_rows(fresh).join(compared_rows(reference), on=["split", "metric", "step"], how="left",
                                       suffix="_ref")
    bad = joined.filter(pl.col("value_ref").is_null() | ((pl.col("value") - pl.col("value_ref")).abs() > tolerance))
    return [f"{r['split']} {r['metric']} step {r['step']}: now {r['value']:.4f}, committed "
            + ("missing" if r["value_ref"] is None else f"{r['value_ref']:.4f}")
            for r in bad.sort("step", "split", "metric").iter_rows(named=True)]


def stop_after(unit: str, amount: int):
    """A Composer callback that ends training after the evaluations at ``amount`` of ``unit`` (``epoch`` or
    ``token``), without changing the schedule up to there (the run keeps its full max_duration until the stop)."""
    from composer.core import Callback

    class StopAfter(Callback):
        def eval_after_all(self, state, logger) -> None:
            if int(getattr(state.timestamp, unit)) >= amount:
                state.stop_training()

    return StopAfter()


def test_curve_comparison_flags_missing_and_changed_rows():
    rows = [("train", "loss", 32, 6.0), ("train", "tokens_per_s", 32, 1e4), ("val", "ar_nll", 128, 5.5),
            ("piqa", "acc", 384, 0.5), ("piqa", "stderr", 384, 0.03)]
    reference = pl.DataFrame(rows, schema=["split", "metric", "step", "value"], orient="row")
    same = reference.with_columns(pl.when(pl.col("metric") == "tokens_per_s").then(9e3).otherwise(pl.col("value"))
                                  .alias("value"))
    assert curve_mismatches(same, reference) == []  # speeds are not compared
    assert curve_mismatches(same.with_columns(pl.col("value") + 0.9 * TOLERANCE), reference) == []
    shifted = same.with_columns(pl.when(pl.col("metric") == "ar_nll").then(5.5021).otherwise(pl.col("value"))
                                .alias("value"))
    assert curve_mismatches(shifted, reference) == ["val ar_nll step 128: now 5.5021, committed 5.5000"]
    later = pl.concat([same, pl.DataFrame([("val", "ar_nll", 256, 5.4)], schema=same.schema, orient="row")])
    assert curve_mismatches(later, reference) == ["val ar_nll step 256: now 5.4000, committed missing"]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_summaries_match_their_metrics(study):
    """summary.json's best/final values (what the README tables quote) are the committed curves' own."""
    runs = sorted(study.glob(f"*/seed*/{METRICS_FILE}"))
    assert runs, f"no committed runs under {study}"
    for path in runs:
        summary, frame = read_summary(path.parent), read_metrics(path)
        assert summary is not None and frame is not None and summary["status"] == "complete", path.parent
        val = frame.filter(pl.col("split") == "val").sort("step")
        for metric in ("ar_nll", "mdm_nelbo"):
            rows = val.filter(pl.col("metric") == metric)
            if rows.height:
                assert summary[f"best_{metric}"] == pytest.approx(rows["value"].min(), abs=1e-12), path.parent
                assert summary[f"final_{metric}"] == pytest.approx(rows["value"][-1], abs=1e-12), path.parent


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_report_is_the_report_of_the_committed_runs(study, tmp_path):
    """<study>/report/*.csv (every committed table, the seed-spread table included) equal what ``workbench
    report`` computes from the study's committed runs today, so tables and data cannot drift apart."""
    from workbench.analysis.report import saved_arguments, write_report

    committed, hint = study / "report", regenerate_hint(study)
    fresh = write_report(study, tmp_path / "report", draw=False, **saved_arguments(committed)).out_dir
    required = ("headline", "best_loss", "overfitting", "tokens_to_target", "speedup", "runs", "seeds")
    names = sorted({*required, *(path.stem for path in committed.glob("*.csv"))})
    for name in names:
        assert (committed / f"{name}.csv").is_file(), f"{committed / name}.csv missing: regenerate with {hint}"
        assert (fresh / f"{name}.csv").is_file(), f"the report no longer writes {name}.csv; regenerate: {hint}"
        now, then = pl.read_csv(fresh / f"{name}.csv"), pl.read_csv(committed / f"{name}.csv")
        assert now.columns == then.columns, f"{name}.csv is stale (columns {then.columns}); regenerate: {hint}"
        for column in now.columns:
            if now[column].dtype.is_float():
                assert now[column].to_list() == pytest.approx(then[column].to_list(), abs=1e-9, nan_ok=True), \
                    f"{study.name}/report/{name}.csv column {column} is stale; regenerate: {hint}"
            else:
                assert now[column].to_list() == then[column].to_list(), \
                    f"{study.name}/report/{name}.csv column {column} is stale; regenerate: {hint}"


@pytest.mark.slow
def test_demo_variants_reproduce_the_committed_curves(tmp_path):
    """Retrain ``mask`` and ``mdm`` of ablations/demo.yaml for their first 4 epochs (same config, same seed, one
    thread as in ``make demo``'s two parallel runs on 2 cores) and compare training loss, validation metrics and
    the epoch-3 task accuracies row by row with the committed metrics.parquet (about 1 CPU-minute for both,
    data preparation included).

    Tolerance 1e-3 nats: on this machine two runs of the same code agree exactly (single-threaded CPU float math
    is deterministic), so any difference here means the code changed what it computes. Another CPU may round
    differently (other SIMD widths in the matmul and reduction kernels); such rounding differences are small
    next to 1e-3 over 4 epochs, while the changes this test exists to catch are far larger (the stale demo's
    token-masking run is already 0.03 nats off at the first evaluation). The first 4 epochs are as strong as
    the whole curve for that purpose: every random stream, the loss, the optimizer schedule (the run keeps its
    12-epoch duration) and both evaluators are exercised, and a change shows in the first rows it touches."""
    import torch

    from workbench.ablate import load_ablation, prepare_data
    from workbench.config import config_differences
    from workbench.train import train

    ablation = load_ablation(DEMO, only=list(VARIANTS), results_root=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    failures = []
    try:
        prepare_data(ablation.runs, log=lambda _: None)
        for run in ablation.runs:
            reference = REFERENCE / run.variant.name / f"seed{run.seed}"
            assert config_differences(reference / CONFIG_FILE, run.config) == [], \
                f"{DEMO} changed since {reference} was produced; regenerate: {REGENERATE}"
            train(run.config, run_dir=run.run_dir, extra_callbacks=[stop_after("epoch", EPOCHS)], log=lambda _: None)
            fresh = read_metrics(run.run_dir / METRICS_FILE)
            assert fresh is not None and fresh["epoch"].max() == pytest.approx(EPOCHS)
            # a run evaluates its tasks once more at its last step: the stopped run's end is mid-way in the demo
            end = fresh["step"].max()
            fresh = fresh.filter((pl.col("step") < end) | pl.col("split").is_in(["train", "val"]))
            mismatches = curve_mismatches(fresh, read_metrics(reference / METRICS_FILE))
            if mismatches:
                failures.append(f"{run.variant.name}: {len(mismatches)} rows differ, first: "
                                + "; ".join(mismatches[:3]))
    finally:
        torch.set_num_threads(threads)
    assert not failures, (f"{REFERENCE} no longer reproduces (tolerance {TOLERANCE}): " + " | ".join(failures)
                          + f". Regenerate it and its report: {REGENERATE}")


# One run per laptop-scale study of the papers' claims, retrained for its first two validation points (~30 s
# each on one thread): the plain MDM at the heaviest repetition, a dual mix, a bell-shaped sampler, token masking.
REPRO_RETRAINED = [("repetition", "mdm-u64k-ep64", 1, 512_000), ("dual_ratio", "alpha0.5-u64k-ep64", 0, 512_000),
                   ("time_sampling", "bell-elbo", 2, 512_000), ("regularizers", "mask-rate0.25", 1, 131_072)]


@pytest.mark.slow
@pytest.mark.parametrize(("ablation_name", "variant", "seed", "tokens"), REPRO_RETRAINED,
                         ids=[f"{a}-{v}-seed{s}" for a, v, s, _ in REPRO_RETRAINED])
def test_repro_studies_reproduce_from_the_committed_code(ablation_name, variant, seed, tokens, tmp_path):
    """A run of each committed laptop-scale study, retrained from its ablation file at ``--scale cpu`` (the
    command in results/repro/README.md), gives the committed rows up to its second validation point (tolerance
    as for the demo)."""
    import torch

    from workbench.ablate import load_ablation, prepare_data
    from workbench.config import config_differences
    from workbench.train import train

    study = REPRO / f"{ablation_name}-cpu"
    reference = study / variant / f"seed{seed}"
    if not (study / "report" / "headline.csv").is_file():
        pytest.skip(f"{study.name} is not committed yet")
    ablation = load_ablation(REPO_ROOT / "ablations" / f"{ablation_name}.yaml", scale="cpu", only=[variant],
                             results_root=tmp_path)
    runs = [run for run in ablation.runs if run.seed == seed]
    assert len(runs) == 1, [run.run_dir for run in ablation.runs]
    run = runs[0]
    assert config_differences(reference / CONFIG_FILE, run.config) == [], \
        f"ablations/{ablation_name}.yaml changed since {reference} was produced; rerun the study"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare_data([run], log=lambda _: None)
        train(run.config, run_dir=run.run_dir, extra_callbacks=[stop_after("token", tokens)], log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    fresh = read_metrics(run.run_dir / METRICS_FILE)
    # a stopped run evaluates its tasks once more at its last step, which the full run did not
    fresh = fresh.filter((pl.col("step") < fresh["step"].max()) | pl.col("split").is_in(["train", "val"]))
    assert fresh is not None and fresh.filter(pl.col("split") == "val")["step"].n_unique() >= 3  # step 0 + 2 points
    mismatches = curve_mismatches(fresh, read_metrics(reference / METRICS_FILE))
    assert not mismatches, f"{reference} no longer reproduces: {len(mismatches)} rows differ, first: " + \
        "; ".join(mismatches[:3])


@pytest.mark.parametrize(("alpha", "twin", "metric"),
                         [("alpha0", "mdm-shifted", "mdm_nelbo"), ("alpha1", "ar", "ar_nll")])
def test_dual_ends_are_the_repetition_studys_runs(alpha, twin, metric):
    """The dual objective at AR fraction 0 is the shifted MDM and at 1 plain AR: the committed dual_ratio-cpu runs
    at those ends, trained separately, give the repetition-cpu study's curves of the same seed exactly."""
    dual, repetition = REPRO / "dual_ratio-cpu", REPRO / "repetition-cpu"
    if not (dual / "report" / "headline.csv").is_file() or not (repetition / "report" / "headline.csv").is_file():
        pytest.skip("dual_ratio-cpu or repetition-cpu is not committed")
    compared = 0
    for point in ("u4.1M-ep1", "u64k-ep64"):
        for seed in (0, 1, 2):
            ends = [read_metrics(root / f"{name}-{point}" / f"seed{seed}" / METRICS_FILE)
                    .filter((pl.col("split") == "val") & (pl.col("metric") == metric)).select("step", "value")
                    for root, name in ((dual, alpha), (repetition, twin))]
            assert ends[0].height > 10 and ends[0].equals(ends[1]), f"{alpha}-{point} seed{seed} vs {twin}"
            compared += 1
    assert compared == 6


def test_time_sampling_uniform_is_the_repetition_studys_one_epoch_mdm():
    """The time-sampling study's uniform sampler is the plain MDM's default: its committed runs equal the
    repetition study's one-epoch MDM runs of the same seed, validation row for row."""
    sampling, repetition = REPRO / "time_sampling-cpu", REPRO / "repetition-cpu"
    if not (sampling / "report" / "headline.csv").is_file() or not (repetition / "report" / "headline.csv").is_file():
        pytest.skip("time_sampling-cpu or repetition-cpu is not committed")
    for seed in (0, 1, 2):
        curves = [read_metrics(run / f"seed{seed}" / METRICS_FILE).filter(pl.col("split") == "val")
                  .select("step", "metric", "value").sort("step", "metric")
                  for run in (sampling / "uniform", repetition / "mdm-u4.1M-ep1")]
        assert curves[0].height > 10 and curves[0].equals(curves[1]), f"seed{seed}"
