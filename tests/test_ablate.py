"""Ablation files: expansion (variants, grids, zips, repetition, seeds), errors before anything runs,
skip/resume/refuse logic, every shipped ablation in smoke mode, and one smoke ablation run end-to-end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from ablation_smoke import SMOKE_VARIANTS, smoke_results
from conftest import TINY

from workbench import ablate
from workbench.commands import ablate as ablate_command
from workbench.config import ConfigError, dump_config, load_run_config
from workbench.paths import REPO_ROOT
from workbench.results import MetricsWriter, read_summary, write_summary

SHIPPED = sorted((REPO_ROOT / "ablations").glob("*.yaml"))


def write_ablation(tmp_path: Path, body: dict, name: str = "abl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": TINY, **body}, sort_keys=False))
    return path


def cli_args(path: Path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ablate_command.add_arguments(parser)
    args = parser.parse_args([str(path), "--no-probe"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------------------
# expansion


def test_variants_grids_zip_and_seeds_expand_to_validated_runs(tmp_path, results_root):
    path = write_ablation(tmp_path, {
        "name": "exp",
        "seeds": [0, 1],
        "variants": {
            "ar": {},
            "mask": {"algorithms": ["token_masking"], "grid": {"algorithms.token_masking.rate": [0.1, 0.2]}},
            "mdm": {"objective.name": "mdm"},
        },
        "grid": {"lr": {"key": "optimizer.lr", "values": [0.001, 0.003]}},
        "zip": {"model.n_layers": [1, 2], "width": {"key": "model.d_model", "values": [32, 64]}},
    })
    abl = ablate.load_ablation(path)
    assert abl.name == "exp" and abl.seeds == [0, 1]
    # (ar + 2 mask rates + mdm) x 2 lr x 2 zip points = 16 variants, x 2 seeds
    assert len(abl.variants) == 16 and len(abl.runs) == 32
    names = [v.name for v in abl.variants]
    assert names[:4] == ["ar-lr0.001-n_layers1-width32", "ar-lr0.001-n_layers2-width64",
                         "ar-lr0.003-n_layers1-width32", "ar-lr0.003-n_layers2-width64"]
    assert "mask-rate0.2-lr0.003-n_layers2-width64" in names
    run = next(r for r in abl.runs if r.variant.name == "mask-rate0.2-lr0.003-n_layers2-width64" and r.seed == 1)
    config = run.config
    assert config.name == "exp-mask-rate0.2-lr0.003-n_layers2-width64-seed1" and config.seed == 1
    assert config.algorithms.token_masking.rate == 0.2 and config.optimizer.lr == 0.003
    assert (config.model.n_layers, config.model.d_model) == (2, 64)
    assert run.run_dir == results_root / "exp" / "mask-rate0.2-lr0.003-n_layers2-width64" / "seed1"
    assert run.variant.swept == {"rate": 0.2, "lr": 0.003, "n_layers": 2, "width": 64}
    mdm = next(r for r in abl.runs if r.variant.name.startswith("mdm"))
    assert mdm.config.objective.name == "mdm" and mdm.config.algorithms.token_masking is None
    ar = next(r for r in abl.runs if r.variant.name.startswith("ar"))
    assert ar.config.data == abl.runs[-1].config.data  # the base is shared
    assert [v.index for v in abl.variants] == list(range(16))


def test_repetition_axis_splits_a_fixed_budget_or_crosses_unique_and_epochs(tmp_path):
    fixed = ablate.load_ablation(write_ablation(tmp_path, {
        "name": "rep", "variants": {"ar": {}, "mdm": {"objective": {"name": "mdm"}}},
        "repetition": {"total_tokens": "60k", "epochs": [1, 4]}}))
    assert [v.name for v in fixed.variants] == ["ar-u60k-ep1", "ar-u15k-ep4", "mdm-u60k-ep1", "mdm-u15k-ep4"]
    assert [v.group for v in fixed.variants] == ["ar", "ar", "mdm", "mdm"]
    assert fixed.variants[1].repetition == "u15k-ep4"
    assert fixed.variants[1].swept == {"unique_tokens": 15000, "epochs": 4, "total_tokens": 60000}
    configs = [r.config for r in fixed.runs]
    assert [(c.data.unique_tokens, c.trainer.max_duration) for c in configs[:2]] == [(60000, "1ep"), (15000, "4ep")]
    assert {ablate.planned_tokens(c) for c in configs} == {59968, 59904}  # whole sequences of 64 per epoch

    product = ablate.load_ablation(write_ablation(tmp_path, {
        "name": "rep2", "repetition": {"unique_tokens": ["32k", 65536], "epochs": [2, 3]}}))
    assert [v.name for v in product.variants] == ["u32k-ep2", "u32k-ep3", "u65.5k-ep2", "u65.5k-ep3"]
    by_units = ablate.load_ablation(write_ablation(tmp_path, {
        "name": "rep3", "repetition": {"total_tokens": 65536, "unique_tokens": [16384, 32768]}}))
    assert [v.swept["epochs"] for v in by_units.variants] == [4, 2]


def test_smoke_block_replaces_axes_and_applies_overrides(tmp_path):
    path = write_ablation(tmp_path, {
        "name": "sm", "seeds": [0, 1, 2], "variants": {"ar": {}, "mdm": {"objective.name": "mdm"}},
        "repetition": {"total_tokens": "1M", "epochs": [1, 2, 4]},
        "smoke": {"overrides": {"model": {"d_model": 32}}, "seeds": [5], "repetition": {"total_tokens": 65536,
                                                                                          "epochs": [1]}}})
    full, smoke = ablate.load_ablation(path), ablate.load_ablation(path, smoke=True)
    assert len(full.runs) == 2 * 3 * 3
    assert [r.name for r in smoke.runs] == ["sm-ar-u65.5k-ep1-seed5", "sm-mdm-u65.5k-ep1-seed5"]
    assert all(r.config.model.d_model == 32 and r.config.seed == 5 for r in smoke.runs)
    assert full.runs[0].config.model.d_model == TINY["model"]["d_model"]


def test_only_selects_names_groups_and_patterns(tmp_path):
    path = write_ablation(tmp_path, {"name": "o", "variants": {"ar": {}, "mdm": {"objective.name": "mdm"}},
                                     "repetition": {"unique_tokens": ["32k"], "epochs": [1, 2]}})
    assert [v.name for v in ablate.load_ablation(path, only=["mdm"]).variants] == ["mdm-u32k-ep1", "mdm-u32k-ep2"]
    assert [v.name for v in ablate.load_ablation(path, only=["*-ep2"]).variants] == ["ar-u32k-ep2", "mdm-u32k-ep2"]
    assert [v.name for v in ablate.load_ablation(path, only=["mdm-u32k-ep1", "ar"]).variants] == [
        "ar-u32k-ep1", "ar-u32k-ep2", "mdm-u32k-ep1"]  # declared order, not the order asked


def test_base_may_be_a_run_yaml_path(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**TINY, "name": "ignored", "seed": 3}))
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": "run.yaml", "variants": {"a": {"optimizer.lr": 0.01}}}))
    abl = ablate.load_ablation(path)
    assert [r.name for r in abl.runs] == ["p-a-seed3"]  # default seeds: the base's seed
    assert abl.runs[0].config.optimizer.lr == 0.01 and abl.runs[0].config.data.seq_len == TINY["data"]["seq_len"]


@pytest.mark.parametrize(("body", "key", "message"), [
    ({"variants": {"ar": {}, "bad": {"algorithms": {"token_mask": {"rate": 0.1}}}}}, "algorithms.token_mask",
     "(variant bad)"),
    ({"variants": {"ar": {"optimizer.lrr": 0.1}}}, "optimizer.lrr", "unknown key"),
    ({"grid": {"optimizer.lr": []}}, "grid.optimizer.lr", "empty axis"),
    ({"grid": {}}, "grid", "non-empty"),
    ({"variants": {}}, "variants", "empty"),
    ({"zip": {"optimizer.lr": [0.1, 0.2], "model.d_model": [32]}}, "zip", "equal lengths"),
    ({"grid": {"optimizer": [{"lr": 0.1}]}}, "grid.optimizer", "labels"),
    ({"variants": {"mask": {"algorithms": {"token_masking": {"rate": 2.0}}}}}, "algorithms.token_masking.rate",
     "(variant mask)"),
    ({"variantz": {}}, "variantz", "unknown key"),
    ({"seeds": []}, "seeds", "non-empty"),
    ({"variants": {"a": {"seed": 3}}}, "variants.a.seed", "set by the ablation runner"),
    ({"repetition": {"total_tokens": 100000, "unique_tokens": [30000]}}, "repetition.unique_tokens", "whole number"),
    ({"repetition": {"epochs": [2]}}, "repetition", "give unique_tokens and epochs"),
    ({"grid": {"a": {"key": "optimizer.lr", "values": [0.1]}, "b": {"key": "optimizer", "values": {"x": {}}}}},
     "grid/zip/repetition", "set the same value"),
    ({"variants": {"a": {"grid": {"model.d_model": [32, 32]}}}}, "variants.a.grid.model.d_model", "repeated"),
    ({"variants": {"x-1": {}, "x": {"grid": {"a": {"key": "seed", "values": {"1": 1}}}}}}, "variants", "same name"),
])
def test_bad_ablations_name_the_file_and_key_before_anything_runs(tmp_path, body, key, message):
    path = write_ablation(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        ablate.load_ablation(path)
    assert str(path) in str(info.value) and key in str(info.value) and message in str(info.value)


def test_smoke_errors(tmp_path):
    path = write_ablation(tmp_path, {"variants": {"a": {"optimizer.lr": 0.01}}})
    with pytest.raises(ConfigError, match="needs a smoke: block"):
        ablate.load_ablation(path, smoke=True)
    path = write_ablation(tmp_path, {"variants": {"a": {"optimizer.lr": 0.01}},
                                     "smoke": {"overrides": {"optimizer": {"lr": 0.1}}}})
    with pytest.raises(ConfigError, match=r"smoke.overrides.optimizer.lr: would overwrite optimizer.lr"):
        ablate.load_ablation(path, smoke=True)
    path = write_ablation(tmp_path, {"smoke": {"model": {"d_model": 32}}})
    with pytest.raises(ConfigError, match=r"smoke.model: unknown key"):
        ablate.load_ablation(path, smoke=True)


def test_unknown_only_variant_is_refused(tmp_path):
    path = write_ablation(tmp_path, {"variants": {"ar": {}, "mdm": {"objective.name": "mdm"}}})
    with pytest.raises(ConfigError, match=r"abl.yaml: --only: unknown variant 'mmd'; variants: ar, mdm"):
        ablate.load_ablation(path, only=["mmd"])
    assert ablate_command.run(cli_args(path, only=["ar,mdm"], dry_run=True)) == 0


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_ablations_expand_and_validate(path, smoke):
    abl = ablate.load_ablation(path, smoke=smoke)
    names = [r.name for r in abl.runs]
    assert abl.runs and len(set(names)) == len(names) and abl.name == path.stem
    if smoke:  # CPU-sized: tiny model, well under a million training tokens per run
        assert all(r.config.model.d_model <= 64 and ablate.planned_tokens(r.config) <= 131072 for r in abl.runs)
        assert all(r.config.data.tokenizer.vocab_size <= 512 for r in abl.runs)


def test_shipped_designs_match_the_papers():
    def variants(stem, smoke=False):
        return [v.name for v in ablate.load_ablation(REPO_ROOT / "ablations" / f"{stem}.yaml", smoke=smoke).variants]

    regs = ablate.load_ablation(REPO_ROOT / "ablations" / "regularizers.yaml")
    def kind(config) -> tuple:
        dropout = config.algorithms.dropout
        return (config.objective.name, bool(config.algorithms.token_masking), bool(dropout and dropout.mlp),
                bool(dropout and dropout.attention), bool(config.algorithms.weight_decay))

    assert {kind(r.config) for r in regs.runs} == {
        ("ar", False, False, False, False), ("ar", True, False, False, False), ("ar", False, True, False, False),
        ("ar", False, False, True, False), ("ar", False, False, False, True), ("mdm", False, False, False, False)}
    assert len({r.config.algorithms.token_masking.rate for r in regs.runs if r.config.algorithms.token_masking}) >= 3
    assert len({r.config.data.unique_tokens for r in regs.runs}) == 1
    rep = ablate.load_ablation(REPO_ROOT / "ablations" / "repetition.yaml")
    tokens = [ablate.planned_tokens(r.config) for r in rep.runs]
    assert max(tokens) / min(tokens) < 1.001  # equal compute, up to whole sequences per epoch
    assert {r.config.objective.name for r in rep.runs} == {"ar", "mdm"}
    dual = ablate.load_ablation(REPO_ROOT / "ablations" / "dual_ratio.yaml")
    assert {r.config.objective.dual.ar_fraction for r in dual.runs} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert len({r.variant.repetition for r in dual.runs}) >= 3
    samplers = ablate.load_ablation(REPO_ROOT / "ablations" / "time_sampling.yaml")
    assert {r.config.objective.diffusion.time_sampler.name for r in samplers.runs} >= {
        "uniform", "antithetic", "beta", "logit_normal", "truncated_normal"}
    replacement = ablate.load_ablation(REPO_ROOT / "ablations" / "token_masking_replacement.yaml")
    assert {r.config.algorithms.token_masking.replacement for r in replacement.runs
            if r.config.algorithms.token_masking} == {"mask", "zero", "random"}
    demo = variants("demo")
    assert {"ar", "mask", "mdm"} <= set(demo) and set(SMOKE_VARIANTS) <= set(variants("demo", smoke=True))


# --------------------------------------------------------------------------------------------------------------
# plan: skip, resume, refuse


def test_runner_skips_complete_resumes_failed_and_refuses_changed_configs(tmp_path, results_root, monkeypatch,
                                                                          capsys):
    path = write_ablation(tmp_path, {"name": "states", "variants": {"done": {}, "broken": {"optimizer.lr": 0.002},
                                                                    "fresh": {"optimizer.lr": 0.001}}})
    runs = {r.variant.name: r for r in ablate.load_ablation(path).runs}
    for name, status in (("done", "complete"), ("broken", "failed")):
        runs[name].run_dir.mkdir(parents=True)
        (runs[name].run_dir / "config.yaml").write_text(dump_config(runs[name].config))
        write_summary(runs[name].run_dir, status=status)

    calls = []

    def fake_train(config, run_dir=None, resume=False, extra_callbacks=(), log=print):
        calls.append((config.name, Path(run_dir), resume))
        return {"status": "complete", "best_ar_nll": 1.0}

    monkeypatch.setattr("workbench.train.train", fake_train)
    monkeypatch.setattr(ablate, "prepare_data", lambda runs, log=print: None)
    assert ablate_command.run(cli_args(path)) == 0
    plan = capsys.readouterr().out
    assert "complete" in plan and "resume (was failed)" in plan and "new" in plan
    assert calls == [("states-broken-seed7", runs["broken"].run_dir, True),
                     ("states-fresh-seed7", runs["fresh"].run_dir, True)]
    record = json.loads((runs["fresh"].run_dir / ablate.VARIANT_FILE).read_text())
    assert record["variant"] == "fresh" and record["seed"] == 7 and record["overrides"] == {"optimizer": {"lr": 0.001}}
    assert (runs["done"].run_dir / ablate.VARIANT_FILE).is_file()

    # the file changes one variant whose folder already holds results: refused, and nothing else runs either
    calls.clear()
    (runs["fresh"].run_dir / "config.yaml").write_text(dump_config(runs["fresh"].config))
    write_summary(runs["fresh"].run_dir, status="complete")
    path.write_text(path.read_text().replace("0.001", "0.0005"))
    assert ablate_command.run(cli_args(path)) == 2
    captured = capsys.readouterr()
    assert "CHANGED" in captured.out and "different config" in captured.err
    assert str(runs["fresh"].run_dir) in captured.err
    assert calls == []


def test_estimate_uses_measured_throughput_then_a_probe(tmp_path, results_root):
    path = write_ablation(tmp_path, {"name": "speed", "variants": {"a": {}, "b": {"optimizer.lr": 0.001}}})
    abl = ablate.load_ablation(path)
    ablate.assess(abl.runs)
    seconds, source = ablate.estimate(abl, results_root, parallel=2)  # as for --parallel 2: one thread per run
    assert "probe" in source and all(s > ablate.STARTUP_S for s in seconds.values())

    writer = MetricsWriter(abl.runs[0].run_dir, {})
    for step, value in enumerate([1000.0, 3000.0, 2000.0]):
        writer.add(run="x", step=step, epoch=0.0, tokens_seen=0, unique_tokens=1, split="train",
                   metric="tokens_per_s", value=value, wall_time=0.0)
    writer.flush()
    seconds, source = ablate.estimate(abl, results_root, parallel=1)
    assert source == f"median of 3 'tokens_per_s' rows in {results_root / 'speed'}"
    config = abl.runs[1].config  # 2 epochs of 32768 tokens at 2000 tokens/s, 2 validation passes of 8192 tokens
    assert seconds[abl.runs[1].name] == pytest.approx(65536 / 2000 + 2 * 8192 / (3 * 2000) + ablate.STARTUP_S)
    assert ablate.planned_epochs(config) == 2
    text = ablate.format_plan(abl, seconds, source, 1)
    assert "2 runs (2 variants x 1 seeds), 131k training tokens" in text and "estimated time: 1m" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_devices_are_checked_against_the_machine(tmp_path):
    path = write_ablation(tmp_path, {"variants": {"ar": {}}})
    with pytest.raises(ConfigError, match=r"--devices: '0,1': this machine has 0 CUDA device\(s\)"):
        ablate_command.run(cli_args(path, devices="0,1"))
    with pytest.raises(ConfigError, match="--nproc: processes per run need --launcher composer"):
        ablate_command.run(cli_args(path, nproc=2))


def test_slots_split_cpus_and_gpus():
    assert [s.threads for s in ablate.make_slots(2, None, "none", 1)] in ([1, 1], [2, 2], [4, 4], [8, 8])
    gpus = ablate.make_slots(1, ["0", "1", "2"], "none", 1)
    assert [s.devices for s in gpus] == [["0"], ["1"], ["2"]]
    groups = ablate.make_slots(1, ["0", "1", "2", "3"], "composer", 2)
    assert [(s.devices, s.nproc) for s in groups] == [(["0", "1"], 2), (["2", "3"], 2)]
    assert len({s.port for s in groups}) == 2
    run = ablate.PlannedRun("a", ablate.Variant("v", "v", None, {}, {}), 0, None, Path("/r/a/v/seed0"))  # type: ignore[arg-type]
    command = ablate.subprocess_command(run, groups[0], "composer")
    assert command[1:5] == ["-m", "composer.cli", "-n", "2"] and command[-5:] == [
        "train", "/r/a/v/seed0/config.yaml", "--run-dir", "/r/a/v/seed0", "--resume"]


# --------------------------------------------------------------------------------------------------------------
# end to end (shared with the analysis and notebook tests)


@pytest.mark.slow
def test_smoke_ablation_runs_end_to_end_and_skips_completed_runs(capsys):
    root, output, _ = smoke_results()
    assert "3 runs (3 variants x 1 seeds)" in output and "3/3 runs finished" in output
    for variant in SMOKE_VARIANTS:
        run_dir = root / variant / "seed0"
        summary = read_summary(run_dir)
        assert summary["status"] == "complete" and summary["epochs"] == 3
        record = json.loads((run_dir / ablate.VARIANT_FILE).read_text())
        assert record["ablation"] == "demo" and record["variant"] == variant and record["smoke"] is True
        config = load_run_config(run_dir / "config.yaml")
        assert config.name == f"demo-{variant}-seed0"  # the expanded config that `workbench train` ran
        metrics = pl.read_parquet(run_dir / "metrics.parquet")
        assert metrics.filter(pl.col("split") == "val")["step"].n_unique() == 7  # entropy row + 6 evaluations
        assert (run_dir / "checkpoints" / "train.log").is_file()
    mtime = (root / "ar" / "seed0" / "metrics.parquet").stat().st_mtime_ns
    args = cli_args(Path(str(REPO_ROOT / "ablations" / "demo.yaml")), smoke=True, only=list(SMOKE_VARIANTS))
    assert ablate_command.run(args) == 0
    assert "all 3 runs are complete; nothing to do" in capsys.readouterr().out
    assert (root / "ar" / "seed0" / "metrics.parquet").stat().st_mtime_ns == mtime


def test_progress_after_each_run_and_a_closing_table_of_best_values(tmp_path, results_root, monkeypatch, capsys):
    path = write_ablation(tmp_path, {"name": "prog", "variants": {"a": {}, "b": {"optimizer.lr": 0.001},
                                                                  "c": {"optimizer.lr": 0.002}}})
    values = iter([3.25, 2.5, 4.0])

    def fake_train(config, run_dir=None, resume=False, extra_callbacks=(), log=print):
        summary = {"status": "complete", "best_ar_nll": next(values), "best_ar_ppl": 1.0}
        write_summary(run_dir, **summary)
        return summary

    monkeypatch.setattr("workbench.train.train", fake_train)
    monkeypatch.setattr(ablate, "prepare_data", lambda runs, log=print: None)
    monkeypatch.setattr(ablate.runner, "format_seconds", lambda s: "T")  # elapsed and estimates: one token
    monkeypatch.setattr(ablate, "estimate", lambda abl, root, parallel, probe=True: (
        {r.name: 60.0 for r in abl.runs}, "test"))
    assert ablate_command.run(cli_args(path)) == 0
    out = capsys.readouterr().out
    assert "[ablate] 1/3 runs done; T elapsed; about T left" in out
    assert "[ablate] 3/3 runs done; T elapsed" in out and "3/3 runs done; T elapsed; about" not in out
    table = out[out.index("3/3 runs finished"):].splitlines()[1:]
    assert table[0].split() == ["variant", "seed", "status", "by", "best_ar_nll"]
    assert [row.split() for row in table[1:4]] == [["a", "7", "complete", "here", "3.2500"],
                                                  ["b", "7", "complete", "here", "2.5000"],
                                                  ["c", "7", "complete", "here", "4.0000"]]


def test_remaining_estimate_scales_with_how_runs_finished_against_their_estimates():
    progress = ablate.runner.Progress(3, {"a": 10.0, "b": 10.0, "c": 20.0}, concurrency=1)
    outcome = ablate.Outcome()
    progress.running["a"] = progress.start - 20.0  # run a took twice its estimate
    outcome.here.append("a")
    line = progress.line("a", outcome)
    assert line.endswith("about 1m00s left")  # (10 + 20) x 2
