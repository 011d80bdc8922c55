"""slsd_cli.progress in batch jobs: when stderr is not a terminal (pytest's capture, SLURM, nohup),
`progress()` prints a plain line per task at most every `every` seconds, when the task completes
and at the end; on ranks other than 0, and for callers that print their own lines, nothing."""

from __future__ import annotations

import re

import pytest

from slsd_cli.progress import LineProgress, duration, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_lines_every_interval_and_at_completion(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    clock = Clock()
    with progress(every=30, clock=clock) as bar:
        assert isinstance(bar, LineProgress)  # stderr is captured: not a terminal
        task = bar.add_task("[bold]inference", total=100, status="")
        for _ in range(100):
            clock.now += 1.0  # 1 item per second
            bar.advance(task)
        bar.update(task, advance=0, status="ignored after completion")
    lines = _lines(capsys.readouterr().err)
    # at 30, 60 and 90 s, then once when complete (and not again at the end of the block)
    assert len(lines) == 4, lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(stamp + r"  inference 30/100 \(30%\)  1\.00/s  elapsed 0:00:30  eta 0:01:10", lines[0])
    assert "inference 60/100 (60%)" in lines[1] and "eta 0:00:40" in lines[1]
    assert re.fullmatch(stamp + r"  inference 100/100 \(100%\)  1\.00/s  elapsed 0:01:40  done", lines[3])


def test_final_line_for_unfinished_task_and_status(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    clock = Clock()
    with progress(every=30, clock=clock) as bar:
        task = bar.add_task("embed labeled", total=None, status="")
        clock.now += 10
        bar.update(task, advance=40, status="[dim]2 chunks cached[/dim]")
        bar.add_task("idle", total=5, status="")  # never advanced: no line
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1, lines  # nothing within 30 s, one line when the work ends
    assert "embed labeled 40  2 chunks cached  4.00/s  elapsed 0:00:10  eta n/a" in lines[0]


def test_no_final_line_when_the_work_fails(capsys, monkeypatch):
    """A failing command ends with its one error line, not a progress line."""
    monkeypatch.delenv("RANK", raising=False)
    clock = Clock()
    with pytest.raises(ValueError):
        with progress(every=30, clock=clock) as bar:
            task = bar.add_task("inference", total=10, status="")
            clock.now += 5
            bar.advance(task, 3)
            raise ValueError("bad image")
    assert capsys.readouterr().err == ""


def test_rate_counts_only_this_runs_work(capsys, monkeypatch):
    """A task added with `completed` (resumed work) reports the rate of what this run did."""
    monkeypatch.delenv("RANK", raising=False)
    clock = Clock()
    with progress(every=30, clock=clock) as bar:
        task = bar.add_task("hash", total=1000, completed=500, status="")
        clock.now += 50
        bar.advance(task, 100)
    (line,) = _lines(capsys.readouterr().err)
    assert "hash 600/1,000 (60%)  2.00/s  elapsed 0:00:50  eta 0:03:20" in line


@pytest.mark.parametrize("case", ["other rank", "own lines"])
def test_silent_on_other_ranks_and_for_callers_with_their_own_lines(capsys, monkeypatch, case):
    if case == "other rank":
        monkeypatch.setenv("RANK", "1")
        bar = progress(every=0, clock=Clock())
    else:
        monkeypatch.delenv("RANK", raising=False)
        bar = progress(every=0, lines=False, clock=Clock())
    assert not isinstance(bar, LineProgress)
    with bar:
        task = bar.add_task("inference", total=3, status="")
        for _ in range(3):
            bar.advance(task)
    assert capsys.readouterr().err == ""


def test_duration():
    assert duration(0) == "0:00:00"
    assert duration(3725.4) == "1:02:05"
    assert duration(100 * 3600) == "100:00:00"
