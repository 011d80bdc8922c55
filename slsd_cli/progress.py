"""Rich progress bars and console output, shown on rank 0 only."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from slsd_cli import distributed

console = Console(stderr=True)


def progress(transient: bool = False) -> Progress:
    """A progress bar that is silent on ranks other than 0 and when stderr is not a terminal
    (so CI logs and pipes stay clean)."""
    enabled = distributed.is_main() and sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=transient,
    )


def info(message: str) -> None:
    if distributed.is_main():
        console.print(message)


def warn(message: str) -> None:
    if distributed.is_main():
        console.print(f"[yellow]warning:[/yellow] {message}")
