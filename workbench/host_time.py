"""The framework's fixed host time per training step: what the trainer spends outside the model (Composer's event
loop, the Streaming read, logging, counters), measured on a 1-layer micro model with one thread (``workbench
bench`` reports it, before and after :class:`workbench.trainer.WorkbenchTrainer`).

On a GPU this time is serialized with the device whenever the loop reads from the device: a step of the shipped
``gpu_small`` model takes a few milliseconds on an H100, so each millisecond of host time per step matters there.
Per step: the main thread's CPU time from one BATCH_END to the next, minus that inside the forward (which includes
the objective's loss), the backward and the optimizer step; mean over the timed steps (the tidy logger's flush
every ``log_interval`` steps is part of the fixed cost, amortized). CPU time of the one thread that does all the
work (one torch thread), not wall time: on a shared machine wall time also counts the
time other processes hold the cores."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger

SPANS = ((Event.BEFORE_FORWARD, Event.AFTER_FORWARD), (Event.BEFORE_LOSS, Event.AFTER_LOSS),
         (Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD))


class StepClock(Callback):
    """Per step: CPU time between BATCH_ENDs and the time inside the model's forward, loss and backward (the
    optimizer step is timed by a wrapper, :meth:`wrap_optimizer`). It acts on 7 of a step's 13 events and reads
    the clock only there: its own cost is part of what it measures."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[float] = []
        self.model: list[float] = []
        # by identity: Composer's Event.__eq__ is a Python-level string comparison
        self._roles = {id(start): ("open", start) for start, _ in SPANS}
        self._roles.update({id(end): ("close", start) for start, end in SPANS})
        self._roles[id(Event.BATCH_END)] = ("step", Event.BATCH_END)
        self._opened: dict[Event, float] = {}
        self._inside, self._last_end = 0.0, None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        role = self._roles.get(id(event))
        if role is None:
            return
        now = time.thread_time()
        kind, span = role
        if kind == "open":
            self._opened[span] = now
        elif kind == "close":
            self._inside += now - self._opened.pop(span)
        else:
            if self._last_end is not None and int(state.timestamp.batch) > self.warmup:
                self.steps.append(now - self._last_end)
                self.model.append(self._inside)
            self._last_end, self._inside = now, 0.0

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def timed_step(*args: Any, closure: Any = None, **kwargs: Any) -> Any:
            """The update alone: a closure (Composer's loop runs forward and backward in one) is timed by the
            event spans already."""
            in_closure = 0.0

            def timed_closure() -> Any:
                nonlocal in_closure
                start = time.thread_time()
                try:
                    return closure()
                finally:
                    in_closure = time.thread_time() - start

            start = time.thread_time()
            try:
                return step(*args, closure=timed_closure if closure is not None else None, **kwargs)
            finally:
                self._inside += time.thread_time() - start - in_closure

        optimizer.step = timed_step  # type: ignore[method-assign]


class ComposerLoop(Trainer):
    """Composer's own training loop (what the workbench ran before WorkbenchTrainer), for the comparison."""

    def __init__(self, *args: Any, log_interval: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_time_per_step(loop: str = "workbench", steps: int = 60, warmup: int = 10,
                       num_workers: int = 0) -> dict[str, Any]:
    """``loop``: 'workbench' (WorkbenchTrainer) or 'composer' (Composer's Trainer). Milliseconds per step: the
    mean step, the model's part and the framework's host time (their difference), on the micro shape, one
    torch thread, AR objective, fp32. ``num_workers``: DataLoader workers (the shipped GPU config uses 2; on this
    model the main thread's cost of receiving a batch from a worker equals reading it in-process, within noise)."""
    import workbench.trainer
    from workbench.bench import Shape, write_random_shards
    from workbench.config import config_from_dict
    from workbench.train import build_run

    if loop not in ("workbench", "composer"):
        raise ValueError(f"loop must be 'workbench' or 'composer', got {loop!r}")
    shape = Shape.named("micro")
    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory() as tmp, _threads(1):
        work = Path(tmp)
        prepared = write_random_shards(shape, work / "shards", (warmup + steps + 1) * shape.batch_size)
        config = config_from_dict({
            "name": f"host-time-{loop}",
            "data": {"seq_len": shape.seq_len, "batch_size": shape.batch_size,
                     "unique_tokens": prepared.train.manifest["num_tokens"], "num_workers": num_workers},
            "model": {"n_layers": shape.n_layers, "d_model": shape.d_model, "n_heads": shape.n_heads},
            "scheduler": {"name": "constant", "warmup": "0ba"},
            "eval": {"interval": "1000000ba", "batch_size": shape.batch_size},
            "trainer": {"max_duration": f"{warmup + steps + 1}ba", "progress_bar": False, "grad_clip_norm": None,
                        "checkpoint_interval": "1000000ba", "device": "cpu", "precision": "fp32"},
        }, "host time")
        trainer_class = ComposerLoop if loop == "composer" else workbench.trainer.WorkbenchTrainer
        with mock.patch.object(workbench.trainer, "WorkbenchTrainer", trainer_class):
            built = build_run(config, work / "run", extra_callbacks=[clock], log=lambda _: None, prepared=prepared)
        for optimizer in built.trainer.state.optimizers:
            clock.wrap_optimizer(optimizer)
        built.trainer.fit()
        built.trainer.close()
    host = [step - model for step, model in zip(clock.steps, clock.model, strict=True)]
    return {"loop": loop, "num_workers": num_workers, "steps": len(host),
            "step_ms": 1e3 * statistics.fmean(clock.steps), "model_ms": 1e3 * statistics.fmean(clock.model),
            "host_ms": 1e3 * statistics.fmean(host), "host_median_ms": 1e3 * statistics.median(host)}


def best_host_times(configs: list[tuple[str, int]], repeats: int, steps: int = 200) -> list[dict[str, Any]]:
    """For each ``(loop, num_workers)``: :func:`host_time_per_step` run ``repeats`` times, each in a fresh process
    with one OpenMP thread, the configurations taking turns; the run with the least host time, with every run's in
    ``host_ms_runs``. A fresh process because what ran before in the same one (the bench's 2-thread throughput runs
    leave OpenMP threads spinning on the other core) slowed it by up to 40%. Taking turns and the least because on
    this shared 2-core machine the CPU's speed drifts by +-30% over minutes, model and framework alike: the least
    is the run least disturbed (timeit's convention), and every configuration meets the same drift."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for _ in range(max(1, repeats)):
        for index, (loop, num_workers) in enumerate(configs):
            command = [sys.executable, "-m", "workbench.host_time", loop, str(num_workers), str(steps)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"host-time run failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
            runs[index].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return [{**min(done, key=lambda run: run["host_ms"]), "host_ms_runs": [run["host_ms"] for run in done]}
            for done in runs]


if __name__ == "__main__":  # one measurement, as a JSON line (best_host_times runs it in a fresh process)
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(host_time_per_step(sys.argv[1], steps=int(sys.argv[3]), num_workers=int(sys.argv[2]))))
