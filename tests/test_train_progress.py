"""A training run shows its progress (issue 15): one line per evaluation with the numbers metrics.parquet holds
(plus at most one line every ~30 s between evaluations) when stdout is not a terminal, a bar on a terminal, no
device read added by either; the ablation runner passes its children's lines on; ``workbench eval`` refuses a
rows file it cannot read instead of starting it again empty."""

from __future__ import annotations

import io
import re
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from composer.core import Time, Timestamp

import workbench.callbacks as callbacks
from workbench.callbacks import PROGRESS_LINE, TrainProgress, format_count
from workbench.results import read_metrics
from workbench.train import build_run, train

TORCH_DIR = str(Path(torch.__file__).parent)
READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")
EVAL_LINE = re.compile(r"^\[train\] (?P<run>\S+) epoch (?P<epoch>[\d.]+)/(?P<total>[\d.]+) \((?P<tokens>\S+) tok\): "
                       r"(?P<metrics>.*?) \| (?P<elapsed>\S+) elapsed(?:, ETA (?P<eta>\S+))?$")


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _epochs(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 1e-6 else f"{value:.2f}"


def test_one_line_per_evaluation_with_the_numbers_of_metrics_parquet(tiny_config, results_root, monkeypatch):
    """Validation every half epoch (a token interval: after the batch), a task every epoch (at the epoch's end, a
    second evaluation round at the same step): each round is one line with its own numbers."""
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal, even under pytest -s
    monkeypatch.setattr(TrainProgress, "every", 1e9)  # evaluation lines only, however slow the machine
    config = tiny_config({"name": "progress-lines", "eval": {"interval": "16384tok", "downstream": {
        "tasks": ["copa"], "limit": 4, "interval": "1ep"}}, "scheduler": {"warmup": "2048tok"}})
    lines: list[str] = []
    train(config, log=lines.append)

    shown = [EVAL_LINE.match(line) for line in lines if PROGRESS_LINE.match(line)]
    assert all(shown), lines
    frame = read_metrics(results_root / config.name / "metrics.parquet")
    assert frame is not None
    evaluations = frame.filter((pl.col("split") == "val") & (pl.col("metric") == "ar_nll")).sort("step")
    tasks = frame.filter((pl.col("split") == "copa") & (pl.col("metric") == "acc")).sort("step")
    assert evaluations.height == 4 and tasks.height == 2 and len(shown) == 6  # 2 epochs of 32 batches
    val_lines = [match for match in shown if match["metrics"].startswith("val ")]
    task_lines = [match for match in shown if match["metrics"].startswith("copa ")]
    for match, row in [*zip(val_lines, evaluations.iter_rows(named=True), strict=True),
                       *zip(task_lines, tasks.iter_rows(named=True), strict=True)]:
        assert match["run"] == "progress-lines" and match["total"] == "2"
        assert match["epoch"] == _epochs(row["epoch"]) and match["tokens"] == format_count(row["tokens_seen"])
        assert match["metrics"] == f"{row['split']} {row['metric']} {row['value']:.4f}"
        assert (match["eta"] is None) == (row["step"] == 64)  # an ETA until the end
    assert [match["epoch"] for match in task_lines] == ["1", "2"]


def test_lines_between_evaluations_at_log_intervals_with_the_logged_loss(tiny_config, results_root, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(TrainProgress, "every", 0.0)  # no throttle: a line at every log interval
    config = tiny_config({"name": "progress-interval", "trainer": {"max_duration": "24ba", "log_interval": 4},
                          "eval": {"interval": "1000ba"}, "scheduler": {"warmup": "2ba"}})
    lines: list[str] = []
    train(config, log=lines.append)
    shown = [line for line in lines if PROGRESS_LINE.match(line)]
    frame = read_metrics(results_root / config.name / "metrics.parquet")
    assert frame is not None
    losses = frame.filter((pl.col("split") == "train") & (pl.col("metric") == "loss")).sort("step")
    assert losses["step"].to_list() == [4, 8, 12, 16, 20, 24] and len(shown) == 6
    for line, row in zip(shown, losses.iter_rows(named=True), strict=True):
        assert f"epoch {_epochs(row['epoch'])}/0.75 ({format_count(row['tokens_seen'])} tok): loss {row['value']:.4f}" \
            in line, line


def test_lines_between_evaluations_are_throttled(monkeypatch):
    """At most one line per ``every`` seconds, counted from the last line of either kind."""
    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    rows: list[dict] = []
    tidy = SimpleNamespace(run_name="r", unique_tokens=1000, writer=SimpleNamespace(rows=rows), last_evaluation=[])
    lines: list[str] = []
    display = TrainProgress(tidy, log=lines.append, every=30.0)  # type: ignore[arg-type]
    state = SimpleNamespace(max_duration=Time.from_timestring("10000tok"), timestamp=Timestamp())
    state.get_elapsed_duration = lambda: state.timestamp.token / state.max_duration
    display.fit_start(state, None)  # type: ignore[arg-type]
    for batch in range(1, 25):  # 10 s per batch; the tidy logger adds a loss row every 2 batches
        clock[0] += 10.0
        state.timestamp = Timestamp(batch=batch, token=100 * batch)
        if batch % 2 == 0:
            rows.append({"step": batch, "split": "train", "metric": "loss", "value": 5.0 - batch / 100})
        display.batch_end(state, None)  # type: ignore[arg-type]
        if batch == 12:  # an evaluation: its rows come after the batch's
            tidy.last_evaluation = [{"step": batch, "split": "val", "metric": "ar_nll", "value": 4.5}]
            rows.extend(tidy.last_evaluation)
            display.eval_after_all(state, None)  # type: ignore[arg-type]
    steps = [round(float(line.split(" epoch ")[1].split("/")[0]) * 10) for line in lines]  # 100 tokens a batch
    assert steps == [4, 8, 12, 12, 16, 20, 24]  # throttled to 30 s at log intervals; the evaluation at 12 resets it
    assert "val ar_nll 4.5000" in lines[3] and "loss 4.8800" in lines[2]
    assert lines[0] == "[train] r epoch 0.40/10 (400 tok): loss 4.9600 | 40s elapsed, ETA 16m00s"


class Reads:
    """Counts host reads of tensors (``.item()``, ``.cpu()``...) made outside torch while ``active``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.calls: Counter[tuple[str, str]] = Counter()
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                frame = sys._getframe(1)
                if not frame.f_code.co_filename.startswith(TORCH_DIR):
                    self.calls[(name, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def fit(self, config, progress: bool) -> Counter[tuple[str, str]]:
        built = build_run(config, progress=progress, log=lambda _: None)
        self.calls.clear()
        self.active = True
        try:
            built.trainer.fit()
        finally:
            self.active = False
            built.trainer.close()
        return Counter(self.calls)


def test_the_display_adds_no_device_reads(tiny_config, monkeypatch):
    reads = Reads(monkeypatch)
    overrides = {"trainer": {"max_duration": "16ba", "log_interval": 4, "checkpoint_interval": "1000ba"},
                 "eval": {"interval": "8ba"}, "scheduler": {"warmup": "2ba"}}
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    off = reads.fit(tiny_config({**overrides, "name": "reads-off"}), progress=False)
    monkeypatch.setattr(TrainProgress, "every", 0.0)  # lines at every log interval and evaluation
    lines = reads.fit(tiny_config({**overrides, "name": "reads-lines"}), progress=True)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    bar = reads.fit(tiny_config({**overrides, "name": "reads-bar", "trainer": {**overrides["trainer"],
                                                                                "progress_bar": True}}), progress=True)
    assert sum(off.values()) > 0  # the counter sees the reads the loop makes (losses at log intervals, metrics)
    assert lines == off and bar == off
    assert "[train] reads-bar" in terminal.getvalue() and "loss=" in terminal.getvalue()  # the bar was drawn


def test_ablation_runner_forwards_progress_lines_and_keeps_the_whole_log(tmp_path, monkeypatch):
    from workbench.ablate import runner

    script = ("print('[prep] train: already prepared'); "
              "print('[train] demo-ar-seed0 epoch 1/2 (33k tok): val ar_nll 5.1234 | 3s elapsed, ETA 3s'); "
              "import sys; print('a warning', file=sys.stderr); "
              "print('[train] demo-ar-seed0: complete after 65,536 tokens')")
    monkeypatch.setattr(runner, "subprocess_command", lambda run, slot, launcher: [sys.executable, "-c", script])
    claim = SimpleNamespace(hand_over=lambda: {})
    log_path = tmp_path / "train.log"
    forwarded: list[str] = []
    code = runner.launch_subprocess(None, runner.Slot(None, 1, 0, None), "none", claim, log_path,  # type: ignore
                                    forward=forwarded.append)
    assert code == 0
    assert forwarded == ["[train] demo-ar-seed0 epoch 1/2 (33k tok): val ar_nll 5.1234 | 3s elapsed, ETA 3s"]
    assert log_path.read_text().splitlines() == ["[prep] train: already prepared", forwarded[0], "a warning",
                                                 "[train] demo-ar-seed0: complete after 65,536 tokens"]


@pytest.mark.slow
def test_smoke_ablation_shows_each_runs_evaluations():
    """``--parallel 2``: both children's evaluation lines reach the runner's output, each naming its run."""
    from ablation_smoke import SMOKE_VARIANTS, smoke_results

    root, output, _ = smoke_results()
    for variant in SMOKE_VARIANTS:
        name = f"demo-{variant}-seed0"
        shown = [line for line in output.splitlines() if line.startswith(f"[train] {name} epoch ")]
        frame = read_metrics(root / variant / "seed0" / "metrics.parquet")
        assert frame is not None
        metric = "ar_nll" if variant != "mdm" else "mdm_nelbo"
        rows = frame.filter((pl.col("split") == "val") & (pl.col("metric") == metric)).sort("step")
        evaluations = [line for line in shown if f"val {metric} " in line]
        assert len(evaluations) == rows.height == 6, shown  # tasks (every 3 epochs) on a line of their own
        assert len({line.split(" (")[0] for line in evaluations}) == 6
        for line, value in zip(evaluations, rows["value"].to_list(), strict=True):
            assert f"val {metric} {value:.4f}" in line


def test_eval_refuses_a_truncated_rows_file(tiny_config, results_root, tmp_path, capsys):
    from workbench.cli import main

    config = tiny_config({"name": "eval-truncated", "trainer": {"max_duration": "8ba", "checkpoint_interval": "8ba"},
                          "eval": {"interval": "1000ba"}, "scheduler": {"warmup": "2ba"}})
    train(config)
    run_dir = results_root / config.name
    assert main(["eval", str(run_dir), "--tasks", "copa", "--limit", "2", "--scorer", "ar"]) == 0
    rows_file = run_dir / "downstream.parquet"
    whole = rows_file.read_bytes()
    rows_file.write_bytes(whole[: len(whole) // 2])  # a kill or a full disk mid-copy
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--tasks", "piqa", "--limit", "2", "--scorer", "ar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(rows_file) in err and "Traceback" not in err, err
    assert rows_file.read_bytes() == whole[: len(whole) // 2]  # kept as it was: its rows may still be recovered

    out = tmp_path / "scores.parquet"
    out.write_bytes(b"not parquet")
    assert main(["eval", str(run_dir), "--tasks", "copa", "--limit", "2", "--scorer", "ar", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err and out.read_bytes() == b"not parquet"
