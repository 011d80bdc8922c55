"""Runs the demo's `slsd` commands: one after the other in this process, or `jobs` at a time in
child processes.

Every step is an ordinary `slsd` command with a *done marker* (the file it writes last). A step whose
marker exists is skipped, so a rerun picks up where the last one stopped. With `jobs > 1` the demo
may `submit` steps it will need later (the cells of a grid stage, the next seeds' teachers); they
queue and run in child processes, `jobs` at a time, each with cores // jobs threads, while the demo
goes on; `wait` blocks until a submitted step's marker exists, moving that step to the front of the
queue; `run` runs a short step in this process at once (or waits for it, if it was submitted).
Dependencies are the caller's: a step is submitted only once what it reads is done. With jobs = 1
`submit` is `run`: every step runs in this process, in the order it is asked for.

Signals: the demo stops its children with it. A SIGINT / SIGTERM to the demo ends it at once
(`interrupts.Interrupted`) and `close` sends each running child SIGTERM, which makes a training step
save its checkpoint and exit (the rerun resumes it), then waits for them; a child also gets SIGTERM
when the demo dies without a chance to clean up (SIGKILL: `interrupts.stop_with_parent`). A child
stopped by a signal stops the demo with the same exit code. The demo's folder is locked while it
runs (`io.locks`), so a second demo into it fails at once.

Why child processes: two small CPU trainings side by side with one thread each get 1.35x the
throughput of one training with two threads on 2 cores (measured: 5.6-6.0 img/s each vs 8.6 img/s
for the synthetic_tiny teacher). A child's results
are bit-identical for the same thread count; `jobs` changes the thread count, so float rounding
(not the method) can differ between `--jobs 1` and `--jobs 2`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slsd_cli import interrupts
from slsd_cli.demo.report import Step
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_json, locks, make_dirs, read_json
from slsd_cli.progress import info

POLL_SECONDS = 0.5


@dataclass
class _Job:
    step: Step
    marker: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    log: Path | None = None


@dataclass
class Runner:
    """The demo's steps, their wall times (kept in OUT_DIR/step_seconds.json, so a resumed demo still
    reports what every step cost when it ran) and, with `jobs > 1`, the queue of child processes."""

    out_dir: Path
    # runs one step in this process: `slsd_cli.cli.main`, handed over by the command (the library
    # never imports the CLI), or any callable argv -> exit code
    run_command: Callable[[list[str]], int]
    jobs: int = 1
    steps: list[Step] = field(default_factory=list)
    _queue: list[_Job] = field(default_factory=list, init=False, repr=False)
    _running: list[_Job] = field(default_factory=list, init=False, repr=False)
    # argv -> its job while queued or running, None once done or skipped
    _known: dict[tuple[str, ...], _Job | None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        locks.acquire(self.out_dir)  # one demo at a time in a folder (for the command that runs it)

    @property
    def _timings_path(self) -> Path:
        return self.out_dir / "step_seconds.json"

    @property
    def threads(self) -> int:
        """Threads of each child process: the cores shared between the jobs."""
        return max(1, (os.cpu_count() or 1) // self.jobs)

    # ------------------------------------------------------------ the caller's side
    def run(self, name: str, argv: list[str], done_marker: Path) -> None:
        """Run a step in this process now, unless its marker exists; a step submitted before is
        waited for instead. (Steps the caller waits on are short or on the critical path: they
        start at once, beside the children.)"""
        if self._known.get(tuple(argv)) is not None:
            self.wait(done_marker)
            return
        job = self._add(name, argv, done_marker)
        if job is not None:
            self._run_here(job)

    def submit(self, name: str, argv: list[str], done_marker: Path) -> None:
        """Queue a step to run in a child process while the caller goes on (with jobs = 1: run it
        now, in this process, so steps run in the order they are submitted)."""
        if self.jobs == 1:
            self.run(name, argv, done_marker)
            return
        if tuple(argv) in self._known:
            return
        job = self._add(name, argv, done_marker)
        if job is not None:
            self._queue.append(job)
            self._pump()

    def wait(self, done_marker: Path) -> None:
        """Block until the submitted step writing `done_marker` is done (at once if none is queued
        or running)."""
        job = next((j for j in self._queue + self._running if j.marker == done_marker), None)
        if job is None:
            return
        if job in self._queue:  # the caller needs it now: first in line
            self._queue.remove(job)
            self._queue.insert(0, job)
        while job in self._queue or job in self._running:
            self._pump()
            if job in self._queue or job in self._running:
                time.sleep(POLL_SECONDS)

    def close(self) -> None:
        """Stop children still running (on an error or an interrupt): SIGTERM, so that a training step
        saves its checkpoint (a rerun resumes it); SIGKILL for one still running after 60 s."""
        with interrupts.deferred():  # a second signal must not leave children behind
            for job in self._running:
                if job.process is not None and job.process.poll() is None:
                    job.process.terminate()
            for job in self._running:
                if job.process is not None:
                    try:
                        job.process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        job.process.kill()
                        job.process.wait()
            self._running.clear()
            self._queue.clear()

    # ------------------------------------------------------------ bookkeeping
    def _add(self, name: str, argv: list[str], marker: Path) -> _Job | None:
        """The job of a step (None when it is done or skipped); lists the step once per invocation."""
        key = tuple(argv)
        if key in self._known:
            return self._known[key]
        command = " ".join(argv)
        timings = read_json(self._timings_path) if self._timings_path.exists() else {}
        step = Step(name, argv, seconds=float(timings.get(command, float("nan"))))
        self.steps.append(step)
        if marker.exists():
            step.skipped = True
            info(f"[dim]demo: {name}: done before, skipped[/dim]")
            self._known[key] = None
            return None
        job = _Job(step, marker)
        self._known[key] = job
        return job

    def _finished(self, job: _Job, seconds: float, code: int) -> None:
        command = " ".join(job.step.argv)
        self._known[tuple(job.step.argv)] = None
        signum = _stopped_by(code)
        if signum is not None:  # a child stopped by SIGINT / SIGTERM (its own one line is in its log)
            raise interrupts.Interrupted(signum, f"step '{job.step.name}' was stopped by a signal; rerun the demo to "
                                                 "continue (finished steps are skipped, trainings resume)")
        if code == 0 and not job.marker.exists():
            code = -1  # exited 0 without its output: treated as a failure
        if code != 0:
            where = f"; its output: {job.log}" if job.log is not None else ""
            raise InputError(f"step '{job.step.name}' failed with exit code {code} (command: slsd {command}){where}",
                             path=self.out_dir)
        job.step.seconds = seconds
        timings = read_json(self._timings_path) if self._timings_path.exists() else {}
        atomic_write_json(self._timings_path, {**timings, command: round(seconds, 2)}, indent=1)

    # ------------------------------------------------------------ execution
    def _run_here(self, job: _Job) -> None:
        info(f"[bold cyan]demo:[/bold cyan] {job.step.name}: slsd {' '.join(job.step.argv)}")
        start = time.perf_counter()
        try:
            code = self.run_command(job.step.argv)
        except interrupts.Interrupted as exc:
            raise interrupts.Interrupted(exc.signum, f"step '{job.step.name}': {exc.message or 'stopped'}; rerun the "
                                         "demo to continue (finished steps are skipped, trainings resume)") from None
        self._finished(job, time.perf_counter() - start, code)

    def _pump(self) -> None:
        """Collect finished children and start queued steps while fewer than `jobs` run."""
        for job in list(self._running):
            code = job.process.poll()
            if code is None:
                continue
            self._running.remove(job)
            seconds = time.perf_counter() - job.started
            if code == 0:
                info(f"[bold cyan]demo:[/bold cyan] {job.step.name}: done in {seconds:.0f} s")
            self._finished(job, seconds, code)
        while self._queue and len(self._running) < self.jobs:
            self._start(self._queue.pop(0))

    def _start(self, job: _Job) -> None:
        logs = self.out_dir / "logs"
        make_dirs(logs)
        job.log = logs / (re.sub(r"[^A-Za-z0-9._-]+", "_", job.step.name)[:150] + ".log")
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               interrupts.PARENT_ENV: str(os.getpid())}  # the child stops when this process dies
        info(f"[bold cyan]demo:[/bold cyan] {job.step.name}: started ({threads} thread(s); output {job.log}): "
             f"slsd {' '.join(job.step.argv)}")
        with open(job.log, "wb") as log:
            job.process = subprocess.Popen([sys.executable, "-m", "slsd_cli", *job.step.argv], stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
        job.started = time.perf_counter()
        self._running.append(job)


def _stopped_by(code: int) -> int | None:
    """The signal that stopped a child: its exit code 128 + n (slsd's handler), or -n (killed)."""
    for signum in interrupts.SIGNALS:
        if code in (128 + signum, -signum):
            return int(signum)
    return None
