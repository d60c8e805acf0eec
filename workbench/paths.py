"""Where things live: the bundled data, prepared shards and results.

The data folder defaults to ``../shared/data`` next to the repository; ``WORKBENCH_DATA`` (or the CLI's
``--data-dir``, which sets it) points elsewhere. Prepared shards and results are relative to the working
directory unless ``WORKBENCH_PREPARED`` / ``WORKBENCH_RESULTS`` say otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The read-only data folder (corpus, eval tasks, tokenizers)."""
    env = os.environ.get("WORKBENCH_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def prepared_dir() -> Path:
    """Cache of prepared MDS shards and trained tokenizers (git-ignored, content-addressed)."""
    return Path(os.environ.get("WORKBENCH_PREPARED", "prepared")).expanduser().resolve()


def results_dir() -> Path:
    """Root of run results (committed metrics and reports; checkpoints are git-ignored)."""
    return Path(os.environ.get("WORKBENCH_RESULTS", "results")).expanduser().resolve()


def expand(value: str) -> str:
    """Expand ``${data}``, ``${repo}`` and ``~`` in a path-like config value."""
    return os.path.expanduser(value.replace("${data}", str(data_dir())).replace("${repo}", str(REPO_ROOT)))
