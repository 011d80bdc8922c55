"""An `slsd` command in a subprocess that does something of the test's at a chosen point: on the
k-th call of one function of the library (`module:attribute.path`), before the call runs.

    hooked_argv(ACTION, "slsd_cli.engine.trainer:_forward_backward", 2, param, ["train-teacher", ...])

`ACTION` is python code run at that moment, with `param` (a string) and `os`, `signal`, `sys`,
`time` in scope: send a signal, wait for a file, ...
"""

from __future__ import annotations

import os
import sys
import textwrap

from tests.helpers.paths import REPO

_SCRIPT = """
import importlib, os, signal, sys, time
target, at, param = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def action():
{action}
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        action()
    return real(*args, **kwargs)
setattr(owner, name, wrapper)
from slsd_cli.cli import main
sys.exit(main(sys.argv[4:]))
"""


def hooked_argv(action: str, target: str, at: int, param: str, args: list[str]) -> list[str]:
    """The command line of `python -c <script> ...` running `slsd <args>` with the hook."""
    script = _SCRIPT.format(action=textwrap.indent(textwrap.dedent(action).strip(), "    "))
    return [sys.executable, "-c", script, target, str(at), param, *args]


def env() -> dict[str, str]:
    """One thread (as the suite's in-process runs), the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
