"""The official lvis-api, the reference slsd's evaluator is checked against (tests/unit/test_eval.py)
and timed against (benchmarks/bench_eval.py). Test and benchmark support only: slsd itself never
imports lvis-api. Tests import this module through pytest's `pythonpath` (pyproject.toml); a
benchmark script finds it beside itself.
"""

from __future__ import annotations

import numpy as np


def lvis_api():
    """Import the official lvis-api under numpy 2. lvis 0.5.3 still calls `np.float` (removed in
    numpy 1.24); the alias is restored only when missing, and only that one."""
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    import lvis

    return lvis
