"""Composer callbacks: tidy metrics logging, RNG state that survives a mid-epoch resume, and the progress display
of a training run."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, reproducibility

from workbench.progress import format_seconds
from workbench.results import MetricsWriter, rows_to_bytes

PERPLEXITY_OF = {"ar_nll": "ar_ppl", "mdm_nelbo": "mdm_ppl_bound"}


class RNGCheckpoint(Callback):
    """Saves torch/CUDA/numpy/python RNG state with each checkpoint and restores it at FIT_START.

    Composer restores RNG only when resuming at an epoch boundary; Streaming resumes mid-epoch, so without
    this, token masks, diffusion times and dropout after a resume would differ from the uninterrupted run."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": reproducibility.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("rng")

    def fit_start(self, state: State, logger: Logger) -> None:
        if self._pending is not None:
            reproducibility.load_rng_state(self._pending)
            self._pending = None


class TidyMetricsLogger(LoggerDestination):
    """Turns Composer's metric stream into tidy rows in ``metrics.parquet`` (see workbench.results).

    Train loss is averaged over ``log_interval`` batches (Composer already reduced it to a float); evaluation
    metrics arrive once per evaluation. The file is rewritten atomically after each evaluation, at the end of
    fit and of each epoch, and between them at most once every ``flush_every_s`` seconds of training: each
    rewrite costs time proportional to all rows so far (~20 ms for a few thousand), which at every log interval
    would grow into milliseconds per step over a long GPU run. Every checkpoint carries all rows up to it, so a
    run killed before a flush loses nothing: its resume rebuilds the rows the file lacks from the checkpoint
    (workbench.resume.recover_metrics) and drops and recomputes those after the checkpoint's step."""

    flush_every_s = 10.0

    def __init__(self, writer: MetricsWriter, run_name: str, unique_tokens: int, log_interval: int,
                 unigram_entropy: float | None):
        super().__init__()
        self.writer, self.run_name, self.unique_tokens = writer, run_name, unique_tokens
        self.log_interval, self.unigram_entropy = log_interval, unigram_entropy
        self.state: State | None = None
        self._loss_sum, self._loss_count, self._tokens_per_s = 0.0, 0, None
        self._wall_offset, self._start = 0.0, time.time()
        self._flushed_at = time.monotonic()
        self.last_evaluation: list[dict[str, Any]] = []  # the rows of the latest evaluation round (all evaluators)

    def state_dict(self) -> dict[str, Any]:
        """Every row so far travels with each checkpoint (a few kB per thousand rows): a resume rebuilds
        ``metrics.parquet`` from it when the file is unreadable or gone (workbench.resume)."""
        from workbench.resume import ROWS_KEY

        return {ROWS_KEY: rows_to_bytes(self.writer.rows)}

    # composer hooks ------------------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        self.state = state

    def fit_start(self, state: State, logger: Logger) -> None:
        self.writer.truncate_after(int(state.timestamp.batch))
        for row in self.writer.rows:  # rows rebuilt from an adopted attempt's checkpoint carry its name
            row["run"] = self.run_name
        self._wall_offset, self._start = self.writer.last_wall_time, time.time()
        if self.unigram_entropy is not None and not self.writer.has("val", "unigram_entropy"):
            self._row("val", "unigram_entropy", self.unigram_entropy, step=0, tokens=0)
        self._flush()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        evaluated: list[dict[str, Any]] = []
        for key, value in metrics.items():
            if key == "loss/train/total":
                self._loss_sum += float(value)
                self._loss_count += 1
            elif key == "throughput/tokens_per_sec":
                self._tokens_per_s = float(value)
            elif key.startswith("metrics/"):
                _, split, name = key.split("/", 2)
                number = float(value)
                evaluated.append(self._fields(split, name, number))
                if name in PERPLEXITY_OF:
                    evaluated.append(self._fields(split, PERPLEXITY_OF[name], math.exp(min(number, 700.0))))
        if evaluated:
            self.last_evaluation += evaluated
            # replace, not append: a checkpoint saved at the last batch of an epoch (a token or batch interval that
            # lands on the boundary) precedes that epoch's evaluation, which a resumed run therefore runs again
            self.writer.replace(evaluated)

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.log_interval == 0 and self._loss_count:
            self._row("train", "loss", self._loss_sum / self._loss_count)
            if self._tokens_per_s is not None:
                self._row("train", "tokens_per_s", self._tokens_per_s)
            self._loss_sum, self._loss_count = 0.0, 0
            if time.monotonic() - self._flushed_at >= self.flush_every_s:
                self._flush()

    def eval_before_all(self, state: State, logger: Logger) -> None:
        self.last_evaluation = []

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()

    def close(self, state: State, logger: Logger) -> None:
        """The trainer is closing, also after an exception or Ctrl-C: the rows since the last rewrite (up to
        ``flush_every_s`` of them, often the ones that show why a run failed) reach the file."""
        self._flush()

    # helpers -----------------------------------------------------------------------------------------------
    def _row(self, split: str, metric: str, value: float, step: int | None = None, tokens: int | None = None) -> None:
        self.writer.add(**self._fields(split, metric, value, step, tokens))

    def _fields(self, split: str, metric: str, value: float, step: int | None = None,
                tokens: int | None = None) -> dict[str, Any]:
        assert self.state is not None
        timestamp = self.state.timestamp
        tokens = int(timestamp.token) if tokens is None else tokens
        return {"run": self.run_name, "step": int(timestamp.batch) if step is None else step,
                "epoch": tokens / self.unique_tokens, "tokens_seen": tokens, "unique_tokens": self.unique_tokens,
                "split": split, "metric": metric, "value": value,
                "wall_time": self._wall_offset + time.time() - self._start}

    def _flush(self) -> None:
        if dist.get_global_rank() == 0:
            self.writer.flush()
        self._flushed_at = time.monotonic()


# --------------------------------------------------------------------------------------------------------------
# what a person watching a run sees

# every line TrainProgress prints starts so (the ablation runner forwards them from its children's output)
PROGRESS_LINE = re.compile(r"^\[train\] \S+ epoch ")
_DERIVED = set(PERPLEXITY_OF.values())  # exp of a metric already shown
_TASK_METRICS = ("acc", "ppl")  # per downstream task, the first present is shown


def format_count(value: float) -> str:
    """``98304`` -> ``98k``, ``1572864`` -> ``1.6M``, ``512`` -> ``512`` (two or three significant digits)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{suffix}" if abs(scaled) < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def _epochs(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 1e-6 else f"{value:.2f}"


class TrainProgress(LoggerDestination):
    """Shows a training run moving, from values already on the host: the timestamp, and the rows the tidy logger
    reduced (train loss and tokens/s every ``log_interval`` batches, evaluation metrics once per evaluation).

    On a terminal (``bar``): a tqdm bar over ``max_duration`` with loss, tokens/s and ETA, and one line per
    evaluation above it. Otherwise (logs, CI, ablation children): one line per evaluation, e.g.
    ``[train] demo-ar epoch 3/12 (98k tok): val ar_nll 5.6462 | 1m12s elapsed, ETA 2m10s``, plus at most one
    line every ``every`` seconds between evaluations (checked only at log intervals, when a fresh loss exists).

    A logger destination placed after the tidy logger, so its BATCH_END runs after the tidy logger's and reads
    that batch's rows (Composer runs plain callbacks before all loggers). Composer's own progress bar is not used:
    it prints the hyper-parameters as YAML at fit start and, in a log file, rewrites a 120-column line per redraw.
    Rank 0 only."""

    every: float = 30.0  # seconds between lines that are not evaluations, without a terminal

    def __init__(self, tidy: TidyMetricsLogger, *, log: Callable[[str], None] = print, bar: bool = False,
                 stream: IO[str] | None = None, every: float | None = None):
        super().__init__()
        self.tidy, self.log, self.use_bar = tidy, log, bar
        self.stream = stream if stream is not None else sys.stdout
        if every is not None:
            self.every = every
        self.bar: Any = None
        self.active = False
        self.start = self.last_line = time.monotonic()
        self.start_fraction = 0.0
        self.shown: dict[str, float] = {}  # latest loss and tokens/s (from the tidy rows)

    # composer hooks ------------------------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        self.active = dist.get_global_rank() == 0 and state.max_duration is not None
        if not self.active:
            return
        self.start = self.last_line = time.monotonic()
        self.start_fraction = self._fraction(state)
        if self.use_bar:
            from tqdm.auto import tqdm

            assert state.max_duration is not None
            unit = state.max_duration.unit.value.lower()
            self.bar = tqdm(total=int(state.max_duration.value), initial=int(state.timestamp.get(
                state.max_duration.unit)), desc=f"[train] {self.tidy.run_name}", unit=unit, unit_scale=True,
                file=self.stream, dynamic_ncols=True, leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} " + unit
                           + " [{elapsed}<{remaining}{postfix}]")

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.active:
            return
        fresh = self._read_train_rows(int(state.timestamp.batch))
        if self.bar is not None:
            assert state.max_duration is not None
            self.bar.update(int(state.timestamp.get(state.max_duration.unit)) - self.bar.n)
            if fresh:
                self.bar.set_postfix(self._postfix(), refresh=False)
            return
        if fresh and time.monotonic() - self.last_line >= self.every:
            self._print(self._line(state, self._train_text()))

    def eval_before_all(self, state: State, logger: Logger) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"[train] {self.tidy.run_name} (evaluating)")

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if not self.active:
            return
        # this round's rows only: evaluators on different intervals may run twice at one step (validation at a
        # token interval after the batch, tasks every few epochs at the epoch's end)
        rows = [row for row in self.tidy.last_evaluation if row["split"] != "train" and row["metric"] not in _DERIVED]
        parts = [f"{row['split']} {row['metric']} {row['value']:.4f}" for row in rows if row["split"] == "val"]
        for task in dict.fromkeys(row["split"] for row in rows if row["split"] != "val"):
            values = {row["metric"]: row["value"] for row in rows if row["split"] == task}
            shown = next((m for m in _TASK_METRICS if m in values), None)
            if shown is not None:
                parts.append(f"{task} {shown} {values[shown]:.4f}")
        if not parts:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"[train] {self.tidy.run_name}")
        self._print(self._line(state, " | ".join(parts)))

    def fit_end(self, state: State, logger: Logger) -> None:
        self._close()

    def close(self, state: State, logger: Logger) -> None:
        self._close()

    # helpers -----------------------------------------------------------------------------------------------
    def _read_train_rows(self, step: int) -> bool:
        """The loss and tokens/s rows the tidy logger added at ``step`` (it adds them at the end of the list)."""
        fresh = False
        for row in reversed(self.tidy.writer.rows):
            if row["step"] != step or row["split"] != "train":
                break
            self.shown[row["metric"]] = row["value"]
            fresh = True
        return fresh

    def _postfix(self) -> dict[str, str]:
        out = {}
        if "loss" in self.shown:
            out["loss"] = f"{self.shown['loss']:.4f}"
        if "tokens_per_s" in self.shown:
            out["tok/s"] = format_count(self.shown["tokens_per_s"])
        return out

    def _train_text(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in self._postfix().items())

    @staticmethod
    def _fraction(state: State) -> float:
        elapsed = state.get_elapsed_duration()
        return float(elapsed.value) if elapsed is not None else 0.0

    def _line(self, state: State, text: str) -> str:
        tokens = int(state.timestamp.token)
        unique = self.tidy.unique_tokens
        fraction = self._fraction(state)
        assert state.max_duration is not None
        if state.max_duration.unit.name == "TOKEN":
            total = f"/{_epochs(int(state.max_duration.value) / unique)}"
        else:
            total = f"/{_epochs(tokens / unique / fraction)}" if fraction > 0 else ""
        elapsed = time.monotonic() - self.start
        timing = f"{format_seconds(elapsed)} elapsed"
        done_here = fraction - self.start_fraction
        if done_here > 0 and fraction < 1:
            timing += f", ETA {format_seconds(elapsed / done_here * (1 - fraction))}"
        return (f"[train] {self.tidy.run_name} epoch {_epochs(tokens / unique)}{total} ({format_count(tokens)} tok): "
                f"{text} | {timing}")

    def _print(self, line: str) -> None:
        self.last_line = time.monotonic()
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.log(line)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.active = False
