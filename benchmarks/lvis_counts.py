"""The LVIS v1 long tail for benchmarks: the 1,203 categories with their real training counts.

Reads `benchmarks/data/lvis_v1_counts.json` (vendored from the LVIS v1 training annotations, CC BY 4.0;
see benchmarks/data/README.md): rows of [id, frequency, image_count, instance_count]. Category names
are not vendored; `lvis_categories()` names each category `lvis_<id>`.
"""

from __future__ import annotations

import json
from pathlib import Path

COUNTS = Path(__file__).resolve().parent / "data" / "lvis_v1_counts.json"


def lvis_categories() -> list[dict]:
    """[{"id", "name", "frequency", "image_count", "instance_count"}, ...] in id order."""
    data = json.loads(COUNTS.read_text())
    fields = data["fields"]
    return [{"name": f"lvis_{row[0]}", **dict(zip(fields, row))} for row in data["rows"]]
