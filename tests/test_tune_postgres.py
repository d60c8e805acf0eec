"""Two ``workbench tune`` worker processes share one study in a real PostgreSQL server; one is SIGKILLed mid-trial.

The server: ``$WORKBENCH_TEST_POSTGRES`` (``.ci/run`` installs the Debian package and starts one on loopback), or
else a throwaway cluster this module starts from the PostgreSQL binaries it finds. Only when neither works, and
not under CI, the test is skipped with the reason."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import polars as pl
import pytest
import yaml
from conftest import TINY, make_config
from optuna.trial import TrialState

from datasets_prep.corpus import prepare
from workbench.cli import main
from workbench.config import deep_merge
from workbench.results import read_metrics, read_summary
from workbench.tune.study import storage_url

IN_CI = bool(os.environ.get("CI"))


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL test cannot run in CI: {reason}")
    pytest.skip(f"no PostgreSQL server: {reason} (set WORKBENCH_TEST_POSTGRES=postgresql://... or install the "
                "postgresql package)")


def _reachable(url: str) -> str | None:
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as err:
        return f"cannot connect to {url}: {str(err).strip()}"
    return None


@contextlib.contextmanager
def _throwaway_server(root: Path):
    """initdb + pg_ctl start on a free loopback port (as the postgres user when running as root)."""
    binaries = [os.path.dirname(os.path.realpath(p)) for p in [shutil.which("initdb")] if p]
    binaries += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = [b for b in binaries if all(os.path.exists(os.path.join(b, t)) for t in ("initdb", "pg_ctl", "createdb"))]
    if not found:
        raise RuntimeError("no initdb, pg_ctl and createdb found (PATH or /usr/lib/postgresql/*/bin)")
    bin_dir = found[0]
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    subprocess.run([*prefix, f"{bin_dir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                    "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start"], check=True, capture_output=True)
    try:
        subprocess.run([f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "workbench"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/workbench"
    finally:
        subprocess.run([*prefix, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)


@pytest.fixture(scope="module")
def postgres_url():
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install -e '.[postgres]')")
    url = os.environ.get("WORKBENCH_TEST_POSTGRES")
    if url:
        problem = _reachable(url)
        if problem:  # a configured server that does not answer is an error, never a skip
            pytest.fail(f"WORKBENCH_TEST_POSTGRES: {problem}")
        yield url
        return
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))  # not under pytest's 0700 tmp: postgres must reach it
    os.chmod(root, 0o755)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        try:
            url = stack.enter_context(_throwaway_server(root))
        except (OSError, RuntimeError, LookupError, subprocess.CalledProcessError) as err:
            detail = (getattr(err, "stderr", None) or b"").decode(errors="replace").strip()[-300:]
            _unavailable(f"could not start one ({err} {detail})")
        yield url


def _logs(paths: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in paths if p.exists())


def _checkpointed(run_dir: Path) -> bool:
    """The first checkpoint (batch 4) is on disk. The metric rows up to it may not be: the tidy logger rewrites
    metrics.parquet at evaluations and every few seconds, and the retry rebuilds what the file lacks from the
    checkpoint (waiting for the rows here waited for the evaluation at the trial's last batch, and the victim could
    finish its trial before the kill)."""
    return (run_dir / "checkpoints" / "latest-rank0.pt").exists()


def test_two_workers_share_a_postgres_study_and_retry_a_killed_trial(postgres_url, tmp_path, results_root, capsys):
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh study every time
    run = deep_merge({k: v for k, v in TINY.items() if k != "name"},
                     {"eval": {"interval": "12ba"}, "trainer": {"checkpoint_interval": "4ba", "keep_checkpoints": 3}})
    study_file = tmp_path / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": name, "run": run, "search_space": {"optimizer.lr": {"low": 1e-3, "high": 5e-3, "log": True}},
        "objective": "val/ar_nll", "sampler": {"name": "random", "seed": 0}, "pruner": "none", "n_trials": 4,
        "budget": "12288tok", "retry": {"max_retry": 1}, "heartbeat": {"interval": 1, "grace_period": 4}}))
    prepare(make_config().data, log=lambda message: None)  # shared by this session's other tests anyway

    command = [sys.executable, "-m", "workbench.cli", "tune", str(study_file), "--storage", postgres_url]
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    by_pid = {str(worker.pid): worker for worker in workers}
    folder = results_root / name
    try:
        storage = optuna.storages.RDBStorage(storage_url(postgres_url))
        # SIGKILL the first worker seen running a trial past its first checkpoint (so the retry can resume)
        killed = victim = None
        deadline = time.time() + 240
        while victim is None:
            assert time.time() < deadline, "no worker ran a trial past its first checkpoint\n" + _logs(logs)
            assert all(worker.poll() is None for worker in workers), "a worker exited early\n" + _logs(logs)
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name=name, storage=storage)
                for trial in study.get_trials(states=(TrialState.RUNNING,)):
                    pid = trial.user_attrs.get("worker", ":").rsplit(":", 1)[1]
                    if pid in by_pid and _checkpointed(folder / f"trial-{trial.number}"):
                        victim, killed = by_pid[pid], trial.number
                        os.kill(victim.pid, signal.SIGKILL)
                        break
            time.sleep(0.2)
        survivor = next(worker for worker in workers if worker is not victim)
        victim.wait(timeout=30)
        assert survivor.wait(timeout=300) == 0, _logs(logs)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers) == 5, _logs(logs)  # 4 requested + 1 retry, every number once
    originals = [t for t in trials if "failed_trial" not in t.system_attrs]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(originals) == 4  # the requested total: no trial lost, none created twice
    assert [t.state for t in originals].count(TrialState.COMPLETE) == 3
    lost = next(t for t in trials if t.number == killed)
    assert lost.state == TrialState.FAIL and lost.user_attrs["worker"].endswith(f":{victim.pid}")
    assert len(retries) == 1
    retry = retries[0]
    assert retry.system_attrs["failed_trial"] == killed and retry.params == lost.params
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["worker"].endswith(f":{survivor.pid}")
    workers_seen = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert workers_seen == {str(victim.pid), str(survivor.pid)}  # both processes ran trials concurrently

    # every trial's results are in its own folder; the killed attempt's folder says what happened
    run_dirs = [tuple(t.user_attrs["run_dirs"]) for t in trials]
    assert len(set(run_dirs)) == len(run_dirs) == 5
    for trial in trials:
        summary = read_summary(folder / f"trial-{trial.number}")
        assert summary["trial"] == trial.number
        if trial.state == TrialState.COMPLETE:
            assert summary["status"] == "complete" and trial.value == pytest.approx(summary["best_ar_nll"])
    lost_summary = read_summary(folder / f"trial-{killed}")
    assert lost_summary["status"] == "failed" and f"retried as trial {retry.number}" in lost_summary["error"]

    # the retry resumed from the killed attempt's checkpoint: its rows up to there were carried over (renamed)
    assert retry.user_attrs["resumed_from"] == killed
    resumed = read_summary(folder / f"trial-{retry.number}")
    assert resumed["resumed_from"] == str(folder / f"trial-{killed}")
    rows = read_metrics(folder / f"trial-{retry.number}" / "metrics.parquet")
    assert rows["run"].unique().to_list() == [f"{name}-trial-{retry.number}"]
    assert rows.filter((pl.col("split") == "train") & (pl.col("metric") == "loss"))["step"].to_list() == [4, 8, 12]
    assert rows.filter((pl.col("split") == "val") & (pl.col("metric") == "ar_nll"))["step"].to_list() == [12]

    # the summary reads the shared study: 4 completed trials, importances of the one parameter
    capsys.readouterr()
    assert main(["tune", "--summary", str(study_file), "--storage", postgres_url]) == 0
    printed = capsys.readouterr().out
    assert "5 trials: 4 complete, 1 fail" in printed and "parameter importances for val/ar_nll (" in printed
    assert "  optimizer.lr: 1.000" in printed
