"""A stopped run resumed from its latest checkpoint continues exactly like the uninterrupted run: mid-epoch, at an
``Nep`` checkpoint (saved after the epoch's evaluation) and at a token interval that lands on an epoch's last batch
(saved before it)."""

from __future__ import annotations

import polars as pl
import pytest
from composer.core import Callback

from workbench.results import read_metrics, read_summary
from workbench.train import RunExistsError, train

# tiny config: 32 batches per epoch, 2 epochs
OBJECTIVES = {
    "ar": {},
    "ar-masking-dropout": {"algorithms": {"token_masking": {"max_rate": 0.5}, "dropout": {"mlp": 0.1}}},
    "mdm": {"objective": {"name": "mdm"}},
    "dual": {"objective": {"name": "dual", "dual": {"ar_fraction": 0.5, "mode": "sequences"}},
             "algorithms": {"dropout": {"mlp": 0.1}}},
}
COLUMNS = ["step", "epoch", "tokens_seen", "unique_tokens", "split", "metric", "value"]
_straight: dict[str, pl.DataFrame] = {}


class CrashAt(Callback):
    """Raises at the end of a batch, before that batch's checkpoint: what is on disk is what a SIGKILL at that
    moment leaves (Composer saves nothing on the way out)."""

    def __init__(self, batch: int):
        self.batch = batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("simulated crash")


def _rows(run_dir) -> pl.DataFrame:
    """Every metrics row but the throughput and wall clock (which differ between any two runs)."""
    frame = read_metrics(run_dir / "metrics.parquet")
    return frame.filter(pl.col("metric") != "tokens_per_s").select(COLUMNS).sort(["step", "split", "metric"])


def _config(tiny_config, objective: str, name: str, checkpoint_interval: str):
    return tiny_config(OBJECTIVES[objective] | {
        "name": name, "trainer": {"log_interval": 1, "checkpoint_interval": checkpoint_interval}})


def _uninterrupted(tiny_config, results_root, objective: str) -> pl.DataFrame:
    """The uninterrupted run's rows, trained once per objective (the checkpoint cadence changes no number)."""
    if objective not in _straight:
        config = _config(tiny_config, objective, f"straight-{objective}", "1ep")
        train(config)
        _straight[objective] = _rows(results_root / config.name)
    return _straight[objective]


def _crash_and_resume(config, results_root, crash_at: int, checkpoint_batch: int) -> pl.DataFrame:
    run_dir = results_root / config.name
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, extra_callbacks=[CrashAt(crash_at)])
    assert read_summary(run_dir)["status"] == "failed"
    assert f"-ba{checkpoint_batch}-" in (run_dir / "checkpoints" / "latest-rank0.pt").resolve().name
    with pytest.raises(RunExistsError, match="--resume"):
        train(config)
    train(config, resume=True)
    assert read_summary(run_dir)["status"] == "complete"
    resumed = _rows(run_dir)
    assert not resumed.select(["step", "split", "metric"]).is_duplicated().any()
    return resumed


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_resume_mid_epoch_matches_uninterrupted(tiny_config, results_root, objective):
    straight = _uninterrupted(tiny_config, results_root, objective)
    config = _config(tiny_config, objective, f"crashed-mid-{objective}", "5ba")
    resumed = _crash_and_resume(config, results_root, crash_at=13, checkpoint_batch=10)
    assert resumed.equals(straight)


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("interval", ["1ep", "32768tok"])
def test_resume_at_epoch_boundary_matches_uninterrupted(tiny_config, results_root, objective, interval):
    """``1ep`` saves at EPOCH_CHECKPOINT (after the epoch's evaluation); 32768 tokens, one epoch, saves at the
    epoch's last BATCH_CHECKPOINT (before it). Either way the resumed run trains epoch 2 on epoch 2's shuffle,
    with the uninterrupted run's masks, times and dropout, and evaluates epoch 1 exactly once."""
    straight = _uninterrupted(tiny_config, results_root, objective)
    config = _config(tiny_config, objective, f"crashed-{interval}-{objective}", interval)
    resumed = _crash_and_resume(config, results_root, crash_at=36, checkpoint_batch=32)
    assert resumed.equals(straight)


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


def test_checkpoint_written_before_the_epoch_boundary_fix_resumes_exactly(tiny_config, results_root):
    """A run interrupted under the old code holds Streaming's own epoch-end state ("the finished epoch, sample 0",
    no marker); resuming it with this code still trains the next epoch on its own shuffle."""
    import torch

    from workbench.data import TokenShards

    straight = _uninterrupted(tiny_config, results_root, "ar")
    config = _config(tiny_config, "ar", "crashed-old-format", "1ep")
    run_dir = results_root / config.name
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, extra_callbacks=[CrashAt(36)])
    path = (run_dir / "checkpoints" / "latest-rank0.pt").resolve()
    payload = torch.load(path, weights_only=False)
    dataset_state = payload["state"]["dataset_state"]["train"]
    assert dataset_state["epoch"] == 1 and dataset_state["sample_in_epoch"] == 0  # the second epoch, from its start
    del dataset_state[TokenShards.BOUNDARY_KEY]
    dataset_state["epoch"] = 0  # what Streaming recorded on its own
    torch.save(payload, path)
    train(config, resume=True)
    assert _rows(run_dir).equals(straight)


def test_resume_from_a_checkpoint_inside_a_log_interval_logs_the_whole_intervals_mean(tiny_config, results_root):
    """Checkpoints every 5 batches, a train-loss row every 2: the row at step 6 averages steps 5 and 6, one before
    the checkpoint and one after (found by a hostile review: the resumed run averaged step 6 alone)."""
    settings = {"trainer": {"max_duration": "1ep", "log_interval": 2, "checkpoint_interval": "5ba"}}
    straight = tiny_config({**settings, "name": "interval-straight"})
    train(straight)
    config = tiny_config({**settings, "name": "interval-resumed"})
    resumed = _crash_and_resume(config, results_root, crash_at=8, checkpoint_batch=5)
    expected = _rows(results_root / straight.name)
    assert resumed.drop("value").equals(expected.drop("value"))
    assert resumed["value"].to_list() == expected["value"].to_list()  # bit for bit
