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


# ------------------------------------------------------------------ --stratify (issue 23)


def long_tail(n: int = 150) -> dict:
    """Class 1 in every image; classes 2-21 in 2 or 3 images each (one per image at most); class 22 in
    one image; and a conflict: the last two images hold class 31's two images, each beside the only
    image of a class (30, 32), so 31 cannot be held out without leaving 30 or 32 untrained."""
    data = lvis_like(n)
    data["annotations"] = []
    members = {i: [1] for i in range(n)}
    slot = 0
    for c in range(2, 22):
        for _ in range(2 + c % 2):
            members[slot].append(c)
            slot += 1
    members[slot].append(22)
    members[n - 2] += [30, 31]
    members[n - 1] += [31, 32]
    for i, img in enumerate(data["images"]):
        for c in members[i]:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": img["id"], "category_id": c,
                                        "bbox": [4, 4, 10, 8], "segmentation": [[4, 4, 14, 4, 14, 12, 4, 12]],
                                        "area": 80.0})
    data["categories"] = [{"id": c, "name": f"class{c}", "frequency": "r", "image_count": 0, "instance_count": 0}
                          for c in [*range(1, 23), 30, 31, 32]]
    return data


def test_stratified_holdout_holds_every_class_it_can(tmp_path, capsys):
    source = tmp_path / "lt.json"
    source.write_text(json.dumps(long_tail()))
    plain = split_dataset(source, tmp_path / "plain", seed=0)
    assert plain["stratify"] is None and "stratify" not in read(tmp_path / "plain" / "train.json")["info"]["slsd_split"]
    assert main(["split", str(source), "--stratify", "--fraction", "0.5", "--seed", "0", "--out-dir",
                 str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "stratified:" in out and "1 of them without a held-out image (ids 31)" in out
    train, held = read(tmp_path / "s" / "train.json"), read(tmp_path / "s" / "holdout.json")
    assert ids(train).isdisjoint(ids(held)) and len(ids(train) | ids(held)) == 150
    assert len(held["images"]) == len(read(tmp_path / "plain" / "holdout.json")["images"]) == 22  # same share
    count = {name: {c["id"]: c["image_count"] for c in d["categories"]} for name, d in (("t", train), ("h", held))}
    for c in [*range(1, 23), 30, 32]:
        assert count["t"][c] >= 1, c  # every class keeps a training image
    for c in range(1, 22):
        assert count["h"][c] >= 1, c  # and every class with >= 2 images a held-out one
    assert count["h"][31] == 0 and count["t"][31] == 2  # the conflict: reported, training images kept
    plain_held = read(tmp_path / "plain" / "holdout.json")
    assert sum(1 for c in range(2, 22) if not any(a["category_id"] == c for a in plain_held["annotations"])) > 5
    assert held["info"]["slsd_split"]["stratify"] is True
    assert ids(read(tmp_path / "s" / fraction_file_name(0.5))) < ids(train)
    again = split_dataset(source, tmp_path / "again", seed=0, stratify=True)
    assert (tmp_path / "again" / "holdout.json").read_bytes() == (tmp_path / "s" / "holdout.json").read_bytes()
    assert again["stratify"]["uncovered"] == [31] and again["stratify"]["untrained"] == []
    assert main(["split", str(source), "--stratify", "--holdout", "0", "--out-dir", str(tmp_path / "z")]) == 2
    assert "--stratify" in capsys.readouterr().err


def test_stratify_moves_only_what_it_must():
    from slsd_cli.data.split import stratify_holdout

    order = [10, 11, 12, 13, 14, 15]
    classes = {10: {1}, 11: {1}, 12: {1, 2}, 13: {2}, 14: {3}, 15: {1}}
    held, report = stratify_holdout(order, 2, classes)  # the head {10, 11} lacks class 2
    assert held == {10, 12} and report["moved"] == 2  # 12 (class 2's first image) in, 11 (the latest) out
    assert report["uncovered"] == [] and report["untrained"] == []
    held, report = stratify_holdout([14, 10, 11, 12, 13, 15], 1, classes)  # class 3's only image is the head
    assert 14 not in held and len(held) == 1 and report["untrained"] == []
