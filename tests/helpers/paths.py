"""Where things are, independent of how deep a test module sits under tests/."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"  # data files (images, annotation json)
COCO_39769 = FIXTURES / "coco_39769"
