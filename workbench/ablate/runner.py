"""Running planned runs: each one claimed first (:mod:`workbench.claims`), so any number of ``workbench ablate``
processes, on one machine or several sharing the results folder, train every run exactly once; then trained in
this process through :func:`workbench.train.train`, or as a ``workbench train`` subprocess in a slot (CPU threads,
GPUs, Composer's launcher) that adopts the claim and dies with this process (no orphans). Runs held by another
live process are skipped and looked at again until they are complete or their holder is gone."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import claims
from workbench.ablate.spec import Ablation, PlannedRun
from workbench.progress import format_seconds
from workbench.run_files import CHECKPOINTS, CONFIG_FILE, TRAIN_LOG, VARIANT_FILE

POLL_S = 1.0  # how often runs held by other processes are looked at again


def write_variant_file(run: PlannedRun, ablation: Ablation) -> None:
    from workbench.results import write_json

    run.run_dir.mkdir(parents=True, exist_ok=True)
    path, record = run.run_dir / VARIANT_FILE, run.variant_record(str(ablation.path), ablation.smoke)
    try:
        if json.loads(path.read_text()) == json.loads(json.dumps(record, default=str)):
            return  # unchanged: a complete run's folder is not touched
    except (OSError, ValueError):
        pass
    write_json(path, record)


def prepare_data(runs: list[PlannedRun], log: Callable[[str], None] = print) -> None:
    """Prepare each distinct data config once, before any run starts (concurrent runs then only read)."""
    from datasets_prep.corpus import prepare

    seen: list[Any] = []
    for run in runs:
        if run.config.data in seen:
            continue
        seen.append(run.config.data)
        prepare(run.config.data, log=log)

def write_run_files(run: PlannedRun, ablation: Ablation) -> None:
    """``variant.json`` and the expanded ``config.yaml`` (what ``workbench train`` reads), written atomically: other
    processes read them while planning."""
    from workbench.config import dump_config
    from workbench.results import atomic_write_bytes

    write_variant_file(run, ablation)
    atomic_write_bytes(run.run_dir / CONFIG_FILE, dump_config(run.config).encode())


def _best_text(summary: dict[str, Any]) -> str:
    best = {k: v for k, v in summary.items() if k in ("best_ar_nll", "best_mdm_nelbo")}
    return "".join(f"; {k} {v:.4f}" for k, v in best.items())


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies (Linux ``PR_SET_PDEATHSIG``;
    SIGKILL of the runner included), or None where the call does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: nobody would send the signal
            os._exit(1)

    return preexec


@dataclass
class Slot:
    """Where one subprocess runs: its CUDA devices (None on CPU), processes per run and a rendezvous port."""

    devices: list[str] | None
    nproc: int
    port: int
    threads: int | None


def make_slots(parallel: int, devices: list[str] | None, launcher: str, nproc: int) -> list[Slot]:
    """Split the machine into concurrent slots. composer launcher: one slot per group of ``nproc`` GPUs (all of
    them), or one CPU slot; ``--devices``: one slot per GPU (cycled when ``parallel`` asks for more); CPU:
    ``parallel`` slots sharing the cores' threads."""
    if launcher == "composer":
        if not devices:
            return [Slot(None, nproc, 29500, None)]
        groups = [devices[i:i + nproc] for i in range(0, len(devices) - nproc + 1, nproc)]
        return [Slot(group, nproc, 29500 + 17 * i, None) for i, group in enumerate(groups)]
    if devices:
        return [Slot([devices[i % len(devices)]], 1, 0, None) for i in range(max(parallel, len(devices)))]
    cores = os.cpu_count() or 1
    return [Slot(None, 1, 0, max(1, cores // parallel) if parallel > 1 else None) for _ in range(parallel)]


def subprocess_command(run: PlannedRun, slot: Slot, launcher: str) -> list[str]:
    train_args = ["train", str(run.run_dir / CONFIG_FILE), "--run-dir", str(run.run_dir), "--resume"]
    if launcher == "composer":
        return [sys.executable, "-m", "composer.cli", "-n", str(slot.nproc), "--master_port", str(slot.port),
                "-m", "workbench.cli", *train_args]
    return [sys.executable, "-m", "workbench.cli", *train_args]



def launch_subprocess(run: PlannedRun, slot: Slot, launcher: str, claim: claims.Claim, log_path: Path,
                      on_start: Callable[[Any], None] | None = None,
                      forward: Callable[[str], None] | None = None) -> int:
    """Run one ``workbench train`` child that adopts ``claim`` and dies with this process; its exit code.

    Its output goes to ``log_path``; with ``forward``, through this process, which also passes the child's progress
    lines (one per evaluation, each naming the run: :class:`workbench.callbacks.TrainProgress`) to ``forward``."""
    import subprocess

    env = dict(os.environ, **claim.hand_over(), PYTHONUNBUFFERED="1")  # the log (and forwarded lines) stay current
    if slot.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.devices)
    if slot.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
    # Composer's launcher cleans up its ranks on KeyboardInterrupt (SIGINT); a plain child just stops (SIGTERM)
    preexec = die_with_parent(signal.SIGINT if launcher == "composer" else signal.SIGTERM)
    with log_path.open("ab") as handle:
        process = subprocess.Popen(subprocess_command(run, slot, launcher), stderr=subprocess.STDOUT, env=env,
                                   stdout=handle if forward is None else subprocess.PIPE, preexec_fn=preexec)
    if on_start is not None:
        on_start(process)
    if forward is not None:
        from workbench.callbacks import PROGRESS_LINE

        with log_path.open("ab") as handle:
            for raw in process.stdout:
                handle.write(raw)
                handle.flush()
                line = raw.decode(errors="replace").rstrip()
                if PROGRESS_LINE.match(line):
                    forward(line)
    return process.wait()


@dataclass
class Outcome:
    """What happened to the runs this process was asked to finish."""

    here: list[str] = field(default_factory=list)  # trained to completion by this process
    others: list[str] = field(default_factory=list)  # found complete (another process finished them)
    failed: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.here) + len(self.others)


class Progress:
    """After each finished run: runs done / total, elapsed time and the remaining estimate (the plan's per-run
    seconds, scaled by how the runs finished here compared with their estimates)."""

    def __init__(self, total: int, seconds: dict[str, float] | None, concurrency: int):
        self.total, self.seconds, self.concurrency = total, seconds or {}, max(1, concurrency)
        self.start = time.time()
        self.finished: set[str] = set()
        self.running: dict[str, float] = {}
        self.estimated = self.actual = 0.0

    def started(self, name: str) -> None:
        self.running[name] = time.time()

    def line(self, name: str, outcome: Outcome) -> str:
        started = self.running.pop(name, None)
        if started is not None and self.seconds.get(name):
            self.estimated += self.seconds[name]
            self.actual += time.time() - started
        self.finished.add(name)
        elapsed = time.time() - self.start
        text = f"[ablate] {outcome.done}/{self.total} runs done"
        if outcome.others:
            text += f" ({len(outcome.others)} by other processes)"
        if outcome.failed:
            text += f", {len(outcome.failed)} failed"
        text += f"; {format_seconds(elapsed)} elapsed"
        left = [n for n in self.seconds if n not in self.finished]
        if not any(self.seconds.get(n) for n in left):
            return text + ("" if left or outcome.done + len(outcome.failed) >= self.total else "; remaining unknown")
        scale = self.actual / self.estimated if self.estimated and self.actual else 1.0
        now = time.time()
        remaining = sum(max(0.0, self.seconds[n] * scale - (now - self.running[n]) if n in self.running
                            else self.seconds[n] * scale) for n in left)
        return text + f"; about {format_seconds(remaining / self.concurrency)} left"


def best_table(runs: list[PlannedRun], outcome: Outcome) -> str:
    """The closing table: each run's status and best validation values (from its summary.json)."""
    from workbench.results import read_summary

    summaries = {run.name: read_summary(run.run_dir) or {} for run in runs}
    metrics = sorted({k for s in summaries.values() for k in s if k.startswith("best_") and "_ppl" not in k})
    columns = ["variant", "seed", "status", "by", *metrics]
    rows = []
    for run in runs:
        summary = summaries[run.name]
        by = "here" if run.name in outcome.here else "other" if run.name in outcome.others else "-"
        rows.append([run.variant.name, str(run.seed), str(summary.get("status", "missing")), by,
                     *(f"{summary[m]:.4f}" if isinstance(summary.get(m), int | float) else "-" for m in metrics)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _state(run: PlannedRun) -> str:
    """new / resume / complete / changed, read now (another process may have moved the run on)."""
    from workbench.train import RunExistsError, check_run_dir

    try:
        return check_run_dir(run.config, run.run_dir, resume=True)
    except RunExistsError as err:
        run.detail = str(err)
        return "changed"


class Runner:
    """Claims and trains ``runs`` in plan order: in this process (``slots`` None) or one subprocess per free slot.
    Runs that another live process holds are skipped and revisited every ``poll_s`` seconds until they are
    complete, or free again (their holder died or gave up) and then trained here."""

    def __init__(self, runs: list[PlannedRun], ablation: Ablation, slots: list[Slot] | None, launcher: str = "none",
                 seconds: dict[str, float] | None = None, log: Callable[[str], None] = print,
                 poll_s: float = POLL_S):
        self.runs, self.ablation, self.slots, self.launcher = runs, ablation, slots, launcher
        self.log, self.poll_s = log, poll_s
        self.outcome = Outcome()
        self.progress = Progress(len(runs), seconds, len(slots) if slots else 1)
        self.lock = threading.Lock()
        self.finished: queue.Queue[str] = queue.Queue()
        self.processes: dict[str, Any] = {}

    def run(self) -> Outcome:
        pending = list(self.runs)
        free: list[Slot | None] = list(self.slots) if self.slots else [None]
        threads: list[threading.Thread] = []
        noted: set[str] = set()
        try:
            while pending or any(t.is_alive() for t in threads):
                for run in list(pending):
                    if not free:
                        break
                    claim = self._claim(run, noted)
                    if claim is None:
                        if run.state == "complete" or run.name in self.outcome.failed:
                            pending.remove(run)
                        continue
                    pending.remove(run)
                    slot = free.pop(0)
                    self.progress.started(run.name)
                    if slot is None:
                        self._in_process(run, claim)
                        free.append(None)
                        continue
                    thread = threading.Thread(target=self._subprocess, args=(run, slot, claim, free), daemon=True)
                    thread.start()
                    threads.append(thread)
                if pending or any(t.is_alive() for t in threads):
                    with contextlib.suppress(queue.Empty):  # wake on a finished run, or look at held runs again
                        self.finished.get(timeout=self.poll_s)
        except KeyboardInterrupt:
            with self.lock:
                for process in self.processes.values():
                    process.terminate()
            raise
        return self.outcome

    def _claim(self, run: PlannedRun, noted: set[str]) -> claims.Claim | None:
        """The run's claim, or None: complete (counted), changed (failed), or held by a live process."""
        state = _state(run)
        if state != "complete" and state != "changed":
            try:
                claim = claims.acquire(run.run_dir, role="ablate")
            except claims.ClaimHeldError as err:
                if run.name not in noted:
                    noted.add(run.name)
                    self.log(f"[ablate] {run.name} is held by {claims.describe(err.holder)}; skipping it for now")
                return None
            state = _state(run)  # under the claim: the holder may have finished it meanwhile
            if state in ("new", "resume"):
                run.state = state
                return claim
            claim.release()
        run.state = state
        if state == "complete":
            self.outcome.others.append(run.name)
            self.log(f"[ablate] {run.name} was completed by another process")
        else:
            self.outcome.failed.append(run.name)
            self.log(f"[ablate] {run.name} FAILED: {run.detail}")
        self.log(self.progress.line(run.name, self.outcome))
        return None

    def _finish(self, run: PlannedRun, start: float, error: str | None, summary: dict[str, Any]) -> None:
        with self.lock:
            if error is None:
                self.outcome.here.append(run.name)
                self.log(f"[ablate] {run.name} done in {format_seconds(time.time() - start)}{_best_text(summary)}")
            else:
                self.outcome.failed.append(run.name)
                self.log(f"[ablate] {run.name} FAILED: {error}")
            self.log(self.progress.line(run.name, self.outcome))
        self.finished.put(run.name)

    def _forward(self, line: str) -> None:
        """A child's progress line, to this process's log (whole lines: children run in parallel)."""
        with self.lock:
            self.log(line)

    def _in_process(self, run: PlannedRun, claim: claims.Claim) -> None:
        from workbench.train import train

        start = time.time()
        self.log(f"[ablate] start {run.name} ({run.state}) -> {run.run_dir}")
        try:
            write_run_files(run, self.ablation)
            summary = train(run.config, run_dir=run.run_dir, resume=True, log=self.log)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failed run must not stop the others; it resumes next time
            self._finish(run, start, f"{type(err).__name__}: {err}", {})
            return
        finally:
            claim.release()
        self._finish(run, start, None, summary)

    def _subprocess(self, run: PlannedRun, slot: Slot, claim: claims.Claim, free: list[Slot | None]) -> None:
        from workbench.results import read_summary

        start = time.time()
        try:
            write_run_files(run, self.ablation)
            log_path = run.run_dir / CHECKPOINTS / TRAIN_LOG
            log_path.parent.mkdir(parents=True, exist_ok=True)
            where = f" on GPU {','.join(slot.devices)}" if slot.devices else ""
            self.log(f"[ablate] start {run.name} ({run.state}){where}; log {log_path}")

            def started(process: Any) -> None:
                with self.lock:
                    self.processes[run.name] = process

            code = launch_subprocess(run, slot, self.launcher, claim, log_path, started, forward=self._forward)
            with self.lock:
                self.processes.pop(run.name, None)
            if code != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
                self._finish(run, start, f"exit {code}; last lines of {log_path}:\n    " + "\n    ".join(tail), {})
            else:
                self._finish(run, start, None, read_summary(run.run_dir) or {})
        except Exception as err:
            self._finish(run, start, f"{type(err).__name__}: {err}", {})
        finally:
            claim.release()
            with self.lock:
                free.append(slot)
            self.finished.put(run.name)
