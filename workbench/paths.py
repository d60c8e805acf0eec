"""Where things live: the bundled data, prepared shards and results.

The data folder defaults to ``../shared/data`` next to the repository; ``WORKBENCH_DATA`` (or the CLI's
``--data-dir``, which sets it) points elsewhere. Prepared shards and results are relative to the working
directory unless ``WORKBENCH_PREPARED`` / ``WORKBENCH_RESULTS`` say otherwise.
"""

from __future__ import annotations

import os
import tempfile
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


class FolderError(RuntimeError):
    """An output folder that cannot be used (a regular file in its place, not writable), found before any work."""


def check_writable_folder(path: str | Path, what: str, hint: str) -> None:
    """Refuse an output folder that could not be created or written, naming it, before expensive work starts.

    Probes the folder itself when it exists, else its nearest existing parent (which must be a folder), by
    creating and removing a temporary file: permission bits alone do not tell (root, read-only mounts,
    immutable folders)."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise FolderError(f"{what} {path}: {probe} is a broken link; {hint}")
        probe = probe.parent
    if not probe.is_dir():
        blocker = "it" if probe == path else str(probe)
        raise FolderError(f"{what} {path}: {blocker} is a regular file, not a folder; {hint}")
    try:
        handle, name = tempfile.mkstemp(prefix=".workbench-write-probe-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        where = "" if probe == path else f" (its parent {probe} cannot be written)"
        raise FolderError(f"{what} {path}: not writable{where}: {err.strerror}; {hint}") from None
