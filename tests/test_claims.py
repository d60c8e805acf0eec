"""Run claims (workbench.claims): one live holder per run folder across processes and (simulated) hosts; a dead
holder's claim is taken over at once on its own machine and after its expiry elsewhere; a holder that was
frozen past its expiry stops instead of training beside the process that took over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from workbench import claims
from workbench.paths import REPO_ROOT

HOLD = textwrap.dedent("""
    import sys, time
    from workbench import claims
    claim = claims.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 120)
    claim.release()
""")


def start_holder(run_dir: Path, host: str | None = None, expiry: float | None = None, hold_s: float = 120,
                 ) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if host:
        env[claims.HOST_ENV] = host
    if expiry:
        env[claims.EXPIRY_ENV] = str(expiry)
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(hold_s)], env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over_at_once_on_its_machine(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(claims.ClaimHeldError, match=rf"{run_dir} is being trained by host \S+ pid "
                                                       rf"{holder.pid} \(heartbeat"):
            claims.acquire(run_dir)
    finally:
        kill(holder)
    claim = claims.acquire(run_dir)  # same kernel: the pid is gone, no need to wait for the expiry
    assert claims.current(run_dir)[1]["pid"] == os.getpid() and claim.gen == 1
    claim.release()
    assert claims.current(run_dir) is None and run_dir.exists()  # released; the folder another process made stays


def test_a_holder_on_another_host_keeps_its_claim_by_heartbeat_and_loses_it_after_the_expiry(tmp_path,
                                                                                            monkeypatch):
    run_dir, expiry = tmp_path / "run", 1.5
    monkeypatch.setenv(claims.HOST_ENV, "host-b")
    holder = start_holder(run_dir, host="host-a", expiry=expiry)
    try:
        time.sleep(2 * expiry)  # longer than the expiry: only its heartbeat keeps it alive
        with pytest.raises(claims.ClaimHeldError, match="host host-a pid"):
            claims.acquire(run_dir)
    finally:
        kill(holder)
    killed = time.time()
    while True:
        try:
            claim = claims.acquire(run_dir)
            break
        except claims.ClaimHeldError:
            assert time.time() - killed < expiry + 2, "the dead holder's claim never expired"
            time.sleep(0.05)
    waited = time.time() - killed
    print(f"claim of a dead holder on another host taken over after {waited:.2f}s (expiry {expiry}s)")
    assert expiry * 0.7 <= waited <= expiry + 2  # not before the expiry (minus at most one heartbeat interval)
    assert claims.current(run_dir)[1]["host"] == "host-b"
    claim.release()


def test_of_processes_racing_for_a_free_run_exactly_one_wins(tmp_path):
    run_dir = tmp_path / "run"
    race = textwrap.dedent("""
        import sys, time
        from workbench import claims
        while time.time() < float(sys.argv[2]):
            pass
        try:
            claim = claims.acquire(sys.argv[1])
        except claims.ClaimHeldError:
            print("held", flush=True)
        else:
            print("won", flush=True)
            time.sleep(1.5)
            claim.release()
    """)
    go = time.time() + 1.5
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    processes = [subprocess.Popen([sys.executable, "-c", race, str(run_dir), str(go)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in processes)
    assert results == ["held", "held", "held", "won"]


def test_a_holder_frozen_past_its_expiry_stops_once_another_took_over(tmp_path, monkeypatch):
    run_dir, expiry = tmp_path / "run", 1.0
    monkeypatch.setenv(claims.HOST_ENV, "host-b")
    holder = start_holder(run_dir, host="host-a", expiry=expiry, hold_s=30)
    try:
        holder.send_signal(signal.SIGSTOP)
        time.sleep(expiry + 0.5)
        claim = claims.acquire(run_dir)
        holder.send_signal(signal.SIGCONT)
        assert holder.wait(timeout=10) == claims.LOST_EXIT_CODE  # it did not sleep on as a second trainer
        assert claims.current(run_dir)[1]["host"] == "host-b" and claim.still_ours()
        claim.release()
    finally:
        if holder.poll() is None:
            kill(holder)


def test_a_handed_over_claim_is_held_by_the_child_and_released_when_it_exits(tmp_path):
    run_dir = tmp_path / "run"
    parent = claims.acquire(run_dir, role="ablate")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **parent.hand_over())
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from workbench import claims
        with claims.hold(sys.argv[1]):
            print("held", flush=True)
            time.sleep(float(sys.argv[2]))
    """), str(run_dir), "1.0"], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    record = claims.current(run_dir)[1]
    assert record["pid"] == child.pid and record["token"] == parent.token  # adopted: the child's pid, same claim
    assert child.wait(timeout=30) == 0
    parent.release()
    assert claims.current(run_dir) is None


@pytest.mark.slow
def test_train_resume_refuses_a_run_another_process_is_training(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "name": "held"}))
    holder = start_holder(run_dir)
    try:
        result = subprocess.run([sys.executable, "-m", "workbench.cli", "train", str(config), "--run-dir",
                                 str(run_dir), "--resume"], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    finally:
        kill(holder)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert f"{run_dir} is being trained by host " in result.stderr and f"pid {holder.pid}" in result.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.parquet").exists()
