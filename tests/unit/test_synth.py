"""`slsd synth`: the embedded long-tail benchmark (small configurations, a few seconds in all)."""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsd_cli.cli import main
from slsd_cli.data import synthetic
from slsd_cli.data.lvis import annotation_mask, frequency_group, load_annotations

SMALL = dict(classes=10, train_images=260, val_images=30, pool_images=40, image_size=64)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synthetic.generate(out, seed=3, **SMALL)
    return out, summary


def test_round_trip_loads_and_images_exist(small):
    out, summary = small
    train = load_annotations(out / "train.json")
    val = load_annotations(out / "val.json")
    pool_gt = load_annotations(out / "pool_gt.json")
    pool = load_annotations(out / "pool.json", require_annotations=False)
    assert train.protocol == val.protocol == pool_gt.protocol == "lvis"
    assert len(train.images) == SMALL["train_images"] and len(val.images) == SMALL["val_images"]
    assert len(pool.images) == len(pool_gt.images) == SMALL["pool_images"]
    calib = load_annotations(out / "calib.json")
    assert len(calib.images) == SMALL["val_images"] and calib.protocol == "lvis"  # val's size by default
    assert pool.annotations == [] and len(pool_gt.annotations) > 0
    assert [c["id"] for c in pool.categories] == train.category_ids == val.category_ids
    # the other files carry the training counts and groups (as LVIS val does)
    assert pool_gt.frequencies() == val.frequencies() == train.frequencies()
    ids = [i for a in (train, val, pool, calib) for i in a.images]
    assert len(ids) == len(set(ids)), "image ids are unique across splits"
    ann_ids = [x["id"] for a in (train, val, pool_gt, calib) for x in a.annotations]
    assert len(ann_ids) == len(set(ann_ids))
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == sorted(img["file_name"] for a in (train, val, pool, calib) for img in a.images.values())
    for a in (train, val, pool, calib):
        for image_id in list(a.images)[:5]:
            with Image.open(a.image_file(image_id, out / "images")) as im:
                assert im.size == (SMALL["image_size"], SMALL["image_size"]) and im.mode == "RGB"
    assert summary["splits"]["train"]["instances"] == len(train.annotations)
    # exhaustive labels: every absent class is a verified negative
    for image_id, img in train.images.items():
        present = {a["category_id"] for a in train.anns_by_image.get(image_id, [])}
        assert set(img["neg_category_ids"]) == set(train.category_ids) - present


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    synthetic.generate(again, seed=3, **SMALL)
    assert tree_hashes(again) == tree_hashes(out)
    other = tmp_path / "other"
    synthetic.generate(other, seed=4, **{**SMALL, "train_images": 255, "pool_images": 5})
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()


def test_long_tail_groups_and_exact_counts(small):
    out, summary = small
    train = load_annotations(out / "train.json")
    groups = Counter(train.frequencies())
    assert groups["r"] > 0 and groups["c"] > 0 and groups["f"] > 0
    assert summary["groups"] == {g: groups[g] for g in "rcf"}
    classes = json.loads((out / "classes.json").read_text())["classes"]
    intended = {c["id"]: c["train_image_count"] for c in classes}
    for cat in train.categories:
        images = {a["image_id"] for a in train.annotations if a["category_id"] == cat["id"]}
        assert len(images) == cat["image_count"] == intended[cat["id"]]
        assert cat["frequency"] == frequency_group(len(images))
        assert cat["instance_count"] >= cat["image_count"]


def test_curve_follows_lvis_shares():
    counts = synthetic.train_image_counts(40, 500)
    shares = [(counts <= 10).mean(), ((counts > 10) & (counts <= 100)).mean(), (counts > 100).mean()]
    # LVIS v1: 337 rare, 461 common, 405 frequent of 1,203 classes
    assert np.allclose(shares, [337 / 1203, 461 / 1203, 405 / 1203], atol=0.03)
    assert counts.max() <= 0.4 * 500 and np.all(np.diff(counts) >= 0)


@pytest.mark.parametrize("name", ["val.json", "calib.json"])
def test_val_and_calib_have_five_images_per_class(small, name):
    out, _ = small
    data = load_annotations(out / name)
    per_class = Counter(a["category_id"] for a in data.annotations)
    images = Counter(c for image_id in data.images for c in {a["category_id"] for a in data.anns_by_image.get(image_id, [])})
    assert all(images[cid] >= 5 and per_class[cid] >= images[cid] for cid in data.category_ids)
    assert data.frequencies() == load_annotations(out / "train.json").frequencies()  # the training groups
    for image_id, img in data.images.items():  # exhaustive: every absent class a verified negative
        present = {a["category_id"] for a in data.anns_by_image.get(image_id, [])}
        assert set(img["neg_category_ids"]) == set(data.category_ids) - present


def test_calib_split_leaves_the_other_outputs_as_they_were(tmp_path):
    """The calibration split draws from streams of its own: its size changes no other byte."""
    tiny = dict(classes=3, train_images=255, val_images=5, pool_images=3, image_size=32, seed=2)
    synthetic.generate(tmp_path / "a", **tiny)
    synthetic.generate(tmp_path / "b", calib_images=7, **tiny)
    a, b = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    others = {k for k in a if "calib" not in k}
    assert {k: a[k] for k in others} == {k: b[k] for k in others} and len(others) == 5 + 255 + 5 + 3
    assert a["calib.json"] != b["calib.json"]
    assert len(json.loads((tmp_path / "b" / "calib.json").read_text())["images"]) == 7
    with pytest.raises(synthetic.InputError, match="--calib-images 4 is too few"):
        synthetic.generate(tmp_path / "c", calib_images=4, **tiny)


def test_pool_is_richer_in_rare_classes(small):
    out, summary = small
    train = load_annotations(out / "train.json")
    pool_gt = load_annotations(out / "pool_gt.json")
    rare = {c["id"] for c in train.categories if c["frequency"] == "r"}
    train_rare = sum(a["category_id"] in rare for a in train.annotations)
    pool_rare = sum(a["category_id"] in rare for a in pool_gt.annotations)
    assert pool_rare / len(pool_gt.annotations) > 3 * train_rare / len(train.annotations)
    by_group = summary["splits"]["pool_gt"]["instances_by_group"]
    assert by_group["r"] == pool_rare


def test_masks_tight_boxes_and_areas(small):
    out, _ = small
    for name in ("train.json", "val.json", "pool_gt.json"):
        data = load_annotations(out / name)
        for ann in data.annotations[:400]:
            img = data.images[ann["image_id"]]
            mask = annotation_mask(ann, img["height"], img["width"])
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert np.allclose(tight, ann["bbox"], atol=1.0), (name, ann["id"])
            assert mask.sum() == ann["area"] >= synthetic.MIN_OBJECT_AREA * synthetic.MIN_VISIBLE_FRACTION


def test_painted_pixels_match_the_mask():
    """The object's colour lies exactly inside its mask: saturated inside, muted just outside."""
    classes = [synthetic.SynthClass(1, "square", "red", "solid"), synthetic.SynthClass(2, "ring", "blue", "striped")]
    for k in range(2):
        rng = np.random.default_rng(k)
        pixels, masks = synthetic.render_image(96, [k], classes, rng)
        (cls, mask), = masks
        hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels.reshape(-1, 3)]).reshape(96, 96, 3)
        padded = np.pad(mask, 1)
        dilated = mask.copy()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            dilated |= padded[dy:dy + 96, dx:dx + 96]
        ring = dilated & ~mask
        assert np.median(hsv[..., 1][mask]) > 0.45
        assert np.median(hsv[..., 1][ring]) < 0.3
        hue = np.median(hsv[..., 0][mask & (hsv[..., 1] > 0.4)]) * 360
        target = classes[cls].hue
        assert min(abs(hue - target), 360 - abs(hue - target)) < 15


def test_classes_json_similarity(small):
    out, _ = small
    doc = json.loads((out / "classes.json").read_text())
    sim = np.array(doc["similarity"])
    assert sim.shape == (SMALL["classes"], SMALL["classes"])
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    names = [c["name"] for c in doc["classes"]]
    assert len(set(names)) == len(names)
    a, b = doc["classes"][0], doc["classes"][1]
    shared = sum(a[k] == b[k] for k in ("shape", "colour", "texture"))
    assert sim[0, 1] == pytest.approx(shared / 3, abs=1e-6)


def test_cli_refuses_existing_output_and_bad_options(small, tmp_path, capsys):
    out, _ = small
    before = tree_hashes(out)
    assert main(["synth", str(out), "--classes", "10", "--train-images", "260"]) == 2
    assert "--force" in capsys.readouterr().err
    assert tree_hashes(out) == before
    assert main(["synth", str(tmp_path / "x"), "--classes", "2"]) == 2
    assert main(["synth", str(tmp_path / "x"), "--train-images", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "at least" in err
    assert not (tmp_path / "x" / "train.json").exists()


def test_cli_force_replaces_outputs(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["synth", str(out), "--classes", "3", "--train-images", "255", "--val-images", "10",
            "--pool-images", "3", "--image-size", "32"]
    assert main(args) == 0
    (out / "images" / "stale.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    assert main(args + ["--seed", "1"]) == 2
    assert main(args + ["--seed", "1", "--force"]) == 0
    assert not (out / "images" / "stale.png").exists(), "the images folder is replaced as a whole"
    assert (out / "notes.txt").read_text() == "mine", "files that are not outputs are left alone"
    assert json.loads((out / "train.json").read_text())["info"]["seed"] == 1
    assert "train" in capsys.readouterr().out
