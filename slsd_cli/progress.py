"""Rich progress bars and console output, shown on rank 0 only.

Where output goes (the same for every command): a command's result - its summary table or the
values a user may pipe or save - goes to stdout (`show`); progress bars, status lines ("wrote ...",
timings) and warnings go to stderr (`progress`, `info`, `warn`), so `slsd eval ... > table.txt`
keeps only the table.

Progress in batch jobs: when stderr is not a terminal (SLURM, nohup, a pipe) `progress()` draws no
bar but prints one plain line per task at most every `LINE_EVERY_S` seconds and when the task
completes (or the work ends), e.g.

    2026-01-02 03:04:05 inference 1,200/5,000 (24%)  40.1/s  elapsed 0:00:30  eta 0:01:35

so every long command (eval, calibrate, predict, prototypes, retrieve) reports in a log file
without changes of its own. Training prints its own richer lines (`engine.logbook`).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


console = Console(stderr=True)       # progress, status lines, warnings
result_console = Console()           # summary tables: stdout


def _is_main() -> bool:
    """Rank 0, or a single process. Read from the environment torchrun sets, so that printing does
    not import torch (the CLI's --help stays fast)."""
    import os

    return os.environ.get("RANK", "0") == "0"


LINE_EVERY_S = 30.0  # batch jobs: seconds between two progress lines of a task


def progress(transient: bool = False, *, lines: bool = True, every: float = LINE_EVERY_S,
             clock: Callable[[], float] | None = None) -> Progress:
    """Rank 0: a rich progress bar on a terminal; when stderr is not one, plain lines (`LineProgress`,
    see the module docstring) unless `lines=False` (a caller that prints its own, as training does).
    Other ranks: silent. `clock` (seconds, monotonic) is for tests."""
    if _is_main() and sys.stderr.isatty():
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=transient,
            get_time=clock,
        )
    if _is_main() and lines:
        return LineProgress(every, clock)
    return Progress(disable=True, get_time=clock)


class LineProgress(Progress):
    """rich's task bookkeeping (add_task / advance / update, as callers use a bar) without its live
    display: each task prints a plain line on stderr at most every `every` seconds, once when it
    completes, and at the end (`stop`, leaving the `with` block without an error) if it moved since
    its last line."""

    def __init__(self, every: float = LINE_EVERY_S, clock: Callable[[], float] | None = None):
        super().__init__(disable=True, get_time=clock or time.monotonic)
        self.every = every
        self._printed: dict[TaskID, tuple[float, float]] = {}  # task -> (time, completed) of its last line
        self._first: dict[TaskID, float] = {}                  # task -> completed when added (rate)
        self._finished: set[TaskID] = set()

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._printed[task_id] = (self.get_time(), completed)
        self._first[task_id] = completed
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:  # the work failed: its error line, not a progress line, ends the output
            self._finished.update(self.task_ids)
        super().__exit__(exc_type, exc, tb)

    def stop(self) -> None:
        for task_id in self.task_ids:
            if task_id not in self._finished and self._tasks[task_id].completed != self._printed[task_id][1]:
                self._print(task_id)
        super().stop()

    def _report(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task_id in self._finished:
            return
        if task.finished:
            self._finished.add(task_id)
            self._print(task_id)
        elif self.get_time() - self._printed[task_id][0] >= self.every:
            self._print(task_id)

    def _print(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        now = self.get_time()
        self._printed[task_id] = (now, task.completed)
        print(self.line(task_id), file=sys.stderr, flush=True)

    def line(self, task_id: TaskID) -> str:
        """'2026-01-02 03:04:05 inference 1,200/5,000 (24%)  40.1/s  elapsed 0:00:30  eta 0:01:35'"""
        task = self._tasks[task_id]
        elapsed = task.elapsed or 0.0
        done = task.completed
        rate = (done - self._first[task_id]) / elapsed if elapsed > 0 else None
        parts = [time.strftime("%Y-%m-%d %H:%M:%S"), Text.from_markup(task.description).plain]
        if task.total is not None:
            percent = f" ({100 * done / task.total:.0f}%)" if task.total > 0 else ""
            parts[-1] += f" {done:,.0f}/{task.total:,.0f}{percent}"
        else:
            parts[-1] += f" {done:,.0f}"
        status = str(task.fields.get("status") or "")
        if status:
            parts.append(Text.from_markup(status).plain)
        if rate is not None:
            parts.append(f"{rate:.2f}/s" if rate < 100 else f"{rate:,.0f}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if task.finished:
            parts.append("done")
        elif task.total is not None and rate:
            parts.append(f"eta {duration((task.total - done) / rate)}")
        else:
            parts.append("eta n/a")
        return "  ".join(parts)


def duration(seconds: float) -> str:
    """h:mm:ss"""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def info(message: str) -> None:
    if _is_main():
        console.print(message)


def warn(message: str) -> None:
    if _is_main():
        console.print(f"[yellow]warning:[/yellow] {message}")


def show(renderable: object) -> None:
    """A command's summary (a rich Table or text) on stdout, rank 0 only."""
    if _is_main():
        result_console.print(renderable)
