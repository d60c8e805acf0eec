"""Faults in a stored run met by ``workbench train RUN.yaml --resume`` and ``workbench eval``: a truncated
checkpoint, a ``latest`` link to a deleted file, a truncated ``metrics.parquet`` in an interrupted and in a complete
run. Each either continues from what is intact and says so in one line, or exits 2 with one line naming the file;
nothing is silently retrained from step 0 and no row is silently lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from composer.core import Callback
from conftest import make_config

from workbench.cli import main
from workbench.results import read_metrics, read_summary
from workbench.train import train

# 32 batches per epoch, 2 epochs; checkpoints every 16 batches, two kept: the crash at 40 leaves ba16 and ba32
SETTINGS = {"trainer": {"log_interval": 4, "checkpoint_interval": "16ba", "keep_checkpoints": 2}}
LOSS_STEPS = list(range(4, 65, 4))


class CrashAt(Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, Path]:
    """An interrupted run (checkpoints at batches 16 and 32, killed at 40) and a complete one, trained once."""
    root = tmp_path_factory.mktemp("stored")
    config = make_config(SETTINGS | {"name": "faults"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run_dir=root / "interrupted", extra_callbacks=[CrashAt(40)])
    train(config, run_dir=root / "complete")
    (root / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return {"interrupted": root / "interrupted", "complete": root / "complete", "yaml": root / "run.yaml"}


def _copy(stored: dict[str, Path], which: str, tmp_path: Path) -> Path:
    target = tmp_path / which
    shutil.copytree(stored[which], target, symlinks=True, ignore=shutil.ignore_patterns(".claim*"))
    return target


def _checkpoint(run_dir: Path, batch: int) -> Path:
    (path,) = (run_dir / "checkpoints").glob(f"ep*-ba{batch}-rank0.pt")
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resume(stored: dict[str, Path], run_dir: Path, capsys) -> tuple[int, str, str]:
    code = main(["train", str(stored["yaml"]), "--resume", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(code: int, err: str, *names: str) -> str:
    """Exit 2 with one 'error:' line that names each of ``names``, and no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(name in lines[0] for name in names), err
    return lines[0]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / "metrics.parquet", run_dir / "summary.json")}


def _complete_with_every_row(run_dir: Path) -> None:
    assert read_summary(run_dir)["status"] == "complete"
    frame = read_metrics(run_dir / "metrics.parquet")
    losses = frame.filter((pl.col("split") == "train") & (pl.col("metric") == "loss"))
    assert losses["step"].to_list() == LOSS_STEPS  # none lost, none duplicated
    val = frame.filter((pl.col("split") == "val") & (pl.col("metric") == "ar_nll"))
    assert val["step"].sort().to_list() == [32, 64]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(stored, tmp_path, capsys):
    run_dir = _copy(stored, "interrupted", tmp_path)
    latest = _checkpoint(run_dir, 32)
    _truncate(latest)
    code, out, err = _resume(stored, run_dir, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "previous kept checkpoint" in line]
    assert str(latest) in line and "unreadable checkpoint" in line and str(_checkpoint(run_dir, 16)) in line
    _complete_with_every_row(run_dir)


def test_truncated_checkpoint_without_an_earlier_one_is_refused_naming_it(stored, tmp_path, capsys):
    run_dir = _copy(stored, "interrupted", tmp_path)
    _checkpoint(run_dir, 16).unlink()
    latest = _checkpoint(run_dir, 32)
    _truncate(latest)
    before = _snapshot(run_dir)
    code, out, err = _resume(stored, run_dir, capsys)
    _refused(code, err, str(latest), "unreadable checkpoint")
    assert _snapshot(run_dir) == before and "[prep]" not in out


def test_latest_link_to_a_deleted_checkpoint_falls_back_and_says_so(stored, tmp_path, capsys):
    run_dir = _copy(stored, "interrupted", tmp_path)
    deleted = _checkpoint(run_dir, 32)
    deleted.unlink()
    code, out, err = _resume(stored, run_dir, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "previous kept checkpoint" in line]
    assert "latest-rank0.pt" in line and str(deleted) in line and "no longer exists" in line
    _complete_with_every_row(run_dir)


def test_latest_link_to_a_deleted_checkpoint_never_retrains_from_step_0(stored, tmp_path, capsys):
    run_dir = _copy(stored, "interrupted", tmp_path)
    for batch in (16, 32):
        _checkpoint(run_dir, batch).unlink()
    before = _snapshot(run_dir)
    code, _out, err = _resume(stored, run_dir, capsys)
    _refused(code, err, str(run_dir / "checkpoints" / "latest-rank0.pt"), "no longer exists")
    assert _snapshot(run_dir) == before


def test_truncated_metrics_of_an_interrupted_run_are_rebuilt_from_the_checkpoint(stored, tmp_path, capsys):
    run_dir = _copy(stored, "interrupted", tmp_path)
    _truncate(run_dir / "metrics.parquet")
    code, out, err = _resume(stored, run_dir, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "rebuilt" in line]
    assert str(run_dir / "metrics.parquet") in line and "up to step 32" in line
    _complete_with_every_row(run_dir)
    resumed = read_metrics(run_dir / "metrics.parquet").filter(pl.col("metric") != "tokens_per_s")
    uninterrupted = read_metrics(stored["complete"] / "metrics.parquet").filter(pl.col("metric") != "tokens_per_s")
    columns = ["step", "split", "metric", "value"]
    assert resumed.select(columns).sort(columns).equals(uninterrupted.select(columns).sort(columns))


def test_metrics_killed_before_their_flush_get_the_checkpoints_rows_back(stored, tmp_path, capsys):
    """The tidy logger rewrites metrics.parquet at most every few seconds between evaluations: a run killed after a
    checkpoint and before the next rewrite leaves a readable file without rows the checkpoint holds."""
    run_dir = _copy(stored, "interrupted", tmp_path)
    path = run_dir / "metrics.parquet"
    frame = read_metrics(path)
    assert frame is not None and frame["step"].max() >= 32
    frame.filter(pl.col("step") <= 16).write_parquet(path)  # as flushed last at step 16; checkpoint at 32
    code, out, err = _resume(stored, run_dir, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "rebuilt" in line]
    assert "stale" in line and "up to step 32" in line
    _complete_with_every_row(run_dir)


def test_killed_runs_rows_rebuilt_under_the_resumed_runs_name(stored, tmp_path):
    """An adopted attempt (workbench.tune) resumes another run's checkpoint under a new name: rows rebuilt from
    that checkpoint are relabelled."""
    from workbench.callbacks import TidyMetricsLogger
    from workbench.config import dump_config
    from workbench.train import build_run

    run_dir = _copy(stored, "interrupted", tmp_path)
    (run_dir / "metrics.parquet").unlink()  # as workbench.tune's _adopt_attempt leaves it when the file was lost
    config = make_config(SETTINGS | {"name": "faults-renamed"})
    (run_dir / "config.yaml").write_text(dump_config(config))
    built = build_run(config, run_dir, resume=True, log=lambda _: None)
    try:
        built.trainer.engine.run_event("fit_start")
        (tidy,) = [cb for cb in built.trainer.state.callbacks if isinstance(cb, TidyMetricsLogger)]
        assert len(tidy.writer.rows) > 10 and {row["run"] for row in tidy.writer.rows} == {"faults-renamed"}
    finally:
        built.trainer.close()


def test_truncated_metrics_without_rows_in_the_checkpoint_are_refused(stored, tmp_path, capsys):
    """A checkpoint written before checkpoints carried the rows cannot rebuild them: refuse, naming the file."""
    import torch

    run_dir = _copy(stored, "interrupted", tmp_path)
    for batch in (16, 32):
        path = _checkpoint(run_dir, batch)
        payload = torch.load(path, weights_only=False)
        del payload["state"]["callbacks"]["TidyMetricsLogger"]
        torch.save(payload, path)
    _truncate(run_dir / "metrics.parquet")
    before = _snapshot(run_dir)
    code, _out, err = _resume(stored, run_dir, capsys)
    _refused(code, err, str(run_dir / "metrics.parquet"), "unreadable")
    assert _snapshot(run_dir) == before


def test_complete_run_with_truncated_metrics_says_the_file_is_unreadable(stored, tmp_path, capsys):
    run_dir = _copy(stored, "complete", tmp_path)
    _truncate(run_dir / "metrics.parquet")
    before = _snapshot(run_dir)
    code, _out, err = _resume(stored, run_dir, capsys)
    _refused(code, err, str(run_dir / "metrics.parquet"), "unreadable")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_eval_on_a_broken_checkpoint_prints_one_line_naming_it(stored, tmp_path, capsys, damage):
    run_dir = _copy(stored, "complete", tmp_path)
    link = run_dir / "checkpoints" / "latest-rank0.pt"
    target = link.resolve()
    _truncate(target) if damage == "truncated" else target.unlink()
    code = main(["eval", str(run_dir), "--tasks", "piqa", "--limit", "4"])
    err = capsys.readouterr().err
    if damage == "truncated":
        _refused(code, err, str(target), "unreadable checkpoint")
    else:
        _refused(code, err, str(link), str(target), "no longer exists")
