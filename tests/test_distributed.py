"""Data-parallel training through Composer's own launcher (``python -m composer.cli -n 2``, gloo on CPU): the same
run config gives the same validation curve as one process, because the global batch is split over the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import polars as pl
import pytest
import yaml

from workbench.paths import REPO_ROOT
from workbench.results import read_metrics, read_summary
from workbench.train import train


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _val_curve(run_dir) -> list[tuple[int, float]]:
    frame = read_metrics(run_dir / "metrics.parquet")
    rows = frame.filter((pl.col("split") == "val") & (pl.col("metric") == "ar_nll")).sort("step")
    return list(zip(rows["tokens_seen"].to_list(), rows["value"].to_list()))


@pytest.mark.slow
def test_two_rank_ddp_run_matches_the_single_process_curve(tiny_config, results_root, tmp_path):
    single = tiny_config({"name": "ddp-single", "trainer": {"max_duration": "2ep"}})
    train(single)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump({**single.to_dict(), "name": "ddp-two-ranks"}))
    run_dir = results_root / "ddp-two-ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "composer.cli", "-n", "2", "--master_port", str(_free_port()), "-m", "workbench.cli",
         "train", str(config_path), "--run-dir", str(run_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_summary(run_dir)["status"] == "complete"
    two_ranks, one = _val_curve(run_dir), _val_curve(results_root / "ddp-single")
    assert [tokens for tokens, _ in two_ranks] == [tokens for tokens, _ in one] == [32768, 65536]
    for (_, a), (_, b) in zip(two_ranks, one):
        assert a == pytest.approx(b, abs=1e-4)  # same global batches; only the gradient all-reduce order differs
