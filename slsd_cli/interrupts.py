"""One rule for SIGINT (Ctrl-C) and SIGTERM (`kill`, SLURM preemption, torchrun's agent) in every command.

`with handling():` (entered by `slsd_cli.cli.main` around every command) installs handlers for both
signals. Outside the sections below, a signal raises `Interrupted` where the program is, like
KeyboardInterrupt does: the `with` blocks and `finally` clauses on the way out roll back what the
command had started (temporaries, `io.FileSet` staging folders, locks), and the CLI prints one line
and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

- `polled()`: a loop that stops at its own safe point (the training loop: after the iteration, with
  a checkpoint) reads `pending()` instead of being interrupted. A second Ctrl-C while one is pending
  still stops at once (the user insists); a SIGTERM on top of a pending signal changes nothing.
- `deferred()`: a short section that must not be cut (renaming a set of outputs into place); a
  signal raised in it is raised when it ends.
- DataLoader workers and other forked children ignore the handlers they inherit: their parent
  decides when they stop. `worker_init` (a DataLoader `worker_init_fn`) also makes a worker ignore
  a SIGINT / SIGTERM that does not come from its parent (a terminal's Ctrl-C reaches the whole
  process group, SLURM signals every process of a job step), so it keeps feeding the batches the
  parent needs to reach its safe point, and is stopped by the parent as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# set by a parent slsd process (the demo's runner) in a child's environment: the parent's pid
PARENT_ENV = "SLSD_STOP_WITH_PARENT"


class Interrupted(BaseException):
    """A command stopped by a signal. A BaseException, like KeyboardInterrupt: `except Exception`
    clauses do not swallow it. `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        self.message = message
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def line(self) -> str:
        """The one line the CLI prints: 'interrupted by SIGTERM: <what happened to the work>'."""
        return f"interrupted by {self.name}: {self.message or 'stopped; nothing half-written was kept'}"


class _State:
    def __init__(self) -> None:
        self.owner: int | None = None      # the process that installed the handlers
        self.depth = 0                     # nested `handling()` (the demo runs commands in-process)
        self.previous: dict[int, object] = {}
        self.quiet = 0                     # nested polled() / deferred() sections
        self.pending: int | None = None    # a signal received in a quiet section


_state = _State()


def _handler(signum: int, frame: object) -> None:
    if os.getpid() != _state.owner:  # a forked child (DataLoader worker) inherited this: its parent decides
        return
    if _state.quiet > 0:
        if _state.pending == signal.SIGINT and signum == signal.SIGINT:
            _state.pending = None
            raise Interrupted(signum, "stopped at once (second Ctrl-C); the last checkpoint or output is kept")
        if _state.pending is None:
            _state.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the SIGINT / SIGTERM handlers for the body (main thread only; re-entrant)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state.depth == 0:
        stop_with_parent()
        _state.owner, _state.pending, _state.quiet = os.getpid(), None, 0
        _state.previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, _handler)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for s, previous in _state.previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            _state.owner, _state.pending, _state.quiet = None, None, 0


def active() -> bool:
    return _state.depth > 0 and _state.owner == os.getpid()


def nested() -> bool:
    """Whether a command runs inside another one (the demo's in-process steps)."""
    return _state.depth > 1


def pending() -> int | None:
    """The signal received in a quiet section and not acted on yet (None: none)."""
    return _state.pending


def take() -> int | None:
    """`pending()`, and forget it (the caller acts on it now)."""
    signum, _state.pending = _state.pending, None
    return signum


@contextlib.contextmanager
def polled() -> Iterator[None]:
    """A loop that checks `pending()` at its safe points instead of being interrupted."""
    _state.quiet += 1
    try:
        yield
    finally:
        _state.quiet -= 1


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section no signal cuts: one that arrives in it is raised when it ends (unless an outer
    quiet section takes it)."""
    _state.quiet += 1
    try:
        yield
    finally:
        _state.quiet -= 1
    if _state.quiet == 0 and _state.pending is not None and active():
        raise Interrupted(take())


def stop_with_parent() -> None:
    """In a child started by another slsd process (`PARENT_ENV` holds its pid): get SIGTERM when that
    process dies, even by SIGKILL (Linux `prctl(PR_SET_PDEATHSIG)`), so no child trains on alone."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore SIGINT, and SIGTERM unless the parent sends it (the
    DataLoader's own shutdown of a stuck worker; see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; torch's SIGTERM handling stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="slsd-sigterm", daemon=True).start()


__all__ = ["Interrupted", "PARENT_ENV", "SIGNALS", "active", "deferred", "handling", "nested", "pending", "polled",
           "stop_with_parent", "take", "worker_init"]
