"""Outputs made of several files, and the check every output passes before it is written.

A `FileSet` is written into a staging folder beside its targets and renamed into place together
under a journal: after a crash or SIGKILL at any point the next start rolls the folder back to the
outputs as they were before, so either the whole new set is there or none of it, and a plain rerun
completes without `--force`. `check_output` refuses an existing output without `--force`, after
rolling back the sets a killed run left in its folder, and locks the output for the command
(`io.locks`: a second run into the same output fails at once, naming the first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from slsd_cli import interrupts
from slsd_cli.errors import InputError
from slsd_cli.io import locks
from slsd_cli.io.files import atomic_write_json, make_dirs, output_errors, remove_path, remove_temporaries

if TYPE_CHECKING:  # torch is imported where it is used, so light commands start fast
    pass


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing output unless forced; create the parent directory; remove
    the temporaries of this output that a killed run left behind. The output is locked first, for
    the rest of the command (`io.locks`; a second run fails here, naming the first). `FileSet`
    staging folders that killed runs left in its folder are rolled back next (once per process), so
    half-committed files do not count as existing outputs."""
    path = Path(path)
    locks.acquire(path)
    if path.parent.is_dir():
        _recover_once(path.parent)
    if path.exists() and not force:
        raise InputError("output exists; pass --force to overwrite it", path=path)
    make_dirs(path.parent)
    remove_temporaries(path)
    return path


_JOURNAL = "journal.json"


_OWNER = "owner.json"


def _staging_name(first_output: str) -> str:
    return f".{first_output}.set.tmp"


def _write_owner(staging: Path) -> None:
    """Mark `staging` as being written by this process (see `_alive`)."""
    (staging / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _alive(staging: Path) -> bool:
    """Whether another live process on this host is writing this staging folder right now."""
    try:
        owner = json.loads((staging / _OWNER).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RECOVERED: set[str] = set()  # folders already rolled back by this process (leftovers predate it)


def _recover_once(folder: Path) -> None:
    """`_recover_file_sets` the first time this process writes into `folder` (checking many outputs
    of one folder must not scan it again each time)."""
    key = os.path.abspath(folder)
    if key not in _RECOVERED:
        _recover_file_sets(folder)
        _RECOVERED.add(key)


def _recover_file_sets(folder: Path) -> None:
    """Roll back what killed runs left of multi-file outputs in `folder`: files already renamed
    into place are removed (and the previous versions put back from the staging folder), and the
    staging folder is deleted; their lock files that no live process holds are removed. A staging folder is first claimed by a rename, so two processes
    recovering at once (torchrun ranks) never undo each other's work; a folder whose writer is
    still alive is left alone. Only rank 0 of a torchrun job recovers (the other ranks may check
    outputs at the same time, even on other hosts)."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return
    leftovers = [entry.name for entry in entries if entry.name.endswith((".set.tmp", ".claim"))
                 and entry.is_dir(follow_symlinks=False)]
    for entry in entries:  # lock files of killed runs (a live run's lock is held: left alone)
        if entry.name.endswith(".lock") and entry.is_file(follow_symlinks=False):
            locks.remove_stale(Path(entry.path))
    for leftover in leftovers:
        staging = folder / leftover
        if _alive(staging):
            continue  # being written, or recovered, by a live process
        with interrupts.deferred():  # a roll-back is finished, whatever signal comes
            _roll_back(folder, leftover, staging)


def _roll_back(folder: Path, leftover: str, staging: Path) -> None:
    """`_recover_file_sets` for one staging folder."""
    if leftover.endswith(".set.tmp"):
        claimed = folder / f"{leftover}.{os.getpid()}.{os.urandom(4).hex()}.claim"
        try:
            os.rename(staging, claimed)
        except FileNotFoundError:
            return  # another process claimed it
        staging = claimed
    with output_errors(staging, staging):
        _write_owner(staging)
        try:
            targets = [folder / t for t in json.loads((staging / _JOURNAL).read_text())["targets"]]
        except (OSError, ValueError, KeyError, TypeError):
            targets = []  # no journal (or a torn one): nothing was renamed into place yet
        for i, target in enumerate(targets):
            new, old = staging / str(i) / target.name, staging / f"{i}.old"
            if not new.exists():  # the new version was renamed into place: take it out again
                remove_path(target)
            if old.exists() and not target.exists():
                os.rename(old, target)  # the previous version comes back
        shutil.rmtree(staging)


class FileSet:
    """Several outputs (files or folders) that appear together or not at all.

        with FileSet([out / "train.json", out / "holdout.json"], force) as files:
            atomic_write_json(files.stage(out / "train.json"), train)
            ...

    On creation: staging folders that killed runs left in the outputs' folder are rolled back, and
    each output is checked (`check_output`: an existing one needs `force`). `stage(target)` gives the path to write the
    target's new version to, `OUTDIR/.FIRST.set.tmp/INDEX/NAME` (the same name, so shards and
    temporaries beside it stay recognisable). On a clean exit `commit()` moves them into place
    under a journal; on an exception the staging folder is removed. `main=False` (other torchrun
    ranks) only computes paths; rank 0 checks, creates and commits."""

    def __init__(self, paths: Sequence[str | Path], force: bool, main: bool = True):
        self.targets = [Path(p) for p in paths]
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError("a FileSet needs distinct outputs")
        folder = Path(os.path.commonpath([str(p.parent.absolute()) for p in self.targets]))
        self.staging = folder / _staging_name(self.targets[0].name)
        self.main = main
        if main:
            make_dirs(folder)
            _recover_once(folder)
            for target in self.targets:
                check_output(target, force)
            if self.staging.is_symlink():  # not made by slsd: never followed (the files would land elsewhere)
                with output_errors(self.staging, self.staging):
                    self.staging.unlink()
            try:
                for i in range(len(self.targets)):
                    make_dirs(self.staging / str(i))
                with output_errors(self.staging):
                    _write_owner(self.staging)
            except BaseException:
                self.discard()
                raise

    def stage(self, target: str | Path) -> Path:
        """Where to write `target`'s new version."""
        target = Path(target)
        return self.staging / str(self.targets.index(target)) / target.name

    def commit(self) -> None:
        """Rename every staged output into place (the previous versions kept in the staging folder
        until the end); a crash in here is undone by the next start."""
        missing = [t for t in self.targets if not self.stage(t).exists()]
        if missing:
            raise RuntimeError(f"FileSet.commit: {missing[0]} was never written")
        with interrupts.deferred(), output_errors(self.targets[0], self.staging, *self.targets):
            folder = self.staging.parent
            atomic_write_json(self.staging / _JOURNAL,
                              {"targets": [os.path.relpath(t.absolute(), folder) for t in self.targets]})
            _fsync_dir(self.staging)
            for i, target in enumerate(self.targets):
                if target.exists() or target.is_symlink():
                    os.rename(target, self.staging / f"{i}.old")
                os.rename(self.stage(target), target)
            _fsync_dir(self.staging.parent)
            os.unlink(self.staging / _JOURNAL)  # the commit point: from here on nothing is rolled back
            shutil.rmtree(self.staging)

    def discard(self) -> None:
        with interrupts.deferred(), contextlib.suppress(OSError):
            shutil.rmtree(self.staging)

    def rollback(self) -> None:
        """Undo a commit that failed half-way (what the next start would do)."""
        _recover_file_sets(self.staging.parent)

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.main:
            return
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.rollback()
                raise
        else:
            self.discard()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
