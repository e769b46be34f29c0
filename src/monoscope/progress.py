"""Progress display for long work: a rich bar on a terminal, a line every few seconds otherwise.

Off a terminal (a log file, a pipe, CI) each line carries the rate and an ETA and is never wrapped, so
`grep`/`tail` see one line per update:

    capture: 1,536/4,096 tok (1,204 tok/s, ETA 2s) loss=0.12 dead=3
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="cyan")


class Bar:
    """What a stage updates: advance by a count, with optional metrics shown beside the bar."""

    def __init__(self, label: str, total: float | None, unit: str, progress: Progress | None,
                 log_every: float = 10.0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self._p = progress
        self._task = progress.add_task(label, total=total, status="") if progress is not None else None
        self._done = 0.0
        self._t0 = self._last = time.monotonic()
        self._log_every = log_every
        self._fields: dict[str, Any] = {}

    def update(self, n: float = 1, **fields: Any) -> None:
        self._done += n
        self._fields.update(fields)
        status = " ".join(f"{k}={v}" for k, v in self._fields.items())
        if self._p is not None:
            self._p.update(self._task, advance=n, status=status)  # type: ignore[arg-type]
            return
        now = time.monotonic()
        if self._log_every > 0 and now - self._last >= self._log_every:
            self._last = now
            print(self.line(now), file=console.file, flush=True)  # plain print: never wrapped, no markup

    def line(self, now: float | None = None) -> str:
        """The log line off a terminal: count, rate, ETA (when the total is known) and the metrics."""
        now = time.monotonic() if now is None else now
        rate = self._done / max(now - self._t0, 1e-9)
        of = f"/{self.total:,.0f}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {format_seconds(max(self.total - self._done, 0) / rate)}"
        status = " ".join(f"{k}={v}" for k, v in self._fields.items())
        return f"{self.label}: {self._done:,.0f}{of} {self.unit} ({rate:,.0f} {self.unit}/s{eta})" + (
            f" {status}" if status else "")


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a log line."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@contextlib.contextmanager
def progress_bar(label: str, *, total: float | None, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A live bar with rate and ETA on a terminal; periodic log lines when stderr is a file or pipe."""
    if not enabled:
        yield Bar(label, total, unit, None, log_every=0)
        return
    if not console.is_terminal:
        yield Bar(label, total, unit, None)
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TaskProgressColumn(), _Rate(unit),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console) as p:
        yield Bar(label, total, unit, p)


