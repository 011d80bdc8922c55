"""`slsd split`: determinism, disjoint 85/15 split, nested fractions, recomputed counts."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from slsd_cli.cli import main
from slsd_cli.data.lvis import frequency_group
from slsd_cli.data.split import fraction_file_name, split_dataset

N_IMAGES = 150


def lvis_like(n: int = N_IMAGES) -> dict:
    """Class 1 in every image, class 2 in every third, class 3 in five images, class 4 in none;
    LVIS image fields and stale category counts that a split must recompute."""
    images, anns = [], []
    for i in range(n):
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "coco_url": f"http://images.cocodataset.org/train2017/{image_id:012d}.jpg",
                       "width": 64, "height": 48, "neg_category_ids": [4] if i % 2 else [],
                       "not_exhaustive_category_ids": [2] if i % 5 == 0 else []})
        cats = [1] + ([2, 2] if i % 3 == 0 else []) + ([3] if i in (3, 17, 40, 77, 120) else [])
        for c in cats:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [4, 4, 10, 8],
                         "segmentation": [[4, 4, 14, 4, 14, 12, 4, 12]], "area": 80.0})
    categories = [{"id": c, "name": f"class{c}", "synset": f"class{c}.n.01", "frequency": "f",
                   "image_count": 999, "instance_count": 999} for c in (1, 2, 3, 4)]
    return {"info": {"description": "lvis-like"}, "licenses": [{"id": 1, "name": "test"}],
            "images": images, "annotations": anns, "categories": categories}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "lvis_like.json"
    path.write_text(json.dumps(lvis_like()))
    return path


@pytest.fixture(scope="module")
def outputs(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    code = main(["split", str(source), "--holdout", "0.15", "--fraction", "0.5", "--fraction", "0.1",
                 "--fraction", "0.02", "--seed", "3", "--out-dir", str(out)])
    assert code == 0
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def ids(data: dict) -> set[int]:
    return {img["id"] for img in data["images"]}


def test_outputs_written(outputs):
    names = sorted(p.name for p in outputs.iterdir())
    assert names == ["holdout.json", "train.json", "train_frac0.02.json", "train_frac0.1.json", "train_frac0.5.json"]
    assert not list(outputs.glob(".*tmp"))


def test_split_is_disjoint_union_with_85_15_share(outputs, source):
    everything = read(source)
    train, held = read(outputs / "train.json"), read(outputs / "holdout.json")
    assert ids(train).isdisjoint(ids(held))
    assert ids(train) | ids(held) == ids(everything)
    assert len(held["images"]) == round(0.15 * N_IMAGES)
    ann_ids = [a["id"] for a in train["annotations"]] + [a["id"] for a in held["annotations"]]
    assert sorted(ann_ids) == sorted(a["id"] for a in everything["annotations"])
    for data in (train, held):
        assert all(a["image_id"] in ids(data) for a in data["annotations"])


def test_fractions_are_nested(outputs):
    train = ids(read(outputs / "train.json"))
    f50, f10, f02 = (ids(read(outputs / fraction_file_name(f))) for f in (0.5, 0.1, 0.02))
    assert f02 < f10 < f50 < train
    n_train = len(train)
    assert (len(f50), len(f10), len(f02)) == (round(0.5 * n_train), round(0.1 * n_train), round(0.02 * n_train))


def test_counts_recomputed_and_fields_kept(outputs, source):
    everything = read(source)
    records = {img["id"]: img for img in everything["images"]}
    train_freq = None
    for name in ("train.json", "train_frac0.5.json", "train_frac0.02.json", "holdout.json"):
        data = read(outputs / name)
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]  # the category list stays whole
        images_of, instances = defaultdict(set), defaultdict(int)
        for a in data["annotations"]:
            images_of[a["category_id"]].add(a["image_id"])
            instances[a["category_id"]] += 1
        for c in data["categories"]:
            assert c["image_count"] == len(images_of[c["id"]]) and c["instance_count"] == instances[c["id"]]
            assert c["synset"] == f"class{c['id']}.n.01"
        if name == "train.json":
            train_freq = {c["id"]: c["frequency"] for c in data["categories"]}
            assert train_freq == {c["id"]: frequency_group(c["image_count"]) for c in data["categories"]}
            assert train_freq == {1: "f", 2: "c", 3: "r", 4: "r"}
        elif name == "holdout.json":  # groups are defined by training images
            assert {c["id"]: c["frequency"] for c in data["categories"]} == train_freq
        else:
            assert all(c["frequency"] == frequency_group(c["image_count"]) for c in data["categories"])
        for img in data["images"]:
            assert img == records[img["id"]]  # neg_category_ids, not_exhaustive_category_ids, coco_url kept
        assert data["licenses"] == everything["licenses"]
        assert data["info"]["slsd_split"]["seed"] == 3


def test_split_is_deterministic(source, tmp_path):
    a = split_dataset(source, tmp_path / "a", fractions=[0.1], seed=3)
    b = split_dataset(source, tmp_path / "b", fractions=[0.1], seed=3)
    c = split_dataset(source, tmp_path / "c", fractions=[0.1], seed=4)
    for name in ("train.json", "holdout.json", "train_frac0.1.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert ids(read(tmp_path / "a" / "holdout.json")) != ids(read(tmp_path / "c" / "holdout.json"))
    assert [o["images"] for o in a["outputs"]] == [o["images"] for o in b["outputs"]] == [128, 22, 13]


def test_existing_outputs_need_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["split", str(source), "--out-dir", str(out)]) == 0
    before = (out / "train.json").read_bytes()
    capsys.readouterr()
    assert main(["split", str(source), "--out-dir", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.json" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "train.json").read_bytes() == before
    assert main(["split", str(source), "--out-dir", str(out), "--seed", "1", "--force"]) == 0
    assert (out / "train.json").read_bytes() != before


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(lvis_like(20)))
    assert main(["split", str(path), "--out-dir", str(tmp_path), "--force"]) == 2
    assert "overwrite the input" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [(["--fraction", "0"], "--fraction"), (["--fraction", "1.5"], "--fraction"),
                                         (["--holdout", "1"], "--holdout"), (["--holdout", "-0.1"], "--holdout")])
def test_bad_arguments(source, tmp_path, capsys, args, needle):
    assert main(["split", str(source), "--out-dir", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_help_shows_an_example(capsys):
    assert main(["split", "--help"]) == 0
    out = capsys.readouterr().out
    assert "slsd split" in out and "--fraction" in out and "--holdout" in out
