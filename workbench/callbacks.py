"""Composer callbacks: tidy metrics logging and RNG state that survives a mid-epoch resume."""

from __future__ import annotations

import math
import time
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, reproducibility

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
    metrics arrive once per evaluation. The file is rewritten atomically whenever rows were added (every
    ``log_interval`` batches and after each evaluation), always before Composer saves a checkpoint at that batch
    (callbacks run before loggers at BATCH_CHECKPOINT, so flushing there would come after the save and a kill in
    between would lose the rows up to the checkpoint for good). On resume, rows after the checkpoint's step are
    dropped and recomputed."""

    def __init__(self, writer: MetricsWriter, run_name: str, unique_tokens: int, log_interval: int,
                 unigram_entropy: float | None):
        super().__init__()
        self.writer, self.run_name, self.unique_tokens = writer, run_name, unique_tokens
        self.log_interval, self.unigram_entropy = log_interval, unigram_entropy
        self.state: State | None = None
        self._loss_sum, self._loss_count, self._tokens_per_s = 0.0, 0, None
        self._wall_offset, self._start = 0.0, time.time()

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
            # replace, not append: a checkpoint saved at the last batch of an epoch (a token or batch interval that
            # lands on the boundary) precedes that epoch's evaluation, which a resumed run therefore runs again
            self.writer.replace(evaluated)

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.log_interval == 0 and self._loss_count:
            self._row("train", "loss", self._loss_sum / self._loss_count)
            if self._tokens_per_s is not None:
                self._row("train", "tokens_per_s", self._tokens_per_s)
            self._loss_sum, self._loss_count = 0.0, 0
            self._flush()

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._flush()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
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
