"""What a resumed run continues from, checked before any data is prepared: a readable checkpoint (falling back to
the previous kept one when the latest is truncated or its ``latest`` link dangles) and the metric rows up to it
(rebuilt from the checkpoint when ``metrics.parquet`` is unreadable or gone). Nothing is retrained or dropped
without a line saying so; what cannot be continued safely is refused with the file named."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.results import (
    CHECKPOINTS,
    LATEST_CHECKPOINT,
    METRICS_FILE,
    metrics_problem,
    read_metrics,
    rows_from_bytes,
)

ROWS_KEY = "rows"  # TidyMetricsLogger's state in a checkpoint: metrics.parquet's rows up to it, as parquet bytes


class CheckpointError(FileNotFoundError):
    """A checkpoint a command needs is missing or unreadable (a FileNotFoundError: the CLI prints it as one line)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The Composer checkpoint payload at ``path``. Tensors are memory-mapped, so checking a file reads little more
    than its pickled structure; a truncated file fails here (its zip directory is at the end)."""
    import torch

    shown = f"{path} -> {Path(path).resolve()}" if Path(path).is_symlink() else str(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        detail = " ".join(str(err).split())  # the CLI prints one line
        raise CheckpointError(f"{shown}: unreadable checkpoint, truncated or corrupted "
                              f"({type(err).__name__}: {detail})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise CheckpointError(f"{shown}: not a Composer checkpoint (no 'state' mapping)")
    return payload


def checkpoint_step(payload: dict[str, Any]) -> int:
    """Batches trained when the checkpoint was written."""
    timestamp = (payload["state"].get("timestamp") or {}).get("Timestamp", {})
    return int(timestamp.get("batch", 0))


def checkpoint_rows(payload: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The metric rows a checkpoint holds (None for checkpoints written before rows were stored in them)."""
    state = ((payload["state"].get("callbacks") or {}).get("TidyMetricsLogger") or {})
    data = state.get(ROWS_KEY)
    return rows_from_bytes(data) if data is not None else None


@dataclass
class ResumePoint:
    path: Path  # the checkpoint to load
    step: int
    rows: list[dict[str, Any]] | None  # metrics rows up to ``step``, if the checkpoint stores them


def _batch_of(path: Path) -> int:
    match = re.search(r"ba(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_resume_point(run_dir: Path, log: Callable[[str], None] = print) -> ResumePoint | None:
    """The checkpoint a resumed run loads: the ``latest`` link's target, else the newest readable earlier one (said
    in one line); None when the run saved no checkpoint (it trains from step 0, as it would have anyway).

    Raises :class:`CheckpointError` naming the file when the latest checkpoint is unusable and no earlier one is
    kept: retraining from step 0 would silently throw away the compute the user thinks is saved."""
    folder = run_dir / CHECKPOINTS
    link = folder / LATEST_CHECKPOINT
    problems: list[str] = []
    candidates: list[Path] = []
    if link.is_symlink() and not link.exists():
        problems.append(f"{link} points at {link.parent / link.readlink()}, which no longer exists")
    elif link.exists():
        candidates.append(link.resolve())
    kept = sorted((p for p in folder.glob("*-rank0.pt") if p.is_file() and not p.is_symlink()),
                  key=lambda p: (_batch_of(p), p.stat().st_mtime), reverse=True) if folder.is_dir() else []
    candidates += [p for p in kept if p not in candidates]
    for path in candidates:
        try:
            payload = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        point = ResumePoint(path, checkpoint_step(payload), checkpoint_rows(payload))
        if problems:
            log(f"[train] {problems[0]}; resuming from the previous kept checkpoint {path} (step {point.step})")
        elif not link.is_symlink():
            log(f"[train] {link} is missing; resuming from the newest checkpoint {path} (step {point.step})")
        return point
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}; no earlier checkpoint is kept in {folder} to fall back to: "
                              f"delete {run_dir} to train this run again from step 0")
    return None


def _stale(path: Path, point: ResumePoint) -> str | None:
    """What the file lacks of the checkpoint's rows (the run was killed after the checkpoint and before the tidy
    logger's next flush), None when it holds them all."""
    import polars as pl

    frame = read_metrics(path)
    assert frame is not None and point.rows is not None
    held = set(frame.select("step", "split", "metric").iter_rows())
    missing = [row for row in point.rows if (row["step"], row["split"], row["metric"]) not in held]
    if not missing:
        return None
    last = frame.select(pl.col("step").max()).item()
    return f"stale ({len(missing)} rows up to step {point.step} were not written yet; its last row is at step {last})"


def recover_metrics(run_dir: Path, point: ResumePoint | None,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]] | None:
    """Rows to resume with when ``metrics.parquet`` is unreadable, gone, or lacks rows the checkpoint holds (None:
    the file is fine, or there is nothing to lose). They are rebuilt from the checkpoint, which holds every row up
    to its step; the rows after it are recomputed by the resumed run, so nothing is lost. A checkpoint without rows
    is refused."""
    from workbench.train import RunExistsError

    path = run_dir / METRICS_FILE
    problem = metrics_problem(path) if path.exists() else ("missing" if point is not None else None)
    if problem is None and point is not None and point.rows is not None:
        problem = _stale(path, point)
    if problem is None:
        return None
    if point is None or point.rows is None:
        held = "no checkpoint to rebuild its rows from" if point is None else f"{point.path} does not hold its rows"
        raise RunExistsError(f"{path}: {problem}; resuming would lose every row written so far and {held}: restore "
                             f"the file, or delete {run_dir} to train this run again")
    log(f"[train] {path}: {problem}; rebuilt its {len(point.rows)} rows up to step {point.step} from {point.path} "
        "(later rows are recomputed by the resumed run)")
    return point.rows


def check_complete_run(run_dir: Path) -> None:
    """A complete run whose ``metrics.parquet`` is unreadable or gone is refused (non-zero exit): its curves are
    lost, and answering "complete" would let scripts and ablations go on as if its results were there."""
    from workbench.train import RunExistsError

    path = run_dir / METRICS_FILE
    problem = metrics_problem(path) if path.exists() else "missing"
    if problem is not None:
        raise RunExistsError(f"{path}: {problem}; the run is complete (summary.json keeps its final and best values) "
                             f"but its metric rows are lost: restore the file, or delete {run_dir} to train it again")
