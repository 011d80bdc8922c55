"""LVIS and COCO average precision: exact, fast and lean.

`evaluate(annotations, detections)` returns the numbers of the official evaluators — lvis-api's
`LVISEval` for the LVIS protocol, pycocotools' `COCOeval` for COCO — computed with the same
floating-point operations in the same order, so they agree to the last bit (the tests check 1e-6
against both on noisy synthetic sets). The official code matches detections to ground truth one
(image, category, area range, IoU threshold, detection, ground truth) at a time in Python, and
faster-coco-eval, though its kernels are C++, still visits every (image, category) pair; on LVIS
(1,203 classes) both spend most of their time on pairs that hold nothing. Here the work is laid
out as arrays:

1. detections (`slsd_cli.data.results.Detections`, read and validated by `results.read_results`) and
   ground truth are sorted once by (image, category, -score) and grouped into pairs; IoUs are
   computed only for pairs that hold both, with bit-identical values (`slsd_cli.evaluation.matching`);
2. the greedy matching (`matching.match`, shared with `slsd calibrate`) runs for all pairs, all
   10 IoU thresholds and all 4 area ranges at once, one detection rank at a time;
3. precision/recall are accumulated per category with cumulative sums, exactly as the official
   `accumulate`, and summarised by the official `_summarize` expressions.

Protocol details reproduced on purpose (see the docstrings of `evaluate` and `limit_per_image`):
LVIS keeps each image's top `max_dets` detections by score (stable), drops detections of
categories neither annotated nor in `neg_category_ids` of their image, and ignores unmatched
detections of `not_exhaustive_category_ids`; COCO applies `max_dets` per (image, category) and
treats `iscrowd` ground truth as ignore regions. For segm evaluation a detection's area is its mask
area (as detectron2 does, by dropping `bbox` before loading results), for bbox its box area.
One deliberate difference: the official tools mark matches with annotation ids, so a ground truth
with id 0 is never counted as matched there; here matches are tracked by position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from slsd_cli.data.lvis import FREQUENCY_GROUPS
from slsd_cli.evaluation import matching
from slsd_cli.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    from slsd_cli.data.lvis import Annotations, Protocol
    from slsd_cli.data.results import Detections

IOU_TYPES = ("bbox", "segm")
# Exactly the official parameter arrays (np.arange would drift).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_LABELS = ("all", "small", "medium", "large")
AREA_RANGES = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]])


def limit_per_image(image_ids: np.ndarray, scores: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices (in input order) of each image's top `max_dets` detections by score, ties broken by
    input order: what lvis-api's `LVISResults.limit_dets_per_image` keeps."""
    if max_dets < 0 or image_ids.size == 0:
        return np.arange(image_ids.size)
    order = np.lexsort((-scores, image_ids))  # stable: equal scores keep input order
    sorted_images = image_ids[order]
    group_start = np.flatnonzero(np.concatenate(([True], sorted_images[1:] != sorted_images[:-1])))
    rank = np.arange(order.size) - np.repeat(group_start, np.diff(np.append(group_start, order.size)))
    return np.sort(order[rank < max_dets])


def default_iou_types(detections: "Detections") -> tuple[str, ...]:
    """bbox and segm when every detection has a mask (or there are none), else bbox."""
    return IOU_TYPES if not len(detections) or detections.all_have_masks else ("bbox",)


# ------------------------------------------------------------------ the evaluator


def evaluate(annotations: "Annotations", detections: "Detections | list[dict]", *, protocol: "Protocol | None" = None,
             iou_types: Sequence[str] = IOU_TYPES, max_dets: int = 300, path: "str | Path | None" = None) -> dict:
    """Evaluate detections against `annotations`: validated arrays (`results.read_results`) or a
    parsed results list (validated here, `path` naming it in errors).

    Returns the metrics.json dict: {"protocol", "max_dets", "num_images", "num_detections"
    (evaluated), "num_detections_over_max_dets" (dropped by the LVIS per-image cap), and per IoU
    type {"AP", "AP50", "AP75", "APs", "APm", "APl", ["APr", "APc", "APf" for LVIS],
    "AR@<max_dets>", "per_class": {"<category id>": AP or -1}}}. A value of -1 means undefined
    (no ground truth in that slice), as in the official tools.

    LVIS: each image keeps its top `max_dets` detections by score (LVISResults). COCO: pycocotools'
    rule, `max_dets` per (image, category); AP and AR are reported at `max_dets` (maxDets
    [1, 10, max_dets]). Frequency groups come from the annotations' categories. `path` names the
    detections in error messages.
    """
    protocol = protocol or annotations.protocol
    if protocol not in ("lvis", "coco"):
        raise InputError(f"unknown protocol {protocol!r} (use lvis or coco)")
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise InputError(f"unknown IoU type {iou_type!r} (use bbox and/or segm)")
    if max_dets <= 0:
        raise InputError(f"--max-dets must be positive, got {max_dets}")
    from slsd_cli.data.results import Detections, from_records

    if not isinstance(detections, Detections):
        detections = from_records(detections, annotations, path or "<detections>")
    for iou_type in iou_types:
        detections.require(iou_type, path)
    n = len(detections)
    keep = limit_per_image(detections.image_ids, detections.scores, max_dets) if protocol == "lvis" else np.arange(n)
    metrics: dict[str, Any] = {
        "protocol": protocol, "max_dets": max_dets, "num_images": len(annotations.images),
        "num_detections": int(keep.size), "num_detections_over_max_dets": int(n - keep.size),
    }
    gt = matching.ground_truth(annotations, protocol)
    dt_key = detections.image_index * gt.num_classes + detections.labels
    for iou_type in iou_types:
        precision, recall = _evaluate_arrays(gt, detections, keep, dt_key[keep], detections.scores[keep], iou_type,
                                             protocol, max_dets)
        metrics[iou_type] = summarize(precision, recall, annotations, protocol, max_dets)
    return metrics


def _evaluate_arrays(gt: matching.GroundTruth, detections: "Detections", dt_index: np.ndarray, dt_key: np.ndarray,
                     dt_score: np.ndarray, iou_type: str, protocol: "Protocol",
                     max_dets: int) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, K, A] and recall [T, K, A] (-1 where undefined), as the official
    `accumulate` (for COCO, the slice at maxDets = max_dets). `dt_index` selects the detections
    evaluated (in input order), `dt_key` (image_index * K + category_index) and `dt_score` are theirs."""
    num_classes = gt.num_classes
    if protocol == "lvis":  # federated: only categories verified (present or negative) in the image count
        verified = matching.isin_sorted(dt_key, gt.verified)
        dt_key, dt_score, dt_index = dt_key[verified], dt_score[verified], dt_index[verified]
    order = matching.match_order(dt_key, dt_score, dt_index)
    dt_key, dt_score, dt_index = dt_key[order], dt_score[order], dt_index[order]
    if protocol == "coco":  # pycocotools keeps the top maxDets of each (image, category)
        pair_start, pair_size = matching.runs(dt_key)
        rank = np.arange(dt_key.size) - np.repeat(pair_start, pair_size)
        top = rank < max_dets
        if not top.all():
            dt_key, dt_score, dt_index = dt_key[top], dt_score[top], dt_index[top]
    rles = boxes = None
    if iou_type == "segm":
        rles = [detections.segmentations[i] for i in dt_index.tolist()]
        dt_area = _mask_areas(rles)
    else:
        boxes, dt_area = _boxes_and_areas(detections, dt_index)
    if protocol == "lvis" and gt.not_exhaustive.size:
        dt_nel = matching.isin_sorted(dt_key, gt.not_exhaustive)
    else:
        dt_nel = np.zeros(dt_key.size, dtype=bool)
    status = matching.match(gt, dt_key, iou_type=iou_type, thresholds=IOU_THRESHOLDS, area_ranges=AREA_RANGES,
                            det_boxes=boxes, det_rles=rles)
    del rles, boxes
    gt_key = gt.key
    gt_ig_area = gt.ignored(AREA_RANGES)

    # detection ignore flags: matched to an ignored gt, or unmatched and out of the area range
    # (or, LVIS, of a not-exhaustively annotated category)
    unmatched_ignore = ((dt_area[:, None] < AREA_RANGES[:, 0]) | (dt_area[:, None] > AREA_RANGES[:, 1])
                        | dt_nel[:, None])                                   # [N, A]
    # accumulate order: category, -score, image, then the per-pair order (input order on ties)
    dt_cat = dt_key % num_classes
    acc = np.lexsort((dt_index, dt_key // num_classes, -dt_score, dt_cat))
    status = status[acc].transpose(2, 1, 0)                                 # [A, T, N]
    unmatched_ignore = unmatched_ignore[acc].T[:, None, :]                  # [A, 1, N]
    dt_cat = dt_cat[acc]
    gt_cat = gt_key % num_classes
    num_pos = np.stack([np.bincount(gt_cat[~gt_ig_area[:, a]], minlength=num_classes)
                        for a in range(AREA_RANGES.shape[0])], axis=1)     # [K, A] non-ignored gt
    bounds = np.searchsorted(dt_cat, np.arange(num_classes + 1), side="left")

    num_t, num_r, num_a = IOU_THRESHOLDS.size, RECALL_THRESHOLDS.size, AREA_RANGES.shape[0]
    precision = -np.ones((num_t, num_r, num_classes, num_a))
    recall = -np.ones((num_t, num_classes, num_a))
    eps = np.spacing(1)
    for k in np.flatnonzero(num_pos.any(axis=1)).tolist():
        s, e = int(bounds[k]), int(bounds[k + 1])
        areas = np.flatnonzero(num_pos[k] > 0)
        if e == s:  # ground truth but no detection: recall 0, precision 0
            recall[:, k, areas] = 0
            precision[:, :, k, areas] = 0
            continue
        st = status[areas, :, s:e]                                           # [a, T, n]
        matched = st > 0
        valid = ~np.where(matched, st == 2, unmatched_ignore[areas, :, s:e])  # not ignored
        tp_sum = np.cumsum(matched & valid, axis=2).astype(dtype=np.float64)
        fp_sum = np.cumsum(~matched & valid, axis=2).astype(dtype=np.float64)
        npig = num_pos[k, areas].astype(np.float64)[:, None, None]
        rc = tp_sum / npig
        pr = tp_sum / (fp_sum + tp_sum + eps)
        recall[:, k, areas] = rc[:, :, -1].T
        envelope = np.maximum.accumulate(pr[:, :, ::-1], axis=2)[:, :, ::-1]  # precision envelope
        n = e - s
        for i, a in enumerate(areas.tolist()):
            for t in range(num_t):
                idx = np.searchsorted(rc[i, t], RECALL_THRESHOLDS, side="left")
                precision[t, :, k, a] = np.where(idx < n, envelope[i, t, np.minimum(idx, n - 1)], 0.0)
    return precision, recall


def _boxes_and_areas(detections: "Detections", index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xywh) and areas of the detections at `index` for bbox evaluation: the box and its
    area, or for a record without a box its mask's box and area (as the official loaders set them)."""
    from pycocotools import mask as mask_utils

    boxes = detections.boxes[index]
    area = boxes[:, 2] * boxes[:, 3]
    no_box = np.flatnonzero(~detections.has_box[index])
    if no_box.size:
        rles = [detections.segmentations[i] for i in index[no_box].tolist()]
        boxes[no_box] = mask_utils.toBbox(rles).reshape(-1, 4)
        area[no_box] = _mask_areas(rles)
    return boxes, area


def _mask_areas(rles: list[dict]) -> np.ndarray:
    """Pixel counts of RLE masks (pycocotools 2.0.11's `area` breaks on more than 255 masks under
    numpy 2, so batches of 255)."""
    from pycocotools import mask as mask_utils

    out = np.empty(len(rles), dtype=np.float64)
    for s in range(0, len(rles), 255):
        out[s:s + 255] = mask_utils.area(rles[s:s + 255])
    return out


# ------------------------------------------------------------------ summaries


def _mean_defined(s: np.ndarray) -> float:
    """The official `_summarize` reduction: mean over entries > -1, else -1."""
    if len(s[s > -1]) == 0:
        return -1.0
    return float(np.mean(s[s > -1]))


def summarize(precision: np.ndarray, recall: np.ndarray, annotations: Annotations, protocol: Protocol,
              max_dets: int) -> dict:
    """The official summary numbers from precision [T, R, K, A] and recall [T, K, A], with the
    same indexing expressions as lvis-api's / pycocotools' `_summarize` (so the same reductions),
    plus per-class AP (area all, every IoU threshold and recall level, -1 when undefined)."""
    all_ = [AREA_LABELS.index("all")]
    out: dict[str, Any] = {}

    def ap(iou_thr: float | None = None, area: str = "all", group: list[int] | None = None) -> float:
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRESHOLDS)[0]]
        aidx = [AREA_LABELS.index(area)]
        s = s[:, :, group, aidx] if group is not None else s[:, :, :, aidx]
        return _mean_defined(s)

    out["AP"] = ap()
    out["AP50"] = ap(iou_thr=0.50)
    out["AP75"] = ap(iou_thr=0.75)
    out["APs"] = ap(area="small")
    out["APm"] = ap(area="medium")
    out["APl"] = ap(area="large")
    if protocol == "lvis":
        frequencies = annotations.frequencies()
        for g in FREQUENCY_GROUPS:
            out[f"AP{g}"] = ap(group=[i for i, f in enumerate(frequencies) if f == g])
    out[f"AR@{max_dets}"] = _mean_defined(recall[:, :, all_])
    per_class = {}
    for k, cid in enumerate(annotations.category_ids):
        per_class[str(cid)] = _mean_defined(precision[:, :, k, all_[0]])
    out["per_class"] = per_class
    return out


def summary_keys(protocol: Protocol, max_dets: int) -> list[str]:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if protocol == "lvis":
        keys += ["APr", "APc", "APf"]
    return keys + [f"AR@{max_dets}"]

