"""Running `slsd` in-process the way the command-line tests read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slsd_cli.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit code, stripped stderr) of `slsd <args>`."""
    code = main(args)
    return code, capsys.readouterr().err.strip()


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
