"""Many `workbench ablate` processes on one results folder (issue 13): the demo smoke ablation run by two and by
three processes at once trains every run exactly once with no duplicate or missing metrics rows; a run whose
holder was SIGKILLed on another (simulated) host is resumed by another process once the claim expires; a
SIGKILLed runner's `workbench train` children die with it and a rerun finishes every run once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from ablation_smoke import DEMO

from workbench import ablate, claims
from workbench.paths import REPO_ROOT
from workbench.results import read_summary

pytestmark = pytest.mark.slow
ONLY = ("ar", "mask", "mdm")


def ablate_command(root: Path, only: tuple[str, ...], parallel: int = 1) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", "ablate", str(DEMO), "--smoke", "--only", ",".join(only),
            "--parallel", str(parallel), "--no-probe", "--results", str(root)]


def ablate_process(root: Path, only: tuple[str, ...], parallel: int = 1, **env: str) -> subprocess.Popen:
    return subprocess.Popen(ablate_command(root, only, parallel), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **env))


def prepare_once(only: tuple[str, ...], root: Path) -> list[ablate.PlannedRun]:
    runs = ablate.load_ablation(DEMO, smoke=True, only=list(only), results_root=root).runs
    ablate.prepare_data(runs, log=lambda _: None)  # shared shards exist before the processes start
    return runs


def check_complete_rows(run_dir: Path) -> None:
    """Every run: complete after 3 epochs, each (step, split, metric) once, validation at the entropy row plus
    6 evaluations, a training row at every log interval (4 steps) up to the last of the 96 steps."""
    summary = read_summary(run_dir)
    assert summary["status"] == "complete" and summary["epochs"] == 3, summary
    frame = pl.read_parquet(run_dir / "metrics.parquet")
    assert frame.select("step", "split", "metric").is_duplicated().sum() == 0
    assert frame.filter(pl.col("split") == "val")["step"].n_unique() == 7
    train_steps = sorted(set(frame.filter(pl.col("split") == "train")["step"].to_list()))
    assert train_steps == list(range(4, 97, 4)), train_steps


def running(pid: int) -> bool:
    """A live process (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def child_trainers(parent: int) -> list[int]:
    """Pids of the `workbench train` processes whose parent is ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or f"PPid:\t{parent}\n" not in (entry / "status").read_text():
                continue
            if b"train" in (entry / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def started_runs(output: str) -> list[str]:
    return re.findall(r"\[ablate\] start (\S+) ", output)


@pytest.mark.parametrize("processes", [2, 3])
def test_concurrent_ablate_processes_train_every_run_once(tmp_path, processes):
    root = tmp_path / "results"
    runs = prepare_once(ONLY, root)
    start = time.time()
    procs = []
    for _ in range(processes):
        procs.append(ablate_process(root, ONLY))
        time.sleep(0.2)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    print(f"{processes} concurrent ablate processes: {time.time() - start:.1f}s wall")
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output
        assert "3/3 runs finished" in output, output
    started = [name for output in outputs for name in started_runs(output)]
    assert sorted(started) == sorted(r.name for r in runs)  # each run trained once, by exactly one process
    assert sum("by other processes" in output for output in outputs) >= 1
    for run in runs:
        check_complete_rows(run.run_dir)
        assert claims.current(run.run_dir) is None  # every claim released


def test_a_sigkilled_holders_run_is_resumed_by_another_process_once_its_claim_expires(tmp_path, monkeypatch):
    root, expiry = tmp_path / "results", 3.0
    (run,) = prepare_once(("ar",), root)
    victim = ablate_process(root, ("ar",), **{claims.HOST_ENV: "host-a", claims.EXPIRY_ENV: str(expiry)})
    deadline = time.time() + 300
    latest = run.run_dir / "checkpoints" / "latest-rank0.pt"
    while not (latest.exists() and latest.resolve().name.startswith("ep1-")):  # killed after its first checkpoint
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0]
        time.sleep(0.1)
    monkeypatch.setenv(claims.HOST_ENV, "host-b")  # this test process plays a second machine
    with pytest.raises(claims.ClaimHeldError, match="host host-a"):  # alive: its heartbeat keeps the claim
        claims.acquire(run.run_dir)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.time()
    last_beat = claims.current(run.run_dir)[1]["heartbeat"]
    rows_before = pl.read_parquet(run.run_dir / "metrics.parquet").height
    while True:
        try:
            claims.acquire(run.run_dir).release()
            break
        except claims.ClaimHeldError:
            assert time.time() - killed < expiry + 5, "the killed holder's claim never expired"
            time.sleep(0.05)
    free = time.time()
    print(f"claim of the SIGKILLed holder free {free - killed:.1f}s after the kill, {free - last_beat:.1f}s after "
          f"its last heartbeat (expiry {expiry:g}s)")
    assert last_beat + expiry <= free <= last_beat + expiry + 1  # not before the expiry, and soon after it
    taker = ablate_process(root, ("ar",), **{claims.HOST_ENV: "host-b", claims.EXPIRY_ENV: str(expiry)})
    output = taker.communicate(timeout=600)[0]
    assert taker.returncode == 0, output
    assert "[train] resuming" in output and "1/1 runs finished" in output  # from the victim's checkpoint
    assert rows_before > 0
    check_complete_rows(run.run_dir)


def test_children_of_a_sigkilled_runner_die_and_a_rerun_finishes_every_run_once(tmp_path):
    root = tmp_path / "results"
    runs = prepare_once(("ar", "mdm"), root)
    parent = ablate_process(root, ("ar", "mdm"), parallel=2)
    deadline = time.time() + 300
    children: list[int] = []
    while len(children) < 2:  # both `workbench train` children started
        assert parent.poll() is None and time.time() < deadline, parent.communicate()[0]
        time.sleep(0.2)
        children = child_trainers(parent.pid)
    time.sleep(2.0)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    killed = time.time()
    while any(running(pid) for pid in children):
        assert time.time() - killed < 15, f"children {children} outlived their killed runner"
        time.sleep(0.1)
    rerun = ablate_process(root, ("ar", "mdm"), parallel=2)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0 and "2/2 runs finished" in output, output
    assert sorted(started_runs(output)) == sorted(r.name for r in runs)
    for run in runs:
        check_complete_rows(run.run_dir)
