"""The bootstrap's forked workers under slsd's signal handlers (the demo's hang at exit).

`Pool.terminate()` drains the task queue, so an idle worker can miss its stop sentinel and is then
stopped by SIGTERM. A worker forked under `interrupts.handling()` inherited slsd's handler, which
leaves a forked child to its parent, so it ignored that SIGTERM and the pool waited on it forever.
`bootstrap._worker_signals` (the pool's initializer) restores the default action."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from slsd_cli import interrupts
from slsd_cli.evaluation import bootstrap


def _wait_for_sigterm(initializer, ready) -> None:
    if initializer is not None:
        initializer()
    ready.set()
    time.sleep(30)


def _exit_code_after_sigterm(initializer) -> int | None:
    """Fork a child as the pool does (under slsd's handlers), SIGTERM it, and return its exit code
    (None: still running a second later)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with interrupts.handling():
        child = ctx.Process(target=_wait_for_sigterm, args=(initializer, ready))
        child.start()
        try:
            assert ready.wait(10)
            os.kill(child.pid, signal.SIGTERM)
            child.join(1.0)
            return child.exitcode
        finally:
            if child.is_alive():
                child.kill()
                child.join()


def test_bootstrap_workers_die_on_sigterm_under_slsd_handlers():
    assert _exit_code_after_sigterm(bootstrap._worker_signals) == -signal.SIGTERM
    assert _exit_code_after_sigterm(None) is None  # the inherited handler: SIGTERM ignored
