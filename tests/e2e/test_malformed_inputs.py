"""Malformed inputs end with one line naming the file and the record, exit code 2, no traceback."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from slsd_cli.cli import main
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError

RLE_COUNTS = "T5880000000\\2"  # pycocotools RLE of a 5x8 block at x 10-14, y 4-11 in a 16x20 image
BASE = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 16, "neg_category_ids": [], "not_exhaustive_category_ids": []},
        {"id": 2, "file_name": "b.png", "width": 24, "height": 12, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ],
    "categories": [{"id": 5, "name": "cup"}, {"id": 9, "name": "kite"}],
    "annotations": [
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [2, 2, 6, 6], "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
        {"id": 12, "image_id": 1, "category_id": 9, "bbox": [10, 4, 5, 8],
         "segmentation": {"size": [16, 20], "counts": RLE_COUNTS}},
        {"id": 13, "image_id": 2, "category_id": 5, "bbox": [0, 0, 24, 12], "segmentation": [[0, 0, 24, 0, 24, 12, 0, 12]]},
    ],
}


def _set(section: str, index: int, **fields):
    def mutate(data):
        data[section][index].update(fields)
    return mutate


def _delete(section: str, index: int, key: str):
    def mutate(data):
        del data[section][index][key]
    return mutate


def _append(section: str, record: dict):
    def mutate(data):
        data[section].append(record)
    return mutate


# (case id, mutation, record named in the message, words the message must contain)
CASES = [
    ("missing-top-level-key", lambda d: d.pop("categories"), None, "missing required key 'categories'"),
    ("missing-annotation-key", _delete("annotations", 1, "bbox"), "annotations[1]", "missing required key 'bbox'"),
    ("missing-image-size", _delete("images", 1, "height"), "images[1]", "missing required key 'height'"),
    ("duplicate-image-id", _set("images", 1, id=1), "images[1]", "duplicate id 1"),
    ("duplicate-annotation-id", _set("annotations", 2, id=11), "annotations[2]", "duplicate id 11"),
    ("duplicate-category-id", _append("categories", {"id": 9, "name": "kite2"}), "categories[2]", "duplicate id 9"),
    ("unknown-image", _set("annotations", 2, image_id=77), "annotations[2] (id 13)", "unknown image id 77"),
    ("unknown-category", _set("annotations", 0, category_id=4), "annotations[0] (id 11)", "unknown category id 4"),
    ("zero-width-box", _set("annotations", 0, bbox=[2, 2, 0, 6]), "annotations[0] (id 11)", "degenerate bbox"),
    ("negative-height-box", _set("annotations", 1, bbox=[10, 4, 5, -1]), "annotations[1] (id 12)", "degenerate bbox"),
    ("box-outside-image", _set("annotations", 2, bbox=[10, 0, 24, 12]), "annotations[2] (id 13)", "outside its image"),
    ("polygon-two-points", _set("annotations", 0, segmentation=[[2, 2, 8, 2]]), "annotations[0] (id 11)", "at least 3"),
    ("rle-size-mismatch", _set("annotations", 1, segmentation={"size": [20, 16], "counts": RLE_COUNTS}),
     "annotations[1] (id 12)", "disagrees with its image"),
    ("rle-size-not-a-pair", _set("annotations", 1, segmentation={"size": 16, "counts": RLE_COUNTS}),
     "annotations[1] (id 12)", "RLE size must be"),
    ("image-id-not-int", _set("annotations", 0, image_id=[1]), "annotations[0] (id 11)", "image_id must be an integer"),
    ("neg-ids-not-list", _set("images", 0, neg_category_ids=None), "images[0] (id 1)", "neg_category_ids must be a list"),
    ("neg-id-unknown", _set("images", 1, not_exhaustive_category_ids=[3]), "images[1] (id 2)", "unknown category id 3"),
    ("non-positive-width", _set("images", 0, width=0), "images[0]", "width must be a positive integer"),
]


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def assert_one_line_error(err: str, path: Path, record: str | None, words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err
    assert line.startswith(f"error: {path}: "), line
    if record is not None:
        assert f": {record}: " in line, line
    assert words in line, line


def test_base_fixture_is_valid(tmp_path):
    assert main(["split", str(write(tmp_path / "ok.json", BASE)), "--out-dir", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("case,mutate,record,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_annotations_through_cli(tmp_path, capsys, case, mutate, record, words):
    data = copy.deepcopy(BASE)
    mutate(data)
    path = write(tmp_path / f"{case}.json", data)
    assert main(["split", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, path, record, words)
    assert not (tmp_path / "out" / "train.json").exists()


def test_malformed_json_subprocess(tmp_path):
    """The installed console script itself: exit status 2 and one line on stderr."""
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1,, ]}')
    entry = "import sys; from slsd_cli.cli import main; sys.exit(main())"  # what the `slsd` script runs
    proc = subprocess.run([sys.executable, "-c", entry, "split", str(path), "--out-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, path, None, "malformed json")
    assert "line 1 column" in proc.stderr  # where in the file


def test_top_level_not_an_object(tmp_path, capsys):
    path = write(tmp_path / "list.json", [BASE])
    assert main(["split", str(path), "--out-dir", str(tmp_path / "o")]) == 2
    assert_one_line_error(capsys.readouterr().err, path, None, "top level must be an object")


# ------------------------------------------------------------------ image files, at load time


@pytest.fixture()
def image_dir(tmp_path) -> tuple[Path, Path]:
    write_png(torch.zeros(3, 16, 20, dtype=torch.uint8), str(tmp_path / "a.png"))
    write_png(torch.zeros(3, 12, 24, dtype=torch.uint8), str(tmp_path / "b.png"))
    return tmp_path, write(tmp_path / "ann.json", BASE)


def _load_error(root: Path, ann: Path, index: int) -> InputError:
    dataset = InstanceDataset(load_annotations(ann), root)
    dataset[1 - index]  # the other image still loads
    with pytest.raises(InputError) as info:
        dataset[index]
    return info.value


def test_missing_image_file(image_dir):
    root, ann = image_dir
    (root / "b.png").unlink()
    err = _load_error(root, ann, 1)
    assert_one_line_error(f"error: {err.format()}", root / "b.png", "image id 2", "image file not found")


def test_unreadable_image_file(image_dir):
    root, ann = image_dir
    (root / "a.png").write_bytes(b"\x89PNG but not really" * 20)
    err = _load_error(root, ann, 0)
    assert_one_line_error(f"error: {err.format()}", root / "a.png", "image id 1", "unreadable image")


def test_truncated_image_file(image_dir):
    root, ann = image_dir
    data = (root / "a.png").read_bytes()
    (root / "a.png").write_bytes(data[: len(data) // 2])
    err = _load_error(root, ann, 0)
    assert_one_line_error(f"error: {err.format()}", root / "a.png", "image id 1", "unreadable image")


def test_image_size_disagrees_with_record(image_dir):
    root, ann = image_dir
    write_png(torch.zeros(3, 16, 21, dtype=torch.uint8), str(root / "a.png"))
    err = _load_error(root, ann, 0)
    assert_one_line_error(f"error: {err.format()}", root / "a.png", "image id 1", "21x16 but its record")
