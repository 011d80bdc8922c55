"""`load_annotations` pauses the cyclic GC while it builds the dataset (a speed-up only): the
caller's GC state and frozen objects are left as they were, and the result is the same."""

from __future__ import annotations

import gc
import json

import pytest

from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError

DATA = {"images": [{"id": 1, "width": 30, "height": 20, "file_name": "1.png"}],
        "categories": [{"id": 5, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 8], "area": 80,
                         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}]}


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_state_is_restored(tmp_path, enabled):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(DATA))
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        ann = load_annotations(path)
        assert gc.isenabled() == enabled
        assert ann.category_ids == [5] and ann.categories[0]["instance_count"] == 1
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**DATA, "annotations": [{**DATA["annotations"][0], "image_id": 7}]}))
        with pytest.raises(InputError, match="unknown image id 7"):
            load_annotations(bad)
        assert gc.isenabled() == enabled  # also after an error
    finally:
        gc.enable() if was else gc.disable()


def test_caller_frozen_objects_stay_frozen(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(DATA))
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        load_annotations(path)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
