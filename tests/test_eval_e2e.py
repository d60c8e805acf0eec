"""End to end: downstream tasks evaluated inside training (rows in metrics.parquet), ``workbench eval`` on the
checkpoint reproducing them, and ``workbench generate`` for an AR and a masked-diffusion run."""

from __future__ import annotations

import json

import polars as pl
import pytest

from workbench.cli import main
from workbench.results import read_metadata, read_metrics
from workbench.train import train

AR_TASKS = ["hellaswag", "winogrande", "lambada_openai"]
SHORT = {"max_duration": "16ba", "checkpoint_interval": "16ba"}  # half an epoch of the tiny corpus
WARMUP = {"warmup": "2ba"}


def _ar_config(tiny_config):
    return tiny_config({"name": "e2e-ar", "trainer": SHORT, "scheduler": WARMUP,
                        "eval": {"downstream": {"tasks": AR_TASKS, "limit": 12, "interval": "8ba"}}})


def _rows(path, splits) -> pl.DataFrame:
    frame = read_metrics(path)
    assert frame is not None, path
    return frame.filter(pl.col("split").is_in(splits)).sort(["step", "split", "metric"])


def test_ar_run_reports_tasks_and_standalone_eval_reproduces_them(tiny_config, results_root, tmp_path, capsys):
    config = _ar_config(tiny_config)
    train(config)
    run_dir = results_root / config.name
    rows = _rows(run_dir / "metrics.parquet", AR_TASKS)
    assert sorted(rows["step"].unique().to_list()) == [8, 16]  # eval.downstream.interval, not eval.interval (1ep)
    for task in AR_TASKS:
        metrics = set(rows.filter((pl.col("split") == task) & (pl.col("step") == 16))["metric"].to_list())
        expected = {"acc", "stderr", "elbo_stderr", "truncated"} | ({"ppl"} if task == "lambada_openai" else
                                                                   {"acc_norm", "acc_bytes"})
        assert metrics == expected, task
    acc = rows.filter(pl.col("metric").is_in(["acc", "acc_norm"]))["value"]
    assert ((acc >= 0) & (acc <= 1)).all() and (rows.filter(pl.col("metric") == "elbo_stderr")["value"] == 0).all()
    assert rows.filter(pl.col("metric") == "ppl")["value"].min() > 1

    # the run's own settings (same items, scorer, seed) on its final checkpoint: the same numbers
    assert main(["eval", str(run_dir)]) == 0
    standalone = _rows(run_dir / "downstream.parquet", AR_TASKS)
    final = rows.filter(pl.col("step") == 16)
    assert standalone["step"].unique().to_list() == [16]
    assert standalone.select("split", "metric").equals(final.select("split", "metric"))
    assert standalone["value"].to_list() == pytest.approx(final["value"].to_list(), rel=1e-6, abs=1e-9)
    assert standalone["tokens_seen"].unique().to_list() == final["tokens_seen"].unique().to_list()
    assert read_metadata(run_dir / "downstream.parquet")["downstream"]["hellaswag"]["scorer"] == "ar"

    out = tmp_path / "piqa.parquet"
    checkpoint = run_dir / "checkpoints" / "latest-rank0.pt"
    assert main(["eval", str(checkpoint), "--tasks", "piqa", "--limit", "6", "--scorer", "ar", "--out", str(out)]) == 0
    piqa = _rows(out, ["piqa"])
    assert set(piqa["metric"].to_list()) == {"acc", "acc_norm", "acc_bytes", "stderr", "truncated"}
    assert main(["eval", str(checkpoint), "--tasks", "copa", "--limit", "4", "--out", str(out)]) == 0
    assert set(_rows(out, ["piqa", "copa"])["split"].to_list()) == {"piqa", "copa"}  # the file accumulates
    capsys.readouterr()

    assert main(["eval", str(tmp_path / "missing-run")]) == 2
    assert "missing-run: no such run folder" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--tasks", "hellaswag,squad"]) == 2
    assert "unknown task 'squad'" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--tasks", "copa", "--limit", "2", "--scorer", "mc-elbo"]) == 2
    assert "needs a masked-diffusion model" in capsys.readouterr().err

    samples = tmp_path / "samples.jsonl"
    assert main(["generate", str(run_dir), "--num-samples", "3", "--length", "20", "--ppl-model", str(run_dir),
                 "--top-p", "0.95", "--out", str(samples)]) == 0
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 3 and all(len(line["tokens"]) == 19 and line["text"] for line in lines)
    generated = _rows(run_dir / "downstream.parquet", ["generate_ar"])
    values = dict(zip(generated["metric"].to_list(), generated["value"].to_list()))
    assert set(values) == {"entropy", "forwards", "gen_ppl"} and values["gen_ppl"] > 1 and values["entropy"] > 0


def test_mdm_run_scores_with_the_elbo_and_samples_by_unmasking(tiny_config, results_root, tmp_path, capsys):
    ar_config = _ar_config(tiny_config)
    train(ar_config)  # returns at once when the AR test already trained it
    config = tiny_config({"name": "e2e-mdm", "objective": {"name": "mdm"}, "trainer": SHORT, "scheduler": WARMUP,
                          "eval": {"downstream": {"tasks": ["piqa", "lambada_openai"], "limit": 6, "samples": 4}}})
    train(config)
    run_dir = results_root / config.name
    rows = _rows(run_dir / "metrics.parquet", ["piqa", "lambada_openai"])
    assert rows["step"].unique().to_list() == [16]  # eval.interval 1ep: evaluated at the end of training
    elbo_stderr = rows.filter(pl.col("metric") == "elbo_stderr")["value"]
    assert len(elbo_stderr) == 2 and (elbo_stderr > 0).all()  # auto -> mc-elbo for an mdm model

    out = tmp_path / "chain.parquet"
    assert main(["eval", str(run_dir), "--tasks", "piqa", "--limit", "4", "--scorer", "chain", "--out", str(out)]) == 0
    assert set(_rows(out, ["piqa"])["metric"].to_list()) == {"acc", "acc_norm", "acc_bytes", "stderr", "truncated"}
    assert main(["eval", str(run_dir), "--tasks", "copa", "--limit", "2", "--scorer", "ar"]) == 2
    assert "needs a model trained with next-token prediction" in capsys.readouterr().err

    assert main(["generate", str(run_dir), "--num-samples", "2", "--length", "24", "--steps", "40", "--prompt",
                 "The", "--ppl-model", str(results_root / ar_config.name)]) == 0
    printed = capsys.readouterr().out
    assert "generative perplexity under e2e-ar" in printed and "mode mdm, 40 steps (cached)" in printed
    generated = _rows(run_dir / "downstream.parquet", ["generate_mdm_T40"])
    values = dict(zip(generated["metric"].to_list(), generated["value"].to_list()))
    assert values["gen_ppl"] > 1 and values["forwards"] < 40  # the cached sampler skips unchanged steps
    assert main(["generate", str(run_dir), "--mode", "ar"]) == 2
    assert "use --mode mdm" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--num-samples", "1", "--ppl-model", str(run_dir)]) == 2
    assert "needs an AR model" in capsys.readouterr().err


def test_downstream_evaluation_leaves_training_randomness_untouched(tiny_config, results_root):
    """Token masks and dropout after an evaluation are the ones a run without tasks draws: evaluating must not
    consume the global RNG (a DataLoader iterator without its own generator does)."""
    common = {"trainer": {**SHORT, "log_interval": 1}, "scheduler": WARMUP,
              "algorithms": {"token_masking": {"rate": 0.3}, "dropout": {"mlp": 0.2}}}
    plain = tiny_config({"name": "rng-plain", **common})
    tasks = tiny_config({"name": "rng-tasks", **common,
                         "eval": {"downstream": {"tasks": ["copa"], "limit": 4, "interval": "4ba"}}})
    losses = []
    for config in (plain, tasks):
        train(config)
        frame = read_metrics(results_root / config.name / "metrics.parquet")
        losses.append(frame.filter((pl.col("split") == "train") & (pl.col("metric") == "loss")).sort("step")["value"])
    assert losses[0].len() == 16
    assert losses[0].to_list() == losses[1].to_list()  # bit-identical: evaluations at steps 4, 8, 12 changed nothing
