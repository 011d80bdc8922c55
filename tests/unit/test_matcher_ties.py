"""A matcher tie: one detection at exactly the same IoU with two ground truths of its class.

pycocotools and lvis-api give a tie to the ground truth that comes last (their loop replaces the
best match on `>=`), which decides what is left for the next detection. Here detection 1 has
IoU 9/11 with both A and B; detection 2 overlaps B at 9/11 and A at 7/13. Under the official rule
detection 1 takes B and detection 2 falls back to A, matched only up to IoU 0.5; had the tie gone
to A, detection 2 would take B and be matched up to 0.8. AP, AP75 and every per-class value differ
between the two readings, so the test pins the official one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lvis_reference import lvis_api  # benchmarks/lvis_reference.py (pytest's pythonpath)
from slsd_cli.data.lvis import load_annotations
from slsd_cli.data.results import read_results
from slsd_cli.evaluation import metrics as evaluation

H, W = 20, 30
GT_BOXES = [[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 10.0, 10.0]]     # A, then B (xywh)
DET_BOXES = [[1.0, 0.0, 10.0, 10.0], [3.0, 0.0, 10.0, 10.0]]    # tie A/B, then mostly B
CATEGORY = 7


def _rectangle(box: list[float]) -> list[list[float]]:
    x, y, w, h = box
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _rle(box: list[float]) -> dict:
    from pycocotools import mask as mask_utils

    m = np.zeros((H, W), dtype=np.uint8)
    x, y, w, h = (int(v) for v in box)
    m[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _problem(protocol: str) -> tuple[dict, list[dict]]:
    image = {"id": 1, "height": H, "width": W, "file_name": "1.png"}
    category = {"id": CATEGORY, "name": "thing"}
    if protocol == "lvis":
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        category["frequency"] = "f"
    anns = []
    for i, box in enumerate(GT_BOXES):
        ann = {"id": i + 1, "image_id": 1, "category_id": CATEGORY, "bbox": box, "area": box[2] * box[3],
               "segmentation": _rectangle(box)}
        if protocol == "coco":
            ann["iscrowd"] = 0
        anns.append(ann)
    dets = [{"image_id": 1, "category_id": CATEGORY, "bbox": box, "score": score, "segmentation": _rle(box)}
            for box, score in zip(DET_BOXES, (0.9, 0.8))]
    return {"images": [image], "annotations": anns, "categories": [category]}, dets


def _reference(protocol: str, gt_path, dets: list[dict], iou_type: str) -> tuple[dict, np.ndarray]:
    """(summary, precision [T, R] of the class) of the official tool."""
    given = [{k: v for k, v in d.items() if k != ("bbox" if iou_type == "segm" else "segmentation")} for d in dets]
    if protocol == "coco":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        coco = COCO(str(gt_path))
        ref = COCOeval(coco, coco.loadRes(given), iou_type)
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
        return {"AP": ref.stats[0], "AP50": ref.stats[1], "AP75": ref.stats[2]}, ref.eval["precision"][:, :, 0, 0, -1]
    lvis = lvis_api()
    lvis_gt = lvis.LVIS(str(gt_path))
    ref = lvis.LVISEval(lvis_gt, lvis.LVISResults(lvis_gt, given), iou_type)
    ref.run()
    return dict(ref.get_results()), ref.eval["precision"][:, :, 0, 0]


@pytest.mark.parametrize("protocol", ["coco", "lvis"])
def test_a_tie_goes_where_the_official_tools_send_it(tmp_path, protocol):
    gt, dets = _problem(protocol)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    annotations = load_annotations(gt_path)
    ours = evaluation.evaluate(annotations, read_results(tmp_path / "dt.json", annotations), max_dets=100)
    for iou_type in ("bbox", "segm"):
        summary, precision = _reference(protocol, gt_path, dets, iou_type)
        for key in ("AP", "AP50", "AP75"):
            assert ours[iou_type][key] == pytest.approx(summary[key], abs=1e-12), (iou_type, key)
        s = precision[precision > -1]
        assert ours[iou_type]["per_class"][str(CATEGORY)] == pytest.approx(float(np.mean(s)), abs=1e-12)
        # the case decides something: at IoU 0.75 only detection 1 is a true positive (official rule);
        # the other reading of the tie would match both detections up to IoU 0.8
        assert ours[iou_type]["AP50"] == pytest.approx(1.0)
        assert ours[iou_type]["AP75"] == pytest.approx(0.5, abs=0.01)


def test_calibrate_judges_the_tie_the_same_way_at_its_iou(tmp_path):
    """`slsd calibrate` uses the same matcher at one IoU (`--iou`): at 0.5 both detections are
    correct; at 0.6 detection 2 (left with A, IoU 7/13) is not, which it would be had the tie gone
    to A. The file records the IoU it judged at."""
    from slsd_cli.labels.calibration import compute_calibration

    gt, dets = _problem("lvis")
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    annotations = load_annotations(gt_path)
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    for iou, accuracy_of_det2 in ((0.5, 1.0), (0.6, 0.0)):
        result = compute_calibration(boxes_only, annotations, bins=10, iou=iou)
        assert result["iou"] == iou
        bins = result["reliability"]
        assert (bins[9]["count"], bins[9]["accuracy"]) == (1, 1.0)               # detection 1, score 0.9
        assert (bins[8]["count"], bins[8]["accuracy"]) == (1, accuracy_of_det2)  # detection 2, score 0.8
