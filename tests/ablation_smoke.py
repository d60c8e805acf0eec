"""One smoke ablation per test session, shared by test_ablate, test_analysis and test_notebook.

``smoke_results()`` runs ``workbench ablate ablations/demo.yaml --smoke --only ar,mask,mdm --parallel 2``
(3 tiny runs as ``workbench train`` subprocesses, two at a time) into the session's results folder once and
returns ``results/demo``; later calls (from any test module) return the cached folder."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from pathlib import Path

from workbench.paths import REPO_ROOT

DEMO = REPO_ROOT / "ablations" / "demo.yaml"
SMOKE_VARIANTS = ("ar", "mask", "mdm")
ABLATE_ARGS = ["ablate", str(DEMO), "--smoke", "--only", ",".join(SMOKE_VARIANTS), "--parallel", "2", "--no-probe"]


@functools.cache
def smoke_results() -> tuple[Path, str, float]:
    """(results/demo folder, the command's output, seconds it took)."""
    from workbench.cli import main

    out = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(out):
        code = main(ABLATE_ARGS)
    elapsed = time.time() - start
    if code != 0:
        raise RuntimeError(f"smoke ablation failed ({code}):\n{out.getvalue()}")
    return Path(os.environ["WORKBENCH_RESULTS"]) / "demo", out.getvalue(), elapsed
