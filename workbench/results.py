"""The one results writer and reader: a run folder holds ``config.yaml``, ``metrics.parquet`` (tidy rows),
``summary.json`` and a git-ignored ``checkpoints/`` folder.

metrics.parquet schema, one row per (step, split, metric):
    run str | step int64 | epoch float64 (tokens_seen / unique_tokens) | tokens_seen int64 | unique_tokens int64
    | split str (train, val, or a task name) | metric str | value float64 | wall_time float64 (s, across resumes)
The file's key-value metadata holds the resolved config (``workbench.config``) and the active algorithms
(``workbench.algorithms``) as JSON. Every write replaces the file atomically (temp file + rename) with all
rows so far, so a kill never loses rows already written nor leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.run_files import (  # noqa: F401 (the run-folder names, re-exported beside their readers)
    CHECKPOINTS,
    CONFIG_FILE,
    DOWNSTREAM_FILE,
    LATEST_CHECKPOINT,
    METRICS_FILE,
    SUMMARY_FILE,
    TRAIN_LOG,
    VARIANT_FILE,
)

SCHEMA = {
    "run": pl.String, "step": pl.Int64, "epoch": pl.Float64, "tokens_seen": pl.Int64, "unique_tokens": pl.Int64,
    "split": pl.String, "metric": pl.String, "value": pl.Float64, "wall_time": pl.Float64,
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


class MetricsWriter:
    """Collects tidy metric rows for one run and rewrites ``metrics.parquet`` atomically on every flush."""

    def __init__(self, run_dir: str | Path, metadata: dict[str, Any], filename: str = METRICS_FILE,
                 rows: list[dict[str, Any]] | None = None):
        """``rows``: start from these instead of the file's (a resumed run rebuilding an unreadable file)."""
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.metadata = {key: json.dumps(value, default=str) for key, value in metadata.items()}
        self.rows: list[dict[str, Any]] = list(rows) if rows is not None else []
        if rows is None and self.path.exists():
            existing = read_metrics(self.path)
            self.rows = existing.to_dicts() if existing is not None else []
        self._dirty = False

    def truncate_after(self, step: int) -> None:
        """Drop rows after ``step`` (a resumed run recomputes them from its checkpoint)."""
        self.rows = [row for row in self.rows if row["step"] <= step]
        self._dirty = True

    def has(self, split: str, metric: str) -> bool:
        return any(row["split"] == split and row["metric"] == metric for row in self.rows)

    @property
    def last_wall_time(self) -> float:
        return max((row["wall_time"] for row in self.rows), default=0.0)

    def add(self, **row: Any) -> None:
        self.rows.append({key: row[key] for key in SCHEMA})
        self._dirty = True

    def replace(self, rows: list[dict[str, Any]]) -> None:
        """Add ``rows``, dropping existing rows of the same (step, split, metric) (a re-run evaluation)."""
        keys = {(row["step"], row["split"], row["metric"]) for row in rows}
        self.rows = [row for row in self.rows if (row["step"], row["split"], row["metric"]) not in keys]
        for row in rows:
            self.add(**row)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=SCHEMA, orient="row")

    def flush(self) -> None:
        if not self._dirty:
            return
        table = self.frame().to_arrow()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())
        self._dirty = False


def _read_checked(path: Path) -> tuple[pl.DataFrame | None, str | None]:
    """(frame, None) for a readable metrics file, (None, what is wrong with it) otherwise."""
    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # half-written or corrupted file from a killed process
        return None, f"unreadable metrics file ({type(err).__name__}: {err})"
    missing = [column for column in SCHEMA if column not in frame.columns]
    if missing:
        return None, f"metrics file lacks columns {missing}"
    return frame.select([pl.col(name).cast(dtype) for name, dtype in SCHEMA.items()]), None


def read_metrics(path: str | Path) -> pl.DataFrame | None:
    """Read a metrics file; a missing, truncated or corrupted file gives a warning naming it and None."""
    path = Path(path)
    frame, problem = _read_checked(path)
    if problem is not None:
        warnings.warn(f"{path}: {problem}; skipped", stacklevel=2)
    return frame


def metrics_problem(path: str | Path) -> str | None:
    """What makes an existing metrics file unusable (None when it reads with every column)."""
    return _read_checked(Path(path))[1]


def rows_to_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Tidy rows as parquet bytes (how a checkpoint carries them, see workbench.resume)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pl.DataFrame(rows, schema=SCHEMA, orient="row").to_arrow(), sink)
    return sink.getvalue().to_pybytes()


def rows_from_bytes(data: bytes) -> list[dict[str, Any]]:
    return pl.read_parquet(pa.BufferReader(data)).to_dicts()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored in a metrics file (config, algorithms)."""
    raw = pq.read_schema(path).metadata or {}
    out = {}
    for key, value in raw.items():
        name = key.decode()
        if name.startswith("workbench."):
            out[name.removeprefix("workbench.")] = json.loads(value)
    return out


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """A run folder's JSON record (summary.json, variant.json): its object, or None when the file is missing,
    unreadable, not JSON or not an object (a run killed while writing, a folder copied by hand)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return value if isinstance(value, dict) else None


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    return read_json_object(Path(run_dir) / SUMMARY_FILE)


def write_summary(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's summary.json (status, tokens, best metrics, timings...)."""
    path = Path(run_dir) / SUMMARY_FILE
    summary = read_summary(run_dir) or {}
    summary.update(fields)
    write_json(path, summary)
    return summary
