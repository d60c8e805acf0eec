"""``.ci/gpu-check``, the one prepared script for a GPU host, run here on the CPU (``SHAPES=micro``) so it cannot rot,
and its carry checks: a missing wheelhouse or data slice fails in one line naming it, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workbench.paths import REPO_ROOT, data_dir

SCRIPT = REPO_ROOT / ".ci" / "gpu-check"


def _run(env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if key not in ("WORKBENCH_DATA", "PYTHONPATH")}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    result = _run({"PYTHON": sys.executable, "SHAPES": "micro", "STEPS": "2", "HOST_REPEATS": "1", "FIRST_EXTRA": "",
                   "OUT": str(tmp_path), "WORKBENCH_DATA": str(data_dir())})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((tmp_path / "bench" / "cpu-micro.json").read_text())
    assert [row["path"] for row in written["rows"]][:2] == ["reference loop", "workbench train (ar)"]
    assert [(row["loop"], row["num_workers"]) for row in written["host_time"]] == [
        ("composer", 0), ("workbench", 0), ("workbench", 2)]
    assert all(row["host_ms_runs"] == [row["host_ms"]] and 0 < row["host_ms"] < row["step_ms"]
               for row in written["host_time"])
    assert "framework host time per step" in result.stdout


def test_python_without_torch_is_named(tmp_path):
    """The host's python must bring its own torch (the wheelhouse leaves it out)."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages
    (bare / "python").chmod(0o755)
    result = _run({"PYTHON": str(bare / "python"), "CARRY": str(tmp_path / "carry")}, timeout=60)
    assert result.returncode == 2
    assert "gpu-check:" in result.stderr and "cannot import torch" in result.stderr


def test_missing_wheels_for_composer_are_named(tmp_path):
    """torch importable (the host has its own) but not Composer, and no wheels carried."""
    shim = tmp_path / "site"
    shim.mkdir()
    (shim / "composer.py").write_text("raise ImportError('not on this host')\n")  # shadows the installed package
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shim} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    result = _run({"PYTHON": str(wrapper), "CARRY": str(tmp_path / "carry")}, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'carry'}/wheels/ has no wheels" in lines[0], result.stderr


def test_missing_data_slice_is_named(tmp_path):
    carry = tmp_path / "carry"
    (carry / "data").mkdir(parents=True)
    result = _run({"PYTHON": sys.executable, "CARRY": str(carry)}, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (f"gpu-check: no {carry}/data/wikipedia-en: copy the data slice "
                                     f"before the run: cp -r ../shared/data {carry}/data (or set WORKBENCH_DATA)")
