"""``workbench tune --summary`` prints ``optuna-dashboard <storage URL>``: after set-up that command exists and
serves the study from the SQLite file a study writes (``sqlite:///results/<study>/study.db``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_optuna_dashboard_command_serves_a_workbench_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="token-masking-rate", storage=url, direction="minimize")
    study.set_metric_names(["val/ar_nll"])
    for rate in (0.1, 0.3):
        study.enqueue_trial({"rate": rate})
        study.optimize(lambda trial: 5.0 + trial.suggest_float("rate", 0.0, 0.5), n_trials=1)

    command = Path(sys.executable).parent / "optuna-dashboard"
    assert command.is_file(), f"{command} missing: make setup installs it (the dashboard extra)"
    port = _free_port()
    server = subprocess.Popen([str(command), url, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer within 60 s"
        (entry,) = studies
        assert entry["study_name"] == "token-masking-rate"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{entry['study_id']}", timeout=5) as reply:
            detail = json.loads(reply.read())
        assert len(detail["trials"]) == 2 and detail["objective_names"] == ["val/ar_nll"]
    finally:
        server.terminate()
        server.wait(timeout=30)
