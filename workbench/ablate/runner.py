"""Running planned runs: in this process through :func:`workbench.train.train`, or as ``workbench train``
subprocesses in slots (CPU threads, GPUs, Composer's launcher)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.ablate.spec import VARIANT_FILE, Ablation, PlannedRun, format_seconds


def write_variant_file(run: PlannedRun, ablation: Ablation) -> None:
    from workbench.results import write_json

    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / VARIANT_FILE, run.variant_record(str(ablation.path), ablation.smoke))


def prepare_data(runs: list[PlannedRun], log: Callable[[str], None] = print) -> None:
    """Prepare each distinct data config once, before any run starts (concurrent runs then only read)."""
    from datasets_prep.corpus import prepare

    seen: list[Any] = []
    for run in runs:
        if run.config.data in seen:
            continue
        seen.append(run.config.data)
        prepare(run.config.data, log=log)


def run_in_process(runs: list[PlannedRun], ablation: Ablation, log: Callable[[str], None] = print) -> list[str]:
    """Train ``runs`` one after another through workbench.train.train; returns the names that failed."""
    from workbench.train import train

    failed = []
    for i, run in enumerate(runs, 1):
        log(f"[ablate] {i}/{len(runs)} {run.name} ({run.state}) -> {run.run_dir}")
        write_variant_file(run, ablation)
        start = time.time()
        try:
            summary = train(run.config, run_dir=run.run_dir, resume=True, log=log)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failed run must not stop the others; it resumes next time
            failed.append(run.name)
            log(f"[ablate] {run.name} FAILED: {type(err).__name__}: {err}")
            continue
        log(f"[ablate] {run.name} done in {format_seconds(time.time() - start)}{_best_text(summary)}")
    return failed


def _best_text(summary: dict[str, Any]) -> str:
    best = {k: v for k, v in summary.items() if k in ("best_ar_nll", "best_mdm_nelbo")}
    return "".join(f"; {k} {v:.4f}" for k, v in best.items())


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
    train_args = ["train", str(run.run_dir / "config.yaml"), "--run-dir", str(run.run_dir), "--resume"]
    if launcher == "composer":
        return [sys.executable, "-m", "composer.cli", "-n", str(slot.nproc), "--master_port", str(slot.port),
                "-m", "workbench.cli", *train_args]
    return [sys.executable, "-m", "workbench.cli", *train_args]


def run_subprocesses(runs: list[PlannedRun], ablation: Ablation, slots: list[Slot], launcher: str,
                     log: Callable[[str], None] = print) -> list[str]:
    """Run each run as a ``workbench train`` subprocess, at most one per slot at a time, started in plan order;
    returns the names that failed. (Concurrent runs register Streaming's shared memory one at a time, see
    workbench.data.streaming_registration_lock.)"""
    import queue
    import subprocess
    import threading

    from workbench.config import dump_config
    from workbench.results import read_summary

    free: queue.Queue[Slot] = queue.Queue()
    for slot in slots:
        free.put(slot)
    failed: list[str] = []
    processes: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()

    def launch(run: PlannedRun, slot: Slot, log_path: Path) -> int:
        env = dict(os.environ)
        if slot.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.devices)
        if slot.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
        with log_path.open("ab") as handle:
            process = subprocess.Popen(subprocess_command(run, slot, launcher), stdout=handle,
                                       stderr=subprocess.STDOUT, env=env)
        with lock:
            processes[run.name] = process
        code = process.wait()
        with lock:
            processes.pop(run.name, None)
        return code

    def work(index: int, run: PlannedRun, slot: Slot) -> None:
        try:
            write_variant_file(run, ablation)
            (run.run_dir / "config.yaml").write_text(dump_config(run.config))  # what `workbench train` reads
            log_path = run.run_dir / "checkpoints" / "train.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            where = f" on GPU {','.join(slot.devices)}" if slot.devices else ""
            log(f"[ablate] {index}/{len(runs)} start {run.name} ({run.state}){where}; log {log_path}")
            start = time.time()
            code = launch(run, slot, log_path)
            if code != 0:
                with lock:
                    failed.append(run.name)
                tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
                log(f"[ablate] {run.name} FAILED (exit {code}); last lines of {log_path}:\n    " + "\n    ".join(tail))
            else:
                summary = read_summary(run.run_dir) or {}
                log(f"[ablate] {run.name} done in {format_seconds(time.time() - start)}{_best_text(summary)}")
        finally:
            free.put(slot)

    threads = []
    try:
        for index, run in enumerate(runs, 1):
            while True:  # wait for a free slot (with a timeout, so Ctrl-C is seen)
                try:
                    slot = free.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            thread = threading.Thread(target=work, args=(index, run, slot), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        with lock:
            for process in processes.values():
                process.terminate()
        raise
    return failed

