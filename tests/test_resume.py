"""A stopped run resumed from its latest (mid-epoch) checkpoint continues exactly like the uninterrupted run."""

from __future__ import annotations

import polars as pl
import pytest
from composer.core import Callback

from workbench.results import read_metrics, read_summary
from workbench.train import RunExistsError, train


class CrashAt(Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("simulated crash")


def _losses(run_dir) -> pl.DataFrame:
    frame = read_metrics(run_dir / "metrics.parquet")
    return frame.filter(pl.col("split").is_in(["train", "val"]) & pl.col("metric").is_in(["loss", "ar_nll",
                                                                                          "mdm_nelbo"]))


@pytest.mark.parametrize("objective", [
    {"name": "ar"},
    {"name": "dual", "dual": {"ar_fraction": 0.5, "mode": "sequences"}},
])
def test_resume_mid_epoch_matches_uninterrupted(tiny_config, results_root, objective):
    overrides = {"objective": objective, "trainer": {"log_interval": 1, "checkpoint_interval": "5ba"},
                 "algorithms": {"token_masking": {"max_rate": 0.5}, "dropout": {"mlp": 0.1}}}
    config = tiny_config(overrides | {"name": f"straight-{objective['name']}"})
    train(config)
    straight = _losses(results_root / config.name)

    config = tiny_config(overrides | {"name": f"crashed-{objective['name']}"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, extra_callbacks=[CrashAt(13)])  # 32 batches per epoch; the last checkpoint is at 10
    assert read_summary(results_root / config.name)["status"] == "failed"
    with pytest.raises(RunExistsError, match="--resume"):
        train(config)
    train(config, resume=True)
    resumed = _losses(results_root / config.name)

    assert read_summary(results_root / config.name)["status"] == "complete"
    columns = ["step", "tokens_seen", "split", "metric", "value"]
    assert resumed.select(columns).sort(["step", "split", "metric"]).equals(
        straight.select(columns).sort(["step", "split", "metric"]))


def test_hard_killed_training_process_keeps_its_rows_and_resumes(tiny_config, results_root, tmp_path):
    """SIGKILL a real `workbench train` process mid-run: metrics.parquet stays readable, resume completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tiny_config({"name": "killed", "trainer": {"max_duration": "3ep", "log_interval": 2,
                                                       "checkpoint_interval": "8ba"}})
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    run_dir = results_root / "killed"
    process = subprocess.Popen([sys.executable, "-m", "workbench.cli", "train", str(path)], env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until a checkpoint exists and training has gone past it
            checkpoint = run_dir / "checkpoints" / "latest-rank0.pt"
            frame = read_metrics(run_dir / "metrics.parquet") if (run_dir / "metrics.parquet").exists() else None
            if checkpoint.exists() and frame is not None and frame["step"].max() >= 18:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the training process made no progress")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = read_metrics(run_dir / "metrics.parquet")
    assert before is not None and before["step"].max() >= 16
    assert read_summary(run_dir)["status"] == "running"  # killed: it never got to say otherwise
    summary = train(config, resume=True)
    after = read_metrics(run_dir / "metrics.parquet")
    assert summary["status"] == "complete" and summary["epochs"] == 3
    losses = after.filter((pl.col("split") == "train") & (pl.col("metric") == "loss"))
    assert losses["step"].to_list() == list(range(2, 97, 2))  # no step lost, none duplicated
