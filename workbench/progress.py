"""Progress of long host-side loops (evaluation items, generated samples, study trials).

On a terminal it is a tqdm bar (rate and ETA, redrawn in place). When the stream is not a terminal (a log file,
CI, a pipe) redrawing would fill the log with carriage returns, so it prints plain lines instead: one per update
when ``every`` is 0 (each update is a meaningful step, e.g. a finished trial), else at most one per ``every``
seconds plus the final one. Updates are host-side counters only: nothing here reads a device tensor.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    whole = max(round(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """``with Progress(total, "piqa", "items") as bar: bar.update(n, best="0.61")``.

    ``total`` may be None (unknown); ``done`` starts a resumed count (e.g. trials finished before this process)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, every: float = 30.0, done: int = 0,
                 stream: IO[str] | None = None, tty: bool | None = None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.start_done = done, done
        self.start = self.last_line = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=done, file=self.stream, dynamic_ncols=True,
                            leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.every == 0 or now - self.last_line >= self.every or (self.total is not None
                                                                     and self.done >= self.total):
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def eta(self) -> float | None:
        """Seconds left at the rate of this process so far (None before the first update or without a total)."""
        counted = self.done - self.start_done
        if self.total is None or counted <= 0:
            return None
        return (time.monotonic() - self.start) / counted * max(self.total - self.done, 0)

    def line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.desc}: {self.done}{total} {self.unit}", f"{format_seconds(time.monotonic() - self.start)}"]
        eta = self.eta()
        if eta is not None and self.total is not None and self.done < self.total:
            parts[-1] += f", ETA {format_seconds(eta)}"
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
