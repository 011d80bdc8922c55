"""CCECE / ECE (Eq. 4) against a plain-loop reference, LVIS judging, the fast results reader,
Eq. 5 corrections, and `slsd calibrate` bad-input handling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError
from slsd_cli.labels import calibration
from slsd_cli.evaluation import matching
from slsd_cli.labels.calibration import compute_calibration, load_delta
from slsd_cli.labels.delta_estimate import ClassSupport, DeltaEstimator, estimate_delta
from slsd_cli.data.results import from_records, read_results
from slsd_cli.data.results_parser import box_columns
from tests.helpers.cli import run_cli

W, H = 64, 48


# ------------------------------------------------------------------ fixtures


def make_dataset(seed: int, protocol: str = "lvis", images: int = 6, classes: int = 5, with_masks: bool = False):
    """Random ground truth and detections (jittered copies of the ground truth with duplicates and
    class confusions, plus random boxes)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 10 + 3 * c, "name": f"c{c}"} for c in range(classes)]
    if protocol == "lvis":
        for c, cat in enumerate(cats):
            cat["frequency"] = "rcf"[c % 3]
    imgs, anns, dets = [], [], []
    for i in range(images):
        image = {"id": 100 + i, "width": W, "height": H, "file_name": f"{i}.png"}
        present = rng.choice(classes, size=rng.integers(1, 3), replace=False)
        if protocol == "lvis":
            others = [c for c in range(classes) if c not in present]
            neg = rng.choice(others, size=min(len(others), 2), replace=False) if others else []
            image["neg_category_ids"] = [cats[c]["id"] for c in neg]
            image["not_exhaustive_category_ids"] = [cats[c]["id"] for c in present if rng.random() < 0.3]
        imgs.append(image)
        for c in present:
            for _ in range(rng.integers(1, 4)):
                w, h = rng.uniform(6, 30), rng.uniform(6, 24)
                x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
                box = [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]
                ann = {"id": len(anns) + 1, "image_id": image["id"], "category_id": cats[c]["id"], "bbox": box,
                       "area": box[2] * box[3],
                       "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3],
                                         box[0], box[1] + box[3]]]}
                if protocol == "coco":
                    ann["iscrowd"] = int(rng.random() < 0.15)
                anns.append(ann)
                for _ in range(rng.integers(1, 4)):  # duplicates compete for the same gt
                    jit = rng.normal(0, 0.15, 4) * [w, h, w, h]
                    cls = c if rng.random() < 0.8 else rng.integers(classes)
                    dets.append({"image_id": image["id"], "category_id": cats[cls]["id"],
                                 "bbox": [max(0.0, box[0] + jit[0]), max(0.0, box[1] + jit[1]),
                                          max(1.0, box[2] + jit[2]), max(1.0, box[3] + jit[3])],
                                 "score": float(rng.uniform(0, 1))})
        for _ in range(rng.integers(2, 8)):
            w, h = rng.uniform(4, 30), rng.uniform(4, 30)
            dets.append({"image_id": image["id"], "category_id": cats[rng.integers(classes)]["id"],
                         "bbox": [rng.uniform(0, W - w), rng.uniform(0, H - h), w, h],
                         "score": float(rng.choice([rng.uniform(0, 1), 0.5, 1.0, 0.0]))})
    if with_masks:
        for det in dets:
            x, y, w, h = det["bbox"]
            mask = np.zeros((H, W), dtype=np.uint8)
            x0, y0 = int(x), int(y)
            mask[y0:int(math.ceil(y + h)), x0:int(math.ceil(x + w))] = 1
            mask[y0:y0 + max(1, int(h) // 3), x0:x0 + max(1, int(w) // 3)] = 0  # not a box
            rle = mask_utils.encode(np.asfortranarray(mask))
            det["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    return {"images": imgs, "annotations": anns, "categories": cats}, dets


def annotations_of(data, tmp_path, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return load_annotations(path)


def reference(data, dets, bins=10, iou=0.5, protocol="lvis", iou_type="bbox"):
    """Eq. 4 by plain loops over images, classes and detections (independent of the library)."""
    images = {img["id"]: img for img in data["images"]}
    thr = min(iou, 1 - 1e-10)

    def geometry(obj, is_gt):
        if iou_type == "bbox":
            return obj["bbox"]
        seg = obj["segmentation"]
        img = images[obj["image_id"]]
        if isinstance(seg, list):
            return mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
        return seg

    def overlap(d, g, crowd):
        return float(mask_utils.iou([geometry(d, False)], [geometry(g, True)], [int(crowd)])[0][0])

    outcome = []  # (category_id, score, correct)
    keys = {(d["image_id"], d["category_id"]) for d in dets}
    for image_id, cid in sorted(keys):
        img = images[image_id]
        group = sorted([d for d in dets if (d["image_id"], d["category_id"]) == (image_id, cid)],
                       key=lambda d: -d["score"])  # stable: ties keep input order
        gts = [a for a in data["annotations"] if a["image_id"] == image_id and a["category_id"] == cid]
        normal = [a for a in gts if not a.get("iscrowd", 0)]
        crowd = [a for a in gts if a.get("iscrowd", 0)] if protocol == "coco" else []
        if protocol == "lvis":
            verified = bool(gts) or cid in img.get("neg_category_ids", [])
            if not verified:
                continue
        taken = set()
        for d in group:
            best, best_iou = -1, thr
            for gi, g in enumerate(normal):
                if gi in taken:
                    continue
                v = overlap(d, g, False)
                if v < best_iou:
                    continue
                best, best_iou = gi, v
            if best >= 0:
                taken.add(best)
                outcome.append((cid, d["score"], 1))
                continue
            if protocol == "lvis" and cid in img.get("not_exhaustive_category_ids", []):
                continue
            if any(overlap(d, g, True) >= thr for g in crowd):
                continue
            outcome.append((cid, d["score"], 0))

    def binned(rows):
        cells = [[0, 0.0, 0.0] for _ in range(bins)]
        for _, score, ok in rows:
            b = min(int(math.floor(score * bins)), bins - 1)
            cells[b][0] += 1
            cells[b][1] += ok
            cells[b][2] += score
        return cells

    per_class = {}
    for cat in data["categories"]:
        rows = [r for r in outcome if r[0] == cat["id"]]
        cells = binned(rows)
        n = len(rows)
        delta = sum(c[0] / n * (c[1] / c[0] - c[2] / c[0]) for c in cells if c[0]) if n else 0.0
        per_class[str(cat["id"])] = {"delta": delta, "count": n, "cells": cells}
    cells = binned(outcome)
    ece = sum(c[0] / len(outcome) * abs(c[1] / c[0] - c[2] / c[0]) for c in cells if c[0]) if outcome else 0.0
    return per_class, ece, len(outcome)


def assert_matches_reference(result, ref):
    per_class, ece, judged = ref
    assert result["judged"] == judged
    assert result["ece"] == pytest.approx(ece, abs=1e-12)
    for cid, expected in per_class.items():
        got = result["per_class"][cid]
        assert got["count"] == expected["count"], cid
        assert got["raw_delta"] == pytest.approx(expected["delta"], abs=1e-12), cid
        for b, (count, correct, conf) in enumerate(expected["cells"]):
            cell = got["bins"][b]
            assert cell["count"] == count
            if count:
                assert cell["accuracy"] == pytest.approx(correct / count, abs=1e-12)
                assert cell["confidence"] == pytest.approx(conf / count, abs=1e-12)


# ------------------------------------------------------------------ CCECE against the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("protocol", ["lvis", "coco"])
def test_ccece_matches_plain_loop_reference(tmp_path, seed, protocol):
    data, dets = make_dataset(seed, protocol)
    ann = annotations_of(data, tmp_path)
    assert ann.protocol == protocol
    bins, iou = (10, 0.5) if seed % 2 == 0 else (7, 0.35)
    result = compute_calibration(dets, ann, bins=bins, iou=iou)
    assert_matches_reference(result, reference(data, dets, bins, iou, protocol))
    assert result["detections"] == len(dets)
    assert result["judged"] + result["unverified"] + result["ignored"] == len(dets)


def test_ccece_segm_matches_reference(tmp_path):
    data, dets = make_dataset(3, "lvis", with_masks=True)
    ann = annotations_of(data, tmp_path)
    result = compute_calibration(dets, ann, iou_type="segm")
    assert_matches_reference(result, reference(data, dets, protocol="lvis", iou_type="segm"))
    assert result["iou_type"] == "segm"
    assert result != compute_calibration(dets, ann, iou_type="bbox")  # the masks are not their boxes
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    from_file = calibration.calibrate_detections(read_results(path, ann), ann, iou_type="segm")
    assert from_file == result


def test_overconfident_class_has_negative_delta(tmp_path):
    """Ten detections at confidence 0.9, six of them correct: Delta = 0.6 - 0.9 = -0.3."""
    gts = [[2 + 6 * k, 2, 5, 5] for k in range(6)]
    data = {"images": [{"id": 1, "width": 64, "height": 16, "file_name": "a.png", "neg_category_ids": [],
                        "not_exhaustive_category_ids": []}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b,
                             "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3]]]}
                            for k, b in enumerate(gts)],
            "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]}
    ann = annotations_of(data, tmp_path)
    dets = [{"image_id": 1, "category_id": 1, "bbox": list(b), "score": 0.9} for b in gts]
    dets += [{"image_id": 1, "category_id": 1, "bbox": [40 + 5 * k, 8, 4, 4], "score": 0.9} for k in range(4)]
    result = compute_calibration(dets, ann)
    entry = result["per_class"]["1"]
    assert entry["count"] == 10 and entry["correct"] == 6 and entry["instances"] == 6
    assert entry["raw_delta"] == pytest.approx(-0.3)
    # the only class with instances: its group's pooled Δ is its own, so shrinking keeps it
    assert entry["delta"] == pytest.approx(-0.3) and entry["status"] == "shrunk"
    assert entry["bins"][9]["accuracy"] == pytest.approx(0.6) and entry["bins"][9]["confidence"] == pytest.approx(0.9)
    assert result["ece"] == pytest.approx(0.3)
    # no detection, no instance: unknown, and its group has no supported class: the overall pooled Δ
    assert result["per_class"]["2"] == {
        "delta": pytest.approx(-0.3), "raw_delta": 0.0, "status": "unknown", "weight": 0.0, "count": 0, "correct": 0,
        "instances": 0, "bins": [{"count": 0, "accuracy": 0.0, "confidence": 0.0}] * 10}
    assert result["groups"]["f"]["mean_delta"] == pytest.approx(-0.3)
    assert result["groups"]["r"]["classes_with_detections"] == 0
    # no judged detection in the rare group: no mean Δ and no ECE (null in the file, not 0.0)
    assert result["groups"]["r"]["mean_delta"] is None and result["groups"]["r"]["ece"] is None
    assert result["groups"]["f"]["ece"] == pytest.approx(0.3)
    assert result["reliability"][9] == {"lower": 0.9, "upper": 1.0, "count": 10, "accuracy": pytest.approx(0.6),
                                        "confidence": pytest.approx(0.9)}
    # the duplicate of a matched gt is a false positive: greedy by score, each gt matched once
    dup = dets + [{"image_id": 1, "category_id": 1, "bbox": list(gts[0]), "score": 0.1}]
    again = compute_calibration(dup, ann)["per_class"]["1"]
    assert again["count"] == 11 and again["bins"][1] == {"count": 1, "accuracy": 0.0, "confidence": 0.1}


def test_lvis_ignores_detections_of_unverified_classes(tmp_path):
    data, dets = make_dataset(11, "lvis")
    ann = annotations_of(data, tmp_path)
    base = compute_calibration(dets, ann)
    verified = {(img["id"], cid) for img in data["images"] for cid in img["neg_category_ids"]}
    verified |= {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    unverified = [(img["id"], cat["id"]) for img in data["images"] for cat in data["categories"]
                  if (img["id"], cat["id"]) not in verified]
    assert unverified
    extra = [{"image_id": i, "category_id": c, "bbox": [1, 1, 10, 10], "score": 0.99} for i, c in unverified]
    more = compute_calibration(dets + extra, ann)
    assert more["per_class"] == base["per_class"]
    assert more["ece"] == base["ece"]
    assert more["unverified"] == base["unverified"] + len(extra)
    # the same detections on a verified negative are judged (false positives)
    image = data["images"][0]
    if image["neg_category_ids"]:
        neg = [{"image_id": image["id"], "category_id": image["neg_category_ids"][0], "bbox": [1, 1, 10, 10],
                "score": 0.99}]
        judged = compute_calibration(dets + neg, ann)
        assert judged["judged"] == base["judged"] + 1


def test_empty_detections_give_all_zero_result(tmp_path):
    data, _ = make_dataset(0, "lvis")
    ann = annotations_of(data, tmp_path)
    result = compute_calibration([], ann)
    assert result["ece"] == 0 and result["judged"] == 0 and result["detections"] == 0
    assert all(v["delta"] == 0 and v["count"] == 0 for v in result["per_class"].values())
    assert all(g["count"] == 0 and g["mean_delta"] is None and g["ece"] is None for g in result["groups"].values())
    assert len(result["per_class"]) == len(data["categories"])
    json.dumps(result, allow_nan=False)


# ------------------------------------------------------------------ reading results files


def _dump_records(dets, order=("image_id", "category_id", "bbox", "score"), indent=None, extra=None):
    records = [{k: d[k] for k in order} | (extra(d) if extra else {}) for d in dets]
    return json.dumps(records, indent=indent)


@pytest.mark.parametrize("variant", ["plain", "reordered", "indented", "with_segmentation", "segmentation_first"])
def test_fast_reader_equals_json_path(tmp_path, variant):
    data, dets = make_dataset(5, "lvis", with_masks=True)
    ann = annotations_of(data, tmp_path)
    if variant == "plain":
        text = _dump_records(dets)
    elif variant == "reordered":
        text = _dump_records(dets, order=("score", "bbox", "category_id", "image_id"))
    elif variant == "indented":
        text = _dump_records(dets, indent=2)
    elif variant == "with_segmentation":
        text = json.dumps(dets)
    else:
        text = json.dumps([{"segmentation": d["segmentation"], **{k: v for k, v in d.items() if k != "segmentation"}}
                           for d in dets])
    path = tmp_path / "dets.json"
    path.write_text(text)
    assert box_columns(text.encode()) is not None  # the vectorised reader took it
    fast = read_results(path, ann, masks=False)
    slow = from_records(json.loads(text), ann, masks=False)
    for name in ("image_ids", "labels", "scores", "boxes"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert calibration.calibrate_detections(fast, ann) == compute_calibration(json.loads(text), ann)


@pytest.mark.parametrize("text", [
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3, 4], "score": 1e-05}]',     # exponent
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3, 4], "score": 0.5, "area": 12}]',  # extra key
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3, 4]}]',                      # missing key
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3], "score": 0.5}]',           # short box
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3, 4], "score": 0.5},'
    ' {"category_id": 10, "image_id": 100, "bbox": [1, 2, 3, 4], "score": 0.5}]',        # key order varies
    '[{"image_id": 100, "category_id": 10, "bbox": [1, 2, 3, 4], "score": 1.2.3}]',      # bad number
    '{"image_id": 100}',
])
def test_fast_reader_declines_what_it_cannot_prove(text):
    assert box_columns(text.encode()) is None


def test_fallback_reader_handles_exponents_and_extra_keys(tmp_path):
    data, dets = make_dataset(2, "lvis")
    ann = annotations_of(data, tmp_path)
    records = [dict(d, area=1.0) for d in dets]
    records[0]["score"] = 1e-05
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    got = read_results(path, ann, masks=False)
    assert got.scores[0] == 1e-05 and len(got) == len(dets)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("field,value,message", [
    ("image_id", 999, "unknown image id 999"),
    ("category_id", 11, "unknown category id 11"),
    ("score", 1.5, "outside [0, 1]"),
    ("score", float("nan"), "not a finite number"),
    ("bbox", [1, 2, -3, 4], "malformed bbox"),
])
def test_bad_records_are_named(tmp_path, fast, field, value, message):
    data, dets = make_dataset(1, "lvis")
    ann = annotations_of(data, tmp_path)
    dets[3][field] = value
    if not fast:
        for d in dets:
            d["area"] = 1.0  # an extra key: the json path
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(InputError) as info:
        read_results(path, ann, masks=False)
    assert message in str(info.value) and "[3]" in str(info.value)


def test_bbox_calibration_needs_boxes(tmp_path):
    data, dets = make_dataset(1, "lvis", with_masks=True)
    ann = annotations_of(data, tmp_path)
    del dets[2]["bbox"]
    with pytest.raises(InputError, match=r"needs 'bbox'"):
        compute_calibration(dets, ann)


# ------------------------------------------------------------------ Δ for Eq. 5 (the correction: test_pseudo_labels.py)


def test_load_delta(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"per_class": {"10": {"delta": -0.25}, "16": {"delta": 0.5}}}))
    assert load_delta(path, [16, 10, 13]).tolist() == [0.5, -0.25, 0.0]
    with pytest.raises(InputError, match="not one of"):
        load_delta(path, [10, 13])
    path.write_text(json.dumps({"per_class": {"10": {"delta": float("inf")}}}).replace("Infinity", "2"))
    with pytest.raises(InputError, match="in \\[-1, 1\\]"):
        load_delta(path, [10])
    path.write_text("[]")
    with pytest.raises(InputError, match="not a calibration file"):
        load_delta(path, [10])


# ------------------------------------------------------------------ the command


def test_cli_writes_calibration_and_refuses_bad_input(tmp_path, capsys):
    data, dets = make_dataset(4, "lvis")
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(data))
    det_path = tmp_path / "dets.json"
    det_path.write_text(json.dumps(dets))
    out = tmp_path / "cal.json"
    code, _ = run_cli(["calibrate", "--annotations", str(ann_path), "--detections", str(det_path), "--out", str(out),
                       "--bins", "5"], capsys)
    assert code == 0
    written = json.loads(out.read_text())
    expected = compute_calibration(dets, load_annotations(ann_path), bins=5)
    assert written["per_class"] == expected["per_class"] and written["bins"] == 5
    assert load_delta(out, [c["id"] for c in data["categories"]]).tolist() == pytest.approx(
        [expected["per_class"][str(c["id"])]["delta"] for c in data["categories"]])

    code, err = run_cli(["calibrate", "--annotations", str(ann_path), "--detections", str(det_path), "--out", str(out)],
                        capsys)
    assert code == 2 and "output exists" in err and len(err.splitlines()) == 1

    for field, value, message in (("category_id", 12345, "unknown category id 12345"),
                                   ("image_id", 4242, "unknown image id 4242"),
                                   ("score", float("nan"), "not a finite number"),
                                   ("score", -0.5, "outside [0, 1]")):
        bad = [dict(d) for d in dets]
        bad[1][field] = value
        det_path.write_text(json.dumps(bad))
        code, err = run_cli(["calibrate", "--annotations", str(ann_path), "--detections", str(det_path),
                             "--out", str(out), "--force"], capsys)
        assert code == 2 and message in err and "[1]" in err and len(err.splitlines()) == 1, err

    det_path.write_text("[]")
    code, err = run_cli(["calibrate", "--annotations", str(ann_path), "--detections", str(det_path), "--out", str(out),
                         "--force"], capsys)
    assert code == 0 and "no detections" in err and "mean Delta r n/a / c n/a / f n/a" in err
    assert json.loads(out.read_text())["ece"] == 0

    code, err = run_cli(["calibrate", "--annotations", str(ann_path), "--out", str(out), "--force"], capsys)
    assert code == 2 and "exactly one of" in err and len(err.splitlines()) == 1
    det_path.write_text("{not json")
    code, err = run_cli(["calibrate", "--annotations", str(ann_path), "--detections", str(det_path), "--out", str(out),
                         "--force"], capsys)
    assert code == 2 and "malformed json" in err and len(err.splitlines()) == 1


def test_cli_runs_a_detector_checkpoint(tmp_path, capsys):
    from slsd_cli.model import weights
    from slsd_cli.inference import sharded as inference
    from slsd_cli.data.synthetic import generate
    from slsd_cli.model.model_config import tiny_cnn_config

    synth = tmp_path / "synth"
    generate(synth, classes=4, train_images=255, val_images=6, pool_images=1, image_size=64, seed=1)
    ann = load_annotations(synth / "val.json")
    torch.manual_seed(0)
    cfg = tiny_cnn_config(image_size=64, test_score_threshold=0.0, max_detections=20)
    weights.save_detector(weights.build_detector(cfg, ann.categories), tmp_path / "run", ann.categories, cfg)
    out = tmp_path / "cal.json"
    code, err = run_cli(["calibrate", "--annotations", str(synth / "val.json"), "--checkpoint", str(tmp_path / "run"),
                         "--images", str(synth / "images"), "--out", str(out), "--bins", "4"], capsys)
    assert code == 0, err
    written = json.loads(out.read_text())
    results = inference.predict_results(tmp_path / "run", ann, synth / "images", batch_size=2)
    assert "inference 6/6 (100%)" in capsys.readouterr().err  # stderr is not a terminal: a progress line
    assert written["detections"] == len(results) > 0
    assert written["per_class"] == compute_calibration(results, ann, bins=4)["per_class"]
    code, err = run_cli(["calibrate", "--annotations", str(synth / "val.json"), "--checkpoint", str(tmp_path / "run"),
                         "--out", str(out), "--force"], capsys)
    assert code == 2 and "--images" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ Δ where it can be measured (issue 23)


def _one_image_set(tmp_path, classes: dict[int, str], gts: dict[int, int], dets: list[tuple[int, bool, float]]):
    """One wide image; `gts[c]` ground-truth boxes of class c in a row; `dets`: (class, on a gt of
    its class?, score) — a detection on a gt takes the next free one, else an empty spot."""
    boxes, anns = {}, []
    for c, n in gts.items():
        boxes[c] = [[2 + 8 * len(anns) + 8 * k, 2, 5, 5] for k in range(n)]
        anns += [{"id": len(anns) + 1 + k, "image_id": 1, "category_id": c, "bbox": b, "area": 25.0,
                  "segmentation": [[b[0], b[1], b[0] + 5, b[1], b[0] + 5, b[1] + 5, b[0], b[1] + 5]]}
                 for k, b in enumerate(boxes[c])]
    width = 8 * (len(anns) + len(dets)) + 8
    data = {"images": [{"id": 1, "width": width, "height": 40, "file_name": "a.png",
                        "neg_category_ids": [c for c in classes if not gts.get(c)], "not_exhaustive_category_ids": []}],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}", "frequency": g} for c, g in classes.items()]}
    taken = {c: 0 for c in classes}
    records = []
    for j, (c, on_gt, score) in enumerate(dets):
        if on_gt:
            box = boxes[c][taken[c]]
            taken[c] += 1
        else:
            box = [2 + 8 * j, 20, 5, 5]  # below the row of objects: matches nothing
        records.append({"image_id": 1, "category_id": c, "bbox": box, "score": score})
    return annotations_of(data, tmp_path), records


def test_class_without_positive_is_not_over_confident_by_default(tmp_path):
    """Acceptance (issue 23): a class with detections but no ground truth in the calibration data has
    Eq. 4 Δ = -(mean score); the default estimator reports it unknown, with its group's Δ."""
    classes = {1: "f", 2: "r", 3: "r"}
    dets = [(1, True, 0.5), (1, True, 0.5), (1, False, 0.5), (1, False, 0.5)]   # f: precision 0.5 at 0.5
    dets += [(2, True, 0.5), (2, False, 0.5)]                                     # r: calibrated, 1 instance
    dets += [(3, False, 0.6)] * 5                                                 # r: no instance at all
    ann, records = _one_image_set(tmp_path, classes, {1: 2, 2: 1}, dets)
    result = compute_calibration(records, ann)
    absent = result["per_class"]["3"]
    assert absent["raw_delta"] == pytest.approx(-0.6) and absent["count"] == 5 and absent["instances"] == 0
    assert absent["status"] == "unknown" and absent["weight"] == 0.0
    assert absent["delta"] == pytest.approx(0.0) == result["groups"]["r"]["prior"]  # class 2's Δ, not -0.6
    assert result["groups"]["r"]["mean_delta"] == pytest.approx(0.0)  # over its supported class only
    assert result["groups"]["r"]["mean_raw_delta"] == pytest.approx(-0.3)
    assert result["groups"]["r"]["unknown"] == 1 and result["groups"]["r"]["shrunk"] == 1
    # the literal reading, kept as an option, is what the default avoids
    raw = compute_calibration(records, ann, estimator=DeltaEstimator("raw"))
    assert raw["per_class"]["3"]["delta"] == pytest.approx(-0.6) and raw["estimator"] == {"name": "raw"}
    # alone in the data: no class has support, nothing is known, Δ = 0
    only, records = _one_image_set(tmp_path, {3: "r", 4: "f"}, {4: 1}, [(3, False, 0.7)] * 3)
    assert compute_calibration(records, only)["per_class"]["3"]["delta"] == 0.0


def test_under_confident_rare_class_gets_positive_delta(tmp_path):
    """Acceptance (issue 23): a rare class scored below its precision has Δ̂ > 0 by default, even
    next to an over-confident rare class; Δ̂ lies between its own Δ and its group's."""
    classes = {1: "f", 2: "r", 3: "r"}
    dets = [(1, True, 0.9)] * 3 + [(1, False, 0.9)] * 3       # f: over-confident, Δ = 0.5 - 0.9
    dets += [(2, True, 0.3)] * 4 + [(2, False, 0.2)]          # r: precision 0.8 at mean score 0.28
    dets += [(3, True, 0.9), (3, False, 0.9)]                 # r: over-confident, 1 instance
    ann, records = _one_image_set(tmp_path, classes, {1: 3, 2: 4, 3: 1}, dets)
    result = compute_calibration(records, ann)
    under = result["per_class"]["2"]
    assert under["raw_delta"] == pytest.approx(0.8 - 0.28)
    prior = result["groups"]["r"]["prior"]
    k, counted = result["estimator"]["k"], result["estimator"]["support"]
    n2, n3 = (4, 1) if counted == "instances" else (5, 2)  # class 2's and class 3's support
    assert prior == pytest.approx((n2 * 0.52 + n3 * (0.5 - 0.9)) / (n2 + n3))
    assert under["delta"] == pytest.approx((n2 * 0.52 + k * prior) / (n2 + k))
    assert under["delta"] > 0 and prior < under["delta"] < under["raw_delta"]
    assert result["per_class"]["1"]["delta"] < 0  # the frequent class stays over-confident


def test_delta_estimator_rules():
    support = ClassSupport(detections=np.array([10.0, 4.0, 6.0, 0.0, 8.0]), correct=np.array([2.0, 4.0, 0.0, 0.0, 4.0]),
                           score_sum=np.array([8.0, 1.0, 3.0, 0.0, 4.0]), instances=np.array([5.0, 4.0, 0.0, 3.0, 2.0]))
    groups = ["f", "r", "r", "r", "c"]
    raw = support.raw_delta()
    assert raw.tolist() == pytest.approx([-0.6, 0.75, -0.5, 0.0, 0.0])
    est = estimate_delta(support, groups, DeltaEstimator("shrink", k=2.0, support="instances"))
    assert est.status == ["shrunk", "shrunk", "unknown", "unknown", "shrunk"]  # no instance / no detection: unknown
    assert est.support.tolist() == [5.0, 4.0, 0.0, 0.0, 2.0]
    assert est.priors == {"r": pytest.approx(0.75), "c": pytest.approx(0.0), "f": pytest.approx(-0.6)}
    assert est.delta.tolist() == pytest.approx([-0.6, 0.75, 0.75, 0.75, 0.0])  # each class alone in its group
    est = estimate_delta(support, ["r", "r", "r", "r", "r"], DeltaEstimator("shrink", k=2.0, support="instances"))
    prior = (5 * -0.6 + 4 * 0.75 + 2 * 0.0) / 11
    assert est.delta.tolist() == pytest.approx([(5 * -0.6 + 2 * prior) / 7, (4 * 0.75 + 2 * prior) / 6, prior, prior,
                                                (2 * prior) / 4])
    assert est.weight.tolist() == pytest.approx([5 / 7, 4 / 6, 0, 0, 2 / 4])
    by_dets = estimate_delta(support, ["r"] * 5, DeltaEstimator("shrink", k=2.0, support="detections"))
    assert by_dets.support.tolist() == [10.0, 4.0, 0.0, 0.0, 8.0]  # detections, but still 0 without instances
    keep = estimate_delta(support, ["r"] * 5, DeltaEstimator("shrink", k=0.0))
    assert keep.status[:2] == ["estimated", "estimated"] and keep.delta[:2].tolist() == pytest.approx([-0.6, 0.75])
    literal = estimate_delta(support, groups, DeltaEstimator("raw"))
    assert literal.delta.tolist() == pytest.approx(raw.tolist()) and literal.status[3] == "unknown"
    for bad in (dict(name="mean"), dict(k=-1.0), dict(k=float("inf")), dict(support="images")):
        with pytest.raises(InputError):
            DeltaEstimator(**bad)


def test_class_support_weighs_images(tmp_path):
    data, dets = make_dataset(7, "lvis")
    ann = annotations_of(data, tmp_path)
    gt = matching.ground_truth(ann, ann.protocol)
    judged = calibration.judge_detections(from_records(dets, ann), gt)
    plain = calibration.class_support(judged, gt)
    ones = calibration.class_support(judged, gt, np.ones(len(ann.images)))
    assert all(np.array_equal(getattr(plain, f), getattr(ones, f)) for f in ("detections", "correct", "instances"))
    weights = np.zeros(len(ann.images))
    weights[0] = 2.0
    first = calibration.class_support(judged, gt, weights)
    image0 = judged.image_index == 0
    assert first.detections.sum() == 2 * image0.sum() and first.correct.sum() == 2 * judged.correct[image0].sum()
    assert first.instances.sum() == 2 * len(ann.anns_by_image.get(ann.image_ids[0], []))
    result = compute_calibration(dets, ann)
    assert [v["instances"] for v in result["per_class"].values()] == plain.instances.tolist()
    assert plain.raw_delta() == pytest.approx([v["raw_delta"] for v in result["per_class"].values()], abs=1e-12)


def test_cli_estimator_options(tmp_path, capsys):
    data, dets = make_dataset(4, "lvis")
    ann_path, det_path, out = tmp_path / "ann.json", tmp_path / "dets.json", tmp_path / "cal.json"
    ann_path.write_text(json.dumps(data))
    det_path.write_text(json.dumps(dets))
    base = ["calibrate", "--annotations", str(ann_path), "--detections", str(det_path), "--out", str(out), "--force"]
    code, err = run_cli(base + ["--estimator", "raw"], capsys)
    assert code == 0 and "raw Eq. 4" in " ".join(err.split())  # (stderr lines wrap)
    written = json.loads(out.read_text())
    assert all(v["delta"] == v["raw_delta"] for v in written["per_class"].values())
    code, err = run_cli(base + ["--shrink-k", "3", "--shrink-support", "detections"], capsys)
    assert code == 0 and "shrink k=3 on detections" in " ".join(err.split())
    assert json.loads(out.read_text())["estimator"] == {"name": "shrink", "k": 3.0, "support": "detections"}
    for bad, needle in ((["--estimator", "mean"], "--estimator"), (["--shrink-support", "images"], "--shrink-support"),
                        (["--shrink-k", "-1"], "--shrink-k")):
        code, err = run_cli(base + bad, capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_readers_take_new_and_old_calibration_files(tmp_path):
    """load_delta (Eq. 5), plot reliability's reader and the demo's summary read this version's file
    and one written before the support fields existed (per class only delta, count, bins)."""
    from slsd_cli import plots
    from slsd_cli.demo.diagnostics import calibration_summary

    data, dets = make_dataset(6, "lvis")
    ann = annotations_of(data, tmp_path)
    new = compute_calibration(dets, ann)
    old = {k: v for k, v in new.items() if k != "estimator"}
    old["per_class"] = {cid: {"delta": v["raw_delta"], "count": v["count"], "bins": v["bins"]}
                        for cid, v in new["per_class"].items()}
    old["groups"] = {g: {k: v[k] for k in ("classes", "classes_with_detections", "count", "ece")}
                     | {"mean_delta": v["mean_raw_delta"]} for g, v in new["groups"].items()}
    ids = ann.category_ids
    for name, content in (("new.json", new), ("old.json", old)):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        assert load_delta(path, ids).tolist() == pytest.approx([content["per_class"][str(c)]["delta"] for c in ids])
        read = plots.read_calibration(path)
        assert read.counts.tolist() == [b["count"] for b in new["reliability"]] and read.ece == new["ece"]
        assert [plots.group_ece_text(read.groups[g]) for g in "rcf"] == \
               [plots.group_ece_text(new["groups"][g]) for g in "rcf"]
        summary = calibration_summary(path)
        assert summary["ece"] == new["ece"]
        for g in "rcf":  # the summary reads mean_delta: Δ̂'s mean in the new file, Eq. 4's in the old one
            want = content["groups"][g]["mean_delta"]
            if want is None:
                assert math.isnan(summary[f"delta_{g}"])
            else:
                assert summary[f"delta_{g}"] == pytest.approx(want)
