"""Run claims: at most one live process trains a run folder at a time, on one machine or on several machines
sharing the results folder (NFS included).

A claim is a lease file ``<run_dir>/.claim.<generation>.json`` naming its holder (host, pid, the process's start
time, the kernel boot id and pid namespace) and a heartbeat that a daemon thread of the holder rewrites every
``expiry / 4`` seconds (temp file + rename, so a reader never sees half a file). The highest generation is the
claim. A process takes a run by creating the next generation with ``os.link`` (atomic and exclusive on local file
systems and on NFS, where ``O_EXCL`` on old clients and ``flock`` across hosts are not to be trusted): of two
processes racing for the same generation exactly one wins, the other re-reads and sees a live holder.

A holder is dead when (same kernel: same host name, boot id and pid namespace) its pid is gone or belongs to a
newer process, so a rerun on the same machine takes over at once; otherwise when its heartbeat is older than the
expiry it recorded (default 60 s, ``$WORKBENCH_CLAIM_EXPIRY``), which assumes the hosts' clocks agree to well
within the expiry (NTP). A claim handed to a scheduler job before it starts (``job:``) is alive while the
scheduler lists the job. A holder that finds a higher generation (it was frozen past its expiry and a taker moved
on) stops its process: two trainers never write the same folder.

Hand-over: the ablation runner claims a run, writes its files, then starts ``workbench train`` with the claim's
token in ``$WORKBENCH_CLAIM_TOKEN``; the child adopts the claim (rewrites it with its own identity) and
heartbeats it while it trains, so the claim lives exactly as long as the process that trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPIRY_ENV = "WORKBENCH_CLAIM_EXPIRY"
TOKEN_ENV = "WORKBENCH_CLAIM_TOKEN"
HOST_ENV = "WORKBENCH_CLAIM_HOST"  # the host name written into claims (tests simulate two hosts on one machine)
DEFAULT_EXPIRY_S = 60.0
LOST_EXIT_CODE = 75  # EX_TEMPFAIL: this process lost its claim and stopped
_FILE = re.compile(r"\.claim\.(\d+)\.json")
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                    "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


class ClaimHeldError(RuntimeError):
    """Another live process (or a queued job) holds the run."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]):
        self.run_dir, self.holder = run_dir, holder
        super().__init__(f"{run_dir} is being trained by {describe(holder)}; wait for it, or stop that process "
                         f"(a dead holder's claim is taken over {_takeover_text(holder)})")


def expiry_s() -> float:
    """The expiry this process writes into its claims ($WORKBENCH_CLAIM_EXPIRY seconds, default 60)."""
    raw = os.environ.get(EXPIRY_ENV)
    if not raw:
        return DEFAULT_EXPIRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        from workbench.config import ConfigError

        raise ConfigError("environment", EXPIRY_ENV, f"expected seconds > 0, got {raw!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# who is alive


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def identity(pid: int | None = None) -> dict[str, Any]:
    """Who this process is, as written into a claim."""
    pid = pid or os.getpid()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": os.environ.get(HOST_ENV) or socket.gethostname(),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns, "pid": pid,
            "pid_start": _start_time(pid)}


def _same_kernel(record: dict[str, Any]) -> bool:
    me = identity()
    return all(record.get(k) == me[k] for k in ("host", "boot_id", "pidns")) and me["boot_id"] is not None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return start is None or _start_time(pid) in (None, start)


def _job_alive(job: dict[str, Any]) -> bool:
    """A queued or running scheduler job (its task has not adopted the claim yet)."""
    if job.get("scheduler") == "slurm":
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(job["id"]), "-o", "%T"], capture_output=True, text=True,
                                 timeout=30)
        except FileNotFoundError:
            return True  # no Slurm client on this host: it cannot tell, so the job's claim stands
        except subprocess.TimeoutExpired:
            return True
        return out.returncode == 0 and any(s.strip() in _LIVE_JOB_STATES for s in out.stdout.split())
    pid = job.get("pid")  # submitit's local executor: a process on the submitting machine
    return pid is not None and _same_kernel(job) and _pid_alive(int(pid), job.get("pid_start"))


def alive(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether a claim's holder still counts as alive."""
    if record.get("job"):
        return _job_alive(record["job"])
    if _same_kernel(record):
        return _pid_alive(int(record["pid"]), record.get("pid_start"))
    now = time.time() if now is None else now
    return now - float(record.get("heartbeat", 0)) < float(record.get("expiry_s", DEFAULT_EXPIRY_S))


def describe(record: dict[str, Any]) -> str:
    """'host h pid 123 (heartbeat 3s ago)' or 'Slurm job 456_7' for messages."""
    job = record.get("job")
    if job:
        return f"{job.get('scheduler', 'a')} job {job.get('id')} (submitted from host {record.get('host')})"
    age = time.time() - float(record.get("heartbeat", 0))
    return f"host {record.get('host')} pid {record.get('pid')} (heartbeat {age:.0f}s ago)"


def _takeover_text(record: dict[str, Any]) -> str:
    if record.get("job"):
        return "once the scheduler no longer lists the job"
    return (f"at once on its own host, after {float(record.get('expiry_s', DEFAULT_EXPIRY_S)):g}s without a "
            "heartbeat from others")


# --------------------------------------------------------------------------------------------------------------
# lease files


def _files(run_dir: Path) -> dict[int, Path]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): run_dir / name for name in names if (m := _FILE.fullmatch(name))}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        return {"host": "unknown", "pid": -1, "heartbeat": mtime, "unreadable": str(path)}


def current(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The highest generation and its record, or None when nobody ever claimed (or the claim was released)."""
    files = _files(run_dir)
    while files:
        gen = max(files)
        record = _load(files.pop(gen))
        if record is not None:
            return gen, record
    return None


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` iff it does not exist (hard link of a complete temp file)."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps(record, sort_keys=True))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        return tmp.stat().st_nlink == 2  # NFS: the link may have succeeded although its reply was lost
    finally:
        tmp.unlink(missing_ok=True)


def _rewrite(path: Path, record: dict[str, Any]) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# claims held by this process


@dataclass(eq=False)
class Claim:
    """One run folder held by this process (or handed to a child that adopts it)."""

    run_dir: Path
    gen: int
    record: dict[str, Any]
    on_lost: Callable[[Claim], None] | None = None
    handed_over: bool = False  # a child (or job) took the token: stop heartbeating once it has adopted
    released: bool = False
    depth: int = field(default=1)
    created_dir: bool = False  # the folder did not exist before the claim: removed again if left empty

    @property
    def path(self) -> Path:
        return self.run_dir / f".claim.{self.gen}.json"

    @property
    def token(self) -> str:
        return self.record["token"]

    def still_ours(self) -> bool:
        files = _files(self.run_dir)
        if any(gen > self.gen for gen in files):
            return False
        record = _load(self.path)
        return record is not None and record.get("token") == self.token

    def beat(self) -> None:
        """Refresh the heartbeat (or notice a lost claim / an adopting child)."""
        if self.released or self not in _HEARTBEAT.claims:
            return
        ours = self.still_ours()
        if self.handed_over:  # the child (or job) holds it once it has adopted it: never stop this process for it
            record = _load(self.path) or {}
            if not ours or record.get("job") or (record.get("pid"), record.get("host")) != (
                    os.getpid(), self.record["host"]):
                _HEARTBEAT.drop(self)
                return
        elif not ours:
            _HEARTBEAT.drop(self)
            (self.on_lost or _exit_lost)(self)
            return
        self.record["heartbeat"] = time.time()
        _rewrite(self.path, self.record)

    def hand_over(self, job: dict[str, Any] | None = None) -> dict[str, str]:
        """Environment for a child process that adopts this claim; ``job``: a scheduler job holds it until its
        task starts (written now, so a rerun skips the queued run)."""
        self.handed_over = True
        if job is not None:
            self.record = {**self.record, "job": job}
            _rewrite(self.path, self.record)
            _HEARTBEAT.drop(self)
        return {TOKEN_ENV: self.token}

    def release(self) -> None:
        """Give the run up (a no-op for a nested hold, and when someone else holds it by now)."""
        self.depth -= 1
        if self.depth > 0 or self.released:
            return
        self.released = True
        _HEARTBEAT.drop(self)
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self.run_dir.resolve(), None)
        record = _load(self.path)
        if record is not None and record.get("token") == self.token and (
                record.get("pid") == os.getpid() or not alive(record)):
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when empty: a refused or failed start leaves no trace


def _exit_lost(claim: Claim) -> None:
    holder = current(claim.run_dir)
    who = describe(holder[1]) if holder else "nobody"
    print(f"error: lost the claim on {claim.run_dir} (now held by {who}): this process was not heard from for "
          f"longer than its expiry; stopping so that one process trains the run", file=sys.stderr, flush=True)
    os._exit(LOST_EXIT_CODE)


class _ClaimHeartbeat:
    """One daemon thread per process refreshing every claim it holds."""

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, claim: Claim) -> None:
        with self.lock:
            self.claims.append(claim)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="workbench-claims", daemon=True)
                self.thread.start()
        self.wake.set()

    def drop(self, claim: Claim) -> None:
        with self.lock:
            if claim in self.claims:
                self.claims.remove(claim)

    def _loop(self) -> None:
        while True:
            with self.lock:
                claims = list(self.claims)
            interval = min((float(c.record["expiry_s"]) / 4 for c in claims), default=DEFAULT_EXPIRY_S / 4)
            self.wake.wait(max(0.05, interval))
            self.wake.clear()
            for claim in claims:
                try:
                    claim.beat()
                except OSError as err:  # a hiccup of the shared file system: try again next beat
                    print(f"warning: claim heartbeat for {claim.run_dir}: {err}", file=sys.stderr, flush=True)


_HEARTBEAT = _ClaimHeartbeat()
_REGISTRY: dict[Path, Claim] = {}
_REGISTRY_LOCK = threading.Lock()


def acquire(run_dir: str | Path, role: str = "train", adopt: str | None = None,
            on_lost: Callable[[Claim], None] | None = None) -> Claim:
    """Claim ``run_dir`` for this process or raise :class:`ClaimHeldError` naming the live holder. ``adopt``: a
    token handed over by the parent (or the submitter) that holds the claim for this process."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    with _REGISTRY_LOCK:
        held = _REGISTRY.get(key)
        if held is not None and not held.released and not held.handed_over and held.still_ours():
            held.depth += 1  # this process already holds it (the ablation runner training in-process)
            return held
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        now = time.time()
        found = current(run_dir)
        record = {**identity(), "role": role, "acquired": now, "heartbeat": now, "expiry_s": expiry_s(),
                  "token": uuid.uuid4().hex}
        if found is not None:
            gen, holder = found
            if adopt is not None and holder.get("token") == adopt:
                claim = Claim(run_dir, gen, {**record, "token": adopt, "acquired": holder.get("acquired", now)},
                              on_lost)
                _rewrite(claim.path, claim.record)
                return _register(claim, created)
            if alive(holder, now):
                raise ClaimHeldError(run_dir, holder)
            gen += 1
        else:
            gen = 0
        if _create(run_dir / f".claim.{gen}.json", record):
            for old, path in _files(run_dir).items():
                if old < gen:
                    path.unlink(missing_ok=True)  # superseded (dead holders or stragglers of a race)
            return _register(Claim(run_dir, gen, record, on_lost), created)
        time.sleep(0.01)  # lost a race for this generation: read the winner
    raise ClaimHeldError(run_dir, (current(run_dir) or (0, {"host": "unknown", "pid": -1}))[1])


def _register(claim: Claim, created: bool = False) -> Claim:
    claim.created_dir = created
    with _REGISTRY_LOCK:
        _REGISTRY[claim.run_dir.resolve()] = claim
    _HEARTBEAT.add(claim)
    return claim


@contextlib.contextmanager
def hold(run_dir: str | Path, role: str = "train") -> Iterator[Claim]:
    """Hold ``run_dir`` for the block (adopting a claim handed over through $WORKBENCH_CLAIM_TOKEN)."""
    token = os.environ.pop(TOKEN_ENV, None)
    claim = acquire(run_dir, role=role, adopt=token)
    try:
        yield claim
    finally:
        claim.release()


def distributed_rank() -> int:
    """Global rank under a launcher (Composer, torchrun, Slurm's srun); 0 alone."""
    value = os.environ.get("RANK", "")
    return int(value) if value.isdigit() else 0
