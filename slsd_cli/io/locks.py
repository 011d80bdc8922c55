"""Exclusive outputs: one slsd run at a time writes an output (a file, a `FileSet` target, a run
directory).

`acquire(output)` takes an advisory `flock` on `.NAME.lock` beside the output and holds it until the
enclosing `scope()` ends (the CLI opens one around every command; `engine.launch` one around a
training run). A second launch that wants the same output fails at once with one line naming the
holder's pid and host. The kernel drops a flock when its process dies, however it dies, so a lock
file left by a killed run is simply taken over (its stale content rewritten). Releasing removes the
lock file (a run leaves nothing behind); a process that opened the old file in that instant sees it
is no longer the file at that path and takes the lock again on the new one.

Under torchrun only rank 0 locks (the other ranks write what rank 0 decided). Outside any scope
(library calls) nothing is locked: the caller's process owns the outputs (a stale lock file a killed
run left is still removed, as `check_output` removes its temporaries).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from slsd_cli.errors import InputError


def lock_path(output: str | Path) -> Path:
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.lock"


@dataclass
class _Held:
    fd: int
    path: Path
    count: int = 1


@dataclass
class _Scope:
    keys: list[str] = field(default_factory=list)


_held: dict[str, _Held] = {}
_scopes: list[_Scope] = []
_unsupported_warned = [False]


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Hold every lock acquired in the body until it ends (nested scopes release their own)."""
    mine = _Scope()
    _scopes.append(mine)
    try:
        yield
    finally:
        _scopes.remove(mine)
        for key in reversed(mine.keys):
            _release(key)


def held(output: str | Path) -> bool:
    return str(lock_path(output)) in _held


def acquire(output: str | Path) -> None:
    """Lock `output` for the current scope (see the module docstring); re-entrant in one process.
    Outside a scope nothing is locked, but a lock file a dead process left is removed."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = lock_path(output)
    if not _scopes:
        remove_stale(path)
        return
    key = str(path)
    if key in _held:
        _held[key].count += 1
        _scopes[-1].keys.append(key)
        return
    fd = _lock(path, Path(output))
    if fd is None:
        return
    _held[key] = _Held(fd, path)
    _scopes[-1].keys.append(key)


def _lock(path: Path, output: Path) -> int | None:
    """An fd holding the flock of `path` (None where the file system has no locks)."""
    from slsd_cli.io.files import make_dirs, output_errors

    make_dirs(path.parent)
    while True:
        with output_errors(output, path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise InputError(f"in use by another slsd run ({holder}); wait for it to finish or stop it "
                             "(a lock left by a dead process is taken over automatically)", path=output) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                _warn_unsupported(path)
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            raise
        # a holder that released in between removed the file we opened: lock the new one instead
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _describe_me(fd)
    return fd


def remove_stale(path: Path) -> None:
    """Remove the lock file at `path` if no process holds it (a run killed while holding it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
            os.unlink(path)
    except OSError:
        pass  # held by a live run, or gone already
    finally:
        os.close(fd)


def _describe_me(fd: int) -> None:
    """Write who holds the lock (read by a second launch for its message)."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 1),
              "command": " ".join(["slsd", *sys.argv[1:]])[:500]}
    data = json.dumps(record).encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _describe(fd: int) -> str:
    """'pid 123 on host node7, since 12:03:04' from a held lock file (what is known of it)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        pid, host = int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "its pid is not recorded yet"
    since = record.get("since")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" \
        if isinstance(since, (int, float)) else ""
    return f"pid {pid} on host {host}{when}"


def _warn_unsupported(path: Path) -> None:
    if not _unsupported_warned[0]:
        _unsupported_warned[0] = True
        from slsd_cli.progress import warn

        warn(f"{path.parent}: the file system has no file locks; two runs into one output are not detected")


def _release(key: str) -> None:
    held_lock = _held.get(key)
    if held_lock is None:
        return
    held_lock.count -= 1
    if held_lock.count > 0:
        return
    del _held[key]
    with contextlib.suppress(OSError):  # removed while still locked: a waiter then re-checks the path
        if os.fstat(held_lock.fd).st_ino == os.stat(held_lock.path, follow_symlinks=False).st_ino:
            os.unlink(held_lock.path)
    os.close(held_lock.fd)


__all__ = ["acquire", "held", "lock_path", "remove_stale", "scope"]
