"""Rich progress bars and console output, shown on rank 0 only."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


console = Console(stderr=True)


def _is_main() -> bool:
    """Rank 0, or a single process. Read from the environment torchrun sets, so that printing does
    not import torch (the CLI's --help stays fast)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def progress(transient: bool = False) -> Progress:
    """A progress bar that is silent on ranks other than 0 and when stderr is not a terminal
    (so CI logs and pipes stay clean)."""
    enabled = _is_main() and sys.stderr.isatty()
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
    if _is_main():
        console.print(message)


def warn(message: str) -> None:
    if _is_main():
        console.print(f"[yellow]warning:[/yellow] {message}")
