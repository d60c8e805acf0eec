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
