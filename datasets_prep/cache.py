"""The prepared cache, written safely by any number of processes on any number of hosts.

Three rules keep concurrent ``prepare()`` calls (ranks under Composer's launcher, ablation runs, Optuna workers)
correct without a coordinator:

* **One writer per output.** :func:`exclusive` holds an inter-process lock (``filelock``: ``flock`` on a lock file
  beside the output, released by the kernel if the holder dies) while an output is built; the others wait and
  then find it finished.
* **Atomic publication.** Files and folders are built under a unique temporary name in the same folder and renamed
  into place, so a reader sees nothing or the finished output, never a part of it.
* **Content keys.** Inputs are identified by their sha256; :func:`file_sha256` caches each file's hash under its
  stat signature so an unchanged multi-GB corpus is not re-read on every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from workbench.paths import prepared_dir

HASH_CACHE = "hashes"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a unique temporary file beside it and one rename (readers never see a partial file;
    two writers of the same content both succeed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_dir_beside(out: Path) -> Path:
    """A new, uniquely named, hidden folder next to ``out`` (same filesystem, so a rename publishes it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def remove_stale_temps(out: Path) -> None:
    """Delete temporary folders of ``out`` left by killed writers. Call only while holding ``exclusive(out)``:
    every writer of ``out`` holds it, so no live one owns them."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; a previous ``out`` (a forced re-preparation) is first renamed
    aside and deleted afterwards, so ``out`` never holds a mixture of old and new files."""
    if out.exists():
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-old-"))
        os.replace(out, aside / out.name)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def exclusive(target: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the inter-process lock of ``target`` (the lock file ``.<name>.lock`` beside it). ``waiting`` is called
    once when another process holds it. Raises ``OSError`` when the lock file cannot be created there.

    The workbench's one file lock: prepared outputs, Streaming's shared-memory registration
    (:func:`workbench.data.streaming_registration_lock`) and a local MLflow store (workbench.trackers)."""
    lock_path = target.with_name(f".{target.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting is not None:
            waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _stat_signature(path: Path) -> list[int]:
    """What changes whenever the file's bytes can have changed: device, inode, size, mtime and ctime in ns.

    ctime is set by the kernel on every write and cannot be set back from user space, so an in-place edit that
    keeps the size and restores the mtime (``cp -p``, ``rsync -t``, ``touch -d``) still changes the signature;
    copying or moving the file changes it too, which costs one re-hash, never a stale key."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached in the prepared cache under the file's stat signature.

    The cache is an optimisation only: a read-only or missing cache means hashing every time, never an error."""
    path = path.resolve()
    entry = prepared_dir() / HASH_CACHE / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    signature = _stat_signature(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(entry.read_text())
        if record["path"] == str(path) and record["stat"] == signature:
            return str(record["sha256"])
    digest = _hash_file(path)
    if _stat_signature(path) == signature:  # not modified while it was read
        with contextlib.suppress(OSError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(entry, json.dumps({"path": str(path), "stat": signature, "sha256": digest}).encode())
    return digest


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and prove that a file can be written in it (a real write: permission bits say nothing for
    root, read-only mounts or immutable folders). Raises ``OSError``."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
