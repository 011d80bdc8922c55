"""The one exception type for bad input.

The CLI turns an `InputError` into a single line on stderr and exit code 2 (no traceback unless
`--debug`). Library code raises it whenever user-supplied files or arguments are wrong, naming the
file and the offending record so the user can find it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

# control characters (a newline in a file name, an escape sequence in a record) would split or
# garble the one error line: they are shown escaped, as python writes them in a string
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with its control characters escaped ('a\\nb' for a newline): it prints on one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class InputError(Exception):
    """Bad input from the user: a file, a record in it, or an argument."""

    def __init__(self, message: str, *, path: str | Path | None = None, record: Any = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.record = record
        super().__init__(self.format())

    def format(self) -> str:
        """'<path>: <record>: <message>', on one line whatever the parts hold."""
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.record is not None:
            parts.append(str(self.record))
        parts.append(self.message)
        return one_line(": ".join(parts))


def unwrap_worker_error(exc: InputError) -> InputError:
    """The one-line error inside an InputError that a DataLoader worker raised.

    torch re-raises a worker's exception in the main process as `InputError("Caught InputError in
    DataLoader worker process 0.\\nOriginal Traceback ...\\nslsd_cli.errors.InputError: <line>")`;
    this returns an InputError holding just `<line>` (the file, record and message the worker
    named). Any other InputError is returned as is. Use: `except InputError as exc: raise
    unwrap_worker_error(exc) from None`."""
    if "DataLoader worker" not in exc.message:
        return exc
    last = exc.message.strip().splitlines()[-1]
    prefix = f"{InputError.__module__}.{InputError.__qualname__}: "
    for name in (prefix, f"{InputError.__qualname__}: "):
        if last.startswith(name):
            last = last[len(name):]
            break
    return InputError(last)


def worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader, turning a worker's wrapped InputError back into its one line."""
    try:
        yield from batches
    except InputError as exc:
        raise unwrap_worker_error(exc) from None
