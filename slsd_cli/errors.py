"""The one exception type for bad input.

The CLI turns an `InputError` into a single line on stderr and exit code 2 (no traceback unless
`--debug`). Library code raises it whenever user-supplied files or arguments are wrong, naming the
file and the offending record so the user can find it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InputError(Exception):
    """Bad input from the user: a file, a record in it, or an argument."""

    def __init__(self, message: str, *, path: str | Path | None = None, record: Any = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.record = record
        super().__init__(self.format())

    def format(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.record is not None:
            parts.append(str(self.record))
        parts.append(self.message)
        return ": ".join(parts)
