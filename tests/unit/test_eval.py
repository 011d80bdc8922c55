"""slsd eval: exactness against the official evaluators (lvis-api's LVISEval, pycocotools'
COCOeval), the protocol details they encode, and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lvis_reference import lvis_api  # benchmarks/lvis_reference.py (pytest's pythonpath)
from slsd_cli.evaluation import metrics as evaluation
from slsd_cli.data import results as results_file
from slsd_cli.cli import main
from slsd_cli.data.lvis import load_annotations

FREQUENCIES = ["r"] * 6 + ["c"] * 7 + ["f"] * 7  # 20 categories


def _polygon(rng, x, y, w, h, n=10):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)
    r = rng.uniform(0.75, 1.0, n)
    px = x + w / 2 + (w / 2) * r * np.cos(t)
    py = y + h / 2 + (h / 2) * r * np.sin(t)
    return np.stack([px, py], 1).ravel().round(2).tolist()


def _rle(poly, h, w):
    rle = mask_utils.frPyObjects([poly], h, w)[0]
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def make_problem(seed: int, protocol: str, num_images: int = 36, num_cats: int = 20, dets_per_image=(5, 45)):
    """A noisy LVIS- or COCO-format problem: polygons of all sizes, federated image lists (LVIS) or
    crowd regions (COCO), and detections that are jittered ground truth (some mislabelled), random
    false positives (some on unverified classes), tied scores and more than the cap on some images."""
    rng = np.random.default_rng(seed)
    cat_ids = [3 * k + 2 for k in range(num_cats)]  # non-contiguous ids
    categories = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    if protocol == "lvis":
        for c, f in zip(categories, FREQUENCIES):
            c["frequency"] = f
    images, anns, dets = [], [], []
    for i in range(num_images):
        image_id = 100 + 7 * i
        h, w = int(rng.integers(90, 260)), int(rng.integers(90, 260))
        pos = [int(c) for c in rng.choice(cat_ids, size=int(rng.integers(1, 5)), replace=False)]
        img = {"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.png"}
        if protocol == "lvis":
            others = [c for c in cat_ids if c not in pos]
            img["neg_category_ids"] = [int(c) for c in rng.choice(others, size=3, replace=False)]
            img["not_exhaustive_category_ids"] = [c for c in pos if rng.random() < 0.3]
        images.append(img)
        gts = []
        for c in pos:
            for _ in range(int(rng.integers(1, 4))):
                bw = float(np.exp(rng.uniform(np.log(5), np.log(0.8 * w))))
                bh = float(np.exp(rng.uniform(np.log(5), np.log(0.8 * h))))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                poly = _polygon(rng, x, y, bw, bh)
                rle = mask_utils.frPyObjects([poly], h, w)[0]
                box = [float(v) for v in mask_utils.toBbox(rle)]
                if box[2] <= 0 or box[3] <= 0:
                    continue
                ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": box,
                       "segmentation": [poly], "area": float(mask_utils.area(rle))}
                if protocol == "coco":
                    ann["iscrowd"] = 0
                    if rng.random() < 0.08:  # a crowd region, as COCO stores it (uncompressed RLE)
                        m = mask_utils.decode(rle)
                        ann["iscrowd"] = 1
                        ann["segmentation"] = {"size": [h, w], "counts": _uncompressed(m)}
                anns.append(ann)
                gts.append((c, x, y, bw, bh))
        verified = pos + (img.get("neg_category_ids", []) if protocol == "lvis" else [])
        for k in range(int(rng.integers(*dets_per_image))):
            if gts and k < 2 * len(gts):
                c, x, y, bw, bh = gts[k % len(gts)]
                if rng.random() < 0.1:
                    c = int(rng.choice(cat_ids))
                j = rng.normal(0, 0.12, 4)
                x, y, bw, bh = x + j[0] * bw, y + j[1] * bh, bw * np.exp(j[2]), bh * np.exp(j[3])
                score = rng.uniform(0.3, 1.0)
            else:
                c = int(rng.choice(verified)) if rng.random() < 0.7 else int(rng.choice(cat_ids))
                bw = float(np.exp(rng.uniform(np.log(4), np.log(0.8 * w))))
                bh = float(np.exp(rng.uniform(np.log(4), np.log(0.8 * h))))
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                score = rng.uniform(0.0, 0.8)
            x, y = float(np.clip(x, 0, w - 2)), float(np.clip(y, 0, h - 2))
            bw, bh = float(min(bw, w - x)), float(min(bh, h - y))
            score = round(float(score), 2)  # coarse scores: many ties
            box = [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]
            dets.append({"image_id": image_id, "category_id": int(c), "bbox": box, "score": score,
                         "segmentation": _rle(_polygon(rng, x, y, bw, bh), h, w)})
    perm = rng.permutation(len(dets))  # results files need not be grouped by image
    dets = [dets[i] for i in perm]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def _write(tmp: Path, name: str, obj) -> Path:
    path = tmp / name
    path.write_text(json.dumps(obj))
    return path


def _reference_input(dets: list[dict], iou_type: str) -> list[dict]:
    """What the official tools are given: for segm, results without `bbox` (as detectron2 passes
    them), so a detection's area is its mask's area — the convention slsd follows."""
    out = copy.deepcopy(dets)
    if iou_type == "segm":
        for d in out:
            d.pop("bbox")
    else:
        for d in out:
            d.pop("segmentation")
    return out


@pytest.fixture(scope="module")
def lvis_problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lvis")
    gt, dets = make_problem(0, "lvis")
    return _write(tmp, "gt.json", gt), _write(tmp, "dt.json", dets), gt, dets


@pytest.fixture(scope="module")
def coco_problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    gt, dets = make_problem(1, "coco")
    return _write(tmp, "gt.json", gt), _write(tmp, "dt.json", dets), gt, dets


@pytest.mark.parametrize("max_dets", [300, 12])
def test_lvis_equals_lvis_api(lvis_problem, max_dets):
    gt_path, dt_path, gt, dets = lvis_problem
    lvis = lvis_api()
    ann = load_annotations(gt_path)
    assert ann.protocol == "lvis"
    ours = evaluation.evaluate(ann, results_file.read_results(dt_path, ann), max_dets=max_dets)
    if max_dets == 12:
        assert ours["num_detections_over_max_dets"] > 0  # the per-image cap is exercised
    lvis_gt = lvis.LVIS(str(gt_path))
    for iou_type in ("bbox", "segm"):
        results = lvis.LVISResults(lvis_gt, _reference_input(dets, iou_type), max_dets=max_dets)
        ref = lvis.LVISEval(lvis_gt, results, iou_type)
        ref.params.max_dets = max_dets
        ref.run()
        ref_results = dict(ref.get_results())
        for key in evaluation.summary_keys("lvis", max_dets):
            assert ours[iou_type][key] == pytest.approx(ref_results[key], abs=1e-6), (iou_type, key)
        assert all(ours[iou_type][k] > 0 for k in ("AP", "APr", "APc", "APf"))
        precision = ref.eval["precision"]
        for k, cid in enumerate(ann.category_ids):
            s = precision[:, :, k, 0]
            expected = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
            assert ours[iou_type]["per_class"][str(cid)] == pytest.approx(expected, abs=1e-9)


def test_coco_equals_pycocotools(coco_problem):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path, dt_path, gt, dets = coco_problem
    ann = load_annotations(gt_path)
    assert ann.protocol == "coco"
    assert any(a.get("iscrowd") for a in gt["annotations"])
    ours = evaluation.evaluate(ann, results_file.read_results(dt_path, ann), max_dets=100)
    assert "APr" not in ours["bbox"]
    coco_gt = COCO(str(gt_path))
    for iou_type in ("bbox", "segm"):
        ref = COCOeval(coco_gt, coco_gt.loadRes(_reference_input(dets, iou_type)), iou_type)
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
        for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
            assert ours[iou_type][key] == pytest.approx(ref.stats[i], abs=1e-6), (iou_type, key)
        assert ours[iou_type]["AR@100"] == pytest.approx(ref.stats[8], abs=1e-6)
        precision = ref.eval["precision"]
        for k, cid in enumerate(ann.category_ids):
            s = precision[:, :, k, 0, -1]
            expected = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
            assert ours[iou_type]["per_class"][str(cid)] == pytest.approx(expected, abs=1e-9)


def test_coco_max_dets_is_per_image_and_class(coco_problem):
    """COCO's maxDets caps each (image, category), not the image: compare with COCOeval at [1, 10, 3]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path, dt_path, gt, dets = coco_problem
    ann = load_annotations(gt_path)
    ours = evaluation.evaluate(ann, results_file.read_results(dt_path, ann), max_dets=3, iou_types=["bbox"])
    coco_gt = COCO(str(gt_path))
    ref = COCOeval(coco_gt, coco_gt.loadRes(_reference_input(dets, "bbox")), "bbox")
    ref.params.maxDets = [1, 3, 10]
    ref.evaluate()
    ref.accumulate()
    s = ref.eval["precision"][:, :, :, 0, 1]
    assert ours["bbox"]["AP"] == pytest.approx(float(np.mean(s[s > -1])), abs=1e-6)
    r = ref.eval["recall"][:, :, 0, 1]
    assert ours["bbox"]["AR@3"] == pytest.approx(float(np.mean(r[r > -1])), abs=1e-6)


def test_per_image_cap_matches_lvis_results():
    """Top-k per image by score, ties kept in input order — LVISResults.limit_dets_per_image."""
    image_ids = np.array([1, 2, 1, 1, 2, 1, 1])
    scores = np.array([0.5, 0.9, 0.7, 0.5, 0.1, 0.5, 0.9])
    # image 1 keeps 0.9 (#6), 0.7 (#2) and the first 0.5 (#0); image 2 keeps both
    assert evaluation.limit_per_image(image_ids, scores, 3).tolist() == [0, 1, 2, 4, 6]
    lvis = lvis_api()
    rng = np.random.default_rng(0)
    anns = [{"id": i, "image_id": int(rng.integers(0, 5)), "score": float(rng.integers(0, 6)) / 5}
            for i in range(200)]
    ref = lvis.LVISResults.limit_dets_per_image(None, anns, 17)
    kept = evaluation.limit_per_image(np.array([a["image_id"] for a in anns]), np.array([a["score"] for a in anns]), 17)
    assert sorted(a["id"] for a in ref) == kept.tolist()


def _perfect(gt: dict) -> list[dict]:
    heights = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    out = []
    for i, a in enumerate(gt["annotations"]):
        if a.get("iscrowd"):
            continue
        h, w = heights[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                    "score": 1.0 - 0.001 * (i % 7),
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    return out


@pytest.mark.parametrize("protocol", ["lvis", "coco"])
def test_perfect_detections_give_one(tmp_path, protocol, lvis_problem, coco_problem):
    gt = (lvis_problem if protocol == "lvis" else coco_problem)[2]
    gt_path = _write(tmp_path, "gt.json", gt)
    dt_path = _write(tmp_path, "dt.json", _perfect(gt))
    assert main(["eval", "--annotations", str(gt_path), "--detections", str(dt_path),
                 "--out-dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["protocol"] == protocol
    for iou_type in ("bbox", "segm"):
        for key in evaluation.summary_keys(protocol, 300):
            value = metrics[iou_type][key]
            assert value == -1 or value == pytest.approx(1.0, abs=1e-12), (iou_type, key)
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        defined = [v for v in metrics[iou_type]["per_class"].values() if v != -1]
        assert defined and all(v == pytest.approx(1.0) for v in defined)
    assert not (tmp_path / "out" / "detections.json").exists()  # the input is read in place, not copied


def test_no_detections_zero_metrics_and_warning(tmp_path, lvis_problem, capsys):
    gt_path = lvis_problem[0]
    dt_path = _write(tmp_path, "dt.json", [])
    assert main(["eval", "--annotations", str(gt_path), "--detections", str(dt_path),
                 "--out-dir", str(tmp_path / "out")]) == 0
    assert "no detections" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_detections"] == 0
    for iou_type in ("bbox", "segm"):
        values = [metrics[iou_type][k] for k in evaluation.summary_keys("lvis", 300)]
        assert all(v in (0.0, -1.0) for v in values) and metrics[iou_type]["AP"] == 0.0
        assert set(metrics[iou_type]["per_class"].values()) <= {0.0, -1.0}


def test_output_needs_force_and_protocol_override(tmp_path, lvis_problem):
    gt_path, dt_path = lvis_problem[:2]
    args = ["eval", "--annotations", str(gt_path), "--detections", str(dt_path), "--out-dir", str(tmp_path),
            "--iou-type", "bbox"]
    assert main(args) == 0
    assert main(args) == 2  # outputs exist
    assert main(args + ["--force", "--protocol", "coco", "--max-dets", "100"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"] == "coco" and "segm" not in metrics and "APr" not in metrics["bbox"]


BAD_CASES = [
    ("unknown-image", lambda d: d[3].update(image_id=99999), "[3]", "unknown image id"),
    ("unknown-category", lambda d: d[4].update(category_id=1), "[4]", "unknown category id"),
    ("nan-score", lambda d: d[5].update(score=float("nan")), "[5]", "score"),
    ("short-box", lambda d: d[6].update(bbox=[1, 2, 3]), "[6]", "bbox"),
    ("negative-box", lambda d: d[7].update(bbox=[1, 2, -3, 4]), "[7]", "bbox"),
    ("garbage-rle", lambda d: d[8]["segmentation"].update(counts="0" + d[8]["segmentation"]["counts"]),
     "[8]", "malformed RLE"),
    ("truncated-rle", lambda d: d[9]["segmentation"].update(counts=d[9]["segmentation"]["counts"][:-2]),
     "[9]", "malformed RLE"),
    ("rle-size", lambda d: d[10]["segmentation"].update(size=[3, 3]), "[10]", "RLE size"),
    ("missing-mask", lambda d: d[11].pop("segmentation"), "[11]", "segmentation"),
]


@pytest.mark.parametrize("case, mutate, record, words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_detections_exit_2_with_one_line(tmp_path, lvis_problem, capsys, case, mutate, record, words):
    gt_path, _, _, dets = lvis_problem
    bad = copy.deepcopy(dets[:40])
    mutate(bad)
    dt_path = tmp_path / "dt.json"
    dt_path.write_text(json.dumps(bad))  # NaN is written as the NaN literal, as json.dumps does
    args = ["eval", "--annotations", str(gt_path), "--detections", str(dt_path), "--out-dir", str(tmp_path / "o")]
    if case == "missing-mask":
        args += ["--iou-type", "bbox,segm"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(dt_path) in err and record in err and words in err, err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_uncompressed_rle_detections_are_accepted(tmp_path, lvis_problem):
    gt_path, _, _, dets = lvis_problem
    ann = load_annotations(gt_path)
    some = copy.deepcopy(dets[:30])
    h, w = some[0]["segmentation"]["size"]
    mask = mask_utils.decode(some[0]["segmentation"])
    some[0]["segmentation"] = {"size": [h, w], "counts": _uncompressed(mask)}
    loaded = results_file.read_results(_write(tmp_path, "dt.json", some), ann)
    assert loaded.segmentations[0]["counts"] == dets[0]["segmentation"]["counts"]


def test_rle_string_check_agrees_with_a_reference_decoder():
    """The vectorised RLE check accepts every pycocotools encoding and rejects exactly the strings
    a literal port of rleFrString decodes to negative runs or a wrong total."""
    rng = np.random.default_rng(3)
    good, areas = [], []
    for i in range(200):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8) if i % 5 else np.full((h, w), i % 2, np.uint8)
        good.append(mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii"))
        areas.append(h * w)
    assert results_file._bad_rle_strings(good, np.array(areas)).size == 0

    def decode(s):
        counts, p = [], 0
        while p < len(s):
            x, k, more = 0, 0, 1
            while more:
                if p >= len(s):
                    return None
                c = ord(s[p]) - 48
                x |= (c & 0x1F) << 5 * k
                more = c & 0x20
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << 5 * k
            if k > 7:  # more than 35 bits: no 32-bit run length is written so
                return None
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
        return counts

    garbage = ["".join(chr(48 + int(v)) for v in rng.integers(0, 64, int(rng.integers(1, 9)))) for _ in range(3000)]
    decoded = [decode(g) for g in garbage]
    totals = np.array([sum(c) if c is not None and min(c) >= 0 else 7 for c in decoded])
    expected = {i for i, c in enumerate(decoded) if c is None or min(c) < 0}
    assert set(results_file._bad_rle_strings(garbage, totals).tolist()) == expected
    assert set(results_file._bad_rle_strings(garbage, totals + 1).tolist()) == set(range(len(garbage)))
    assert results_file._bad_rle_strings(["", "é"], np.array([0, 0])).size >= 1
