"""Progress of long commands: plain lines (no carriage returns) when not on a terminal, per-batch item counts from
evaluation, and one line per finished trial of a study with the best value and an ETA."""

from __future__ import annotations

import datetime
import io
from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from workbench.config import DownstreamConfig, TokenizerConfig
from workbench.progress import Progress, format_seconds


def test_progress_without_a_terminal_prints_lines_not_redraws():
    stream = io.StringIO()
    with Progress(3, "[tune] trials", "trials", every=0, stream=stream) as progress:
        for _ in range(3):
            progress.update(best="0.5")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[0].startswith("[tune] trials: 1/3 trials | ") and "ETA" in lines[0] and lines[0].endswith("best 0.5")
    assert lines[2].startswith("[tune] trials: 3/3 trials | ") and "ETA" not in lines[2]

    stream = io.StringIO()  # throttled: batches are not meaningful steps; only the final count is printed here
    with Progress(100, "[eval] piqa", "items", every=30, stream=stream) as progress:
        for _ in range(10):
            progress.update(10)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]
    assert stream.getvalue().startswith("[eval] piqa: 100/100 items | ")
    assert format_seconds(75) == "1m15s" and format_seconds(4000) == "1h06m" and format_seconds(3.4) == "3s"


def test_evaluate_task_reports_items_after_each_batch(tiny_config):
    from workbench.evaluation.tasks import evaluate_task, prepare_task
    from workbench.tokenizer import load_tokenizer
    from workbench.train import build_model

    tokenizer = load_tokenizer(TokenizerConfig(kind="gpt2"))
    model = build_model(tiny_config({}), tokenizer, install_objective=True)
    task = prepare_task("copa", tokenizer, DownstreamConfig(tasks=["copa"], limit=10, batch_size=8), seq_len=64)
    counts: list[int] = []
    values = evaluate_task(model, task, on_batch=counts.append)
    assert sum(counts) == len(task.items) == 10 and len(counts) > 1  # several batches, every item counted once
    assert values == evaluate_task(model, task)  # the callback changes nothing


def _trial(number: int, state: TrialState, value: float | None = None, seconds: float | None = None
           ) -> optuna.trial.FrozenTrial:
    start = datetime.datetime(2025, 1, 1)
    complete = start + datetime.timedelta(seconds=seconds) if seconds is not None else None
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=value, values=None, datetime_start=start, datetime_complete=complete,
        params={}, distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=number)


def test_study_progress_line():
    from workbench.tune.spec import Objective
    from workbench.tune.worker import study_progress

    spec = SimpleNamespace(objectives=[Objective("val", "ar_nll", "best", "minimize")], directions=["minimize"])

    trials = [_trial(0, TrialState.COMPLETE, 3.5, 10), _trial(1, TrialState.COMPLETE, 3.25, 20),
              _trial(2, TrialState.PRUNED, None, 30), _trial(3, TrialState.RUNNING),
              _trial(4, TrialState.WAITING), _trial(5, TrialState.WAITING)]
    line = study_progress(spec, trials)  # mean 20 s x 3 open trials / 2 workers (1 running + this one)
    assert line == ("[tune] progress: 3/6 trials finished (2 complete, 1 pruned, 0 fail), 1 running; "
                    "best val/ar_nll 3.2500 (trial 1); ETA ~30s")
