"""End to end on real Wikipedia text: prep -> train AR and MDM tiny models for several epochs."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from workbench.cli import main
from workbench.results import SCHEMA, read_metrics, read_summary
from workbench.train import RunExistsError, train


@pytest.mark.parametrize("objective,metric", [("ar", "ar_nll"), ("mdm", "mdm_nelbo")])
def test_training_lowers_validation_loss_and_writes_tidy_metrics(tiny_config, results_root, objective, metric):
    config = tiny_config({"name": f"train-{objective}", "objective": {"name": objective},
                          "trainer": {"max_duration": "3ep"}})
    summary = train(config)
    run_dir = results_root / config.name
    frame = read_metrics(run_dir / "metrics.parquet")
    assert dict(frame.schema) == SCHEMA
    val = frame.filter((pl.col("split") == "val") & (pl.col("metric") == metric)).sort("step")
    assert val["epoch"].to_list() == [1.0, 2.0, 3.0]  # one evaluation per epoch, epochs are exact passes
    assert val["tokens_seen"].to_list() == [k * summary["unique_tokens"] for k in (1, 2, 3)]
    assert val["value"][-1] < val["value"][0]
    baseline = frame.filter(pl.col("metric") == "unigram_entropy")
    assert baseline.height == 1 and 3.0 < baseline["value"][0] < 7.0  # log(512) = 6.2 bounds a 512-token BPE
    train_loss = frame.filter((pl.col("split") == "train") & (pl.col("metric") == "loss"))
    assert train_loss.height >= 5 and train_loss["value"].is_finite().all()
    assert summary["status"] == "complete" and summary["epochs"] == 3
    assert summary[f"best_{metric}"] == pytest.approx(val["value"].min())
    assert (run_dir / "checkpoints" / "latest-rank0.pt").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["objective"]["name"] == objective
    # a completed run is not trained again; a changed config under the same name is refused
    assert train(config)["status"] == "complete"
    changed = tiny_config({"name": config.name, "objective": {"name": objective}, "optimizer": {"lr": 0.001}})
    with pytest.raises(RunExistsError, match="different config"):
        train(changed, resume=True)


def test_cli_check_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("name: cli-check\nobjective: {name: mdm}\n")
    assert main(["train", str(path), "--check", "data.seq_len=256"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["seq_len"] == 256 and resolved["objective"]["diffusion"]["shifted"] is False


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("name: bad\nmodel: {n_layrs: 3}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: model.n_layrs: unknown key" in err and "n_layers" in err


def test_missing_validation_split_fails_before_anything_is_written(tiny_config, results_root):
    from datasets_prep.corpus import CorpusError

    config = tiny_config({"name": "no-val", "data": {"val_split": "valid"}})
    with pytest.raises(CorpusError, match=r"no split 'valid'.*validation"):
        train(config)
    assert not (results_root / "no-val").exists()
    assert read_summary(results_root / "no-val") is None


@pytest.mark.parametrize("every_s,most", [(3600.0, 6), (0.0, 40)])
def test_metrics_file_is_rewritten_at_evaluations_and_every_few_seconds(tiny_config, results_root, monkeypatch,
                                                                       every_s, most):
    """Each rewrite of metrics.parquet costs time proportional to all rows so far; at every log interval that grows
    into milliseconds per step on a long run. Between evaluations it happens at most every ``flush_every_s``."""
    from workbench.callbacks import TidyMetricsLogger
    from workbench.results import MetricsWriter

    writes = []
    original = MetricsWriter.flush
    monkeypatch.setattr(MetricsWriter, "flush", lambda self: (self._dirty and writes.append(len(self.rows)),
                                                              original(self))[1])
    monkeypatch.setattr(TidyMetricsLogger, "flush_every_s", every_s)
    config = tiny_config({"name": f"flushes-{every_s:g}", "trainer": {"max_duration": "40ba", "log_interval": 1},
                          "eval": {"interval": "20ba"}})
    train(config)
    assert (len(writes) <= most) if every_s else (len(writes) >= most)
    frame = read_metrics(results_root / config.name / "metrics.parquet")
    assert frame.height == writes[-1] and frame.filter(pl.col("metric") == "loss").height == 40


def test_a_failed_run_keeps_every_row_it_logged(tiny_config, tmp_path):
    """Between evaluations the metrics file is rewritten only every few seconds; a run stopped by an exception or
    Ctrl-C still writes the rows it logged (found by a hostile review: the file ended at the last evaluation)."""
    from composer.core import Callback

    class Interrupt(Callback):
        def batch_end(self, state, logger) -> None:
            if int(state.timestamp.batch) == 12:
                raise KeyboardInterrupt("user pressed Ctrl-C")

    config = tiny_config({"name": "interrupted", "eval": {"interval": "1ep"},
                          "trainer": {"max_duration": "2ep", "log_interval": 2, "checkpoint_interval": "1ep"}})
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=tmp_path / "run", extra_callbacks=[Interrupt()])
    frame = read_metrics(tmp_path / "run" / "metrics.parquet")
    # step 12 interrupted before the logger saw it (loggers run after callbacks at BATCH_END)
    assert frame.filter(pl.col("metric") == "loss")["step"].to_list() == [2, 4, 6, 8, 10]
