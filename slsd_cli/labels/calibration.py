"""Class-conditional calibration: CCECE (paper Eq. 4, `ccece`), ECE (`ece`), and the Δ file that
Eq. 5 reads (`load_delta`; the correction itself: `labels.pseudo_labels.calibration_correction`).

How we read Eq. 4 (docs/method.md): the detections predicted as class i are binned by confidence
into B equal-width bins of [0, 1] (bin b = [b/B, (b+1)/B), a score of 1 falls in the last bin);

    Delta_i = sum_b (N_ib / N_i) (acc_ib - conf_ib)

where a detection is correct when the COCO/LVIS greedy matcher (`slsd_cli.evaluation.matching.match`, the one
`slsd eval` uses, here at the single IoU threshold `iou` and every area) matches it to a regular
ground truth of its class on its image: greedily by decreasing score, each detection takes the free
ground truth of highest IoU (equal IoUs: the later one, as pycocotools). Negative Delta:
over-confident. Classes with no judged detection get Delta = 0. ECE is the same weighted sum with
|acc - conf| over the bins of all judged detections pooled.

Which Δ Eq. 5 reads (`delta` in the file): Eq. 4's value (`raw_delta`) passed through an estimator
(`labels.delta_estimate`): by default shrunk toward its frequency group's Δ in proportion to the
class's judged detections, and the group's Δ for a class with no ground-truth instance in the
calibration data (`status` unknown), so a class absent from the split is not "over-confident by its
mean score".

Which detections are judged (the evaluation protocol's own rule):
- LVIS protocol (`Annotations.protocol == "lvis"`): only detections on images where their class is
  verified (a ground truth of it on the image, or listed in the image's `neg_category_ids`); in
  addition, an unmatched detection of a class in the image's `not_exhaustive_category_ids`, and a
  detection matched to a ground truth flagged `ignore`, are not judged.
- COCO protocol: every detection, except one the matcher gives to a crowd region of its class
  (`iscrowd: 1`, intersection over the detection's area >= `iou`), which COCO ignores.
Every detection that is not judged is counted in the output ("unverified", "ignored").

Input: `slsd_cli.data.results.Detections` (read and validated by `results.read_results`, the one reader
of results files). Output: the calibration.json dict (`calibrate_detections`). Per class: `delta`
(the estimate), `raw_delta` (Eq. 4), `status`, `weight` (the share of its own Δ in `delta`), its
support (`count` judged detections, `correct`, `instances` of ground truth) and `bins`. Per r/c/f
group: `mean_delta` (mean `delta` over the classes whose Δ is not unknown), `mean_raw_delta` (mean
Eq. 4 Δ over the classes with judged detections), `prior` (the group's pooled Δ), the classes per
status, `ece`; an undefined mean or ECE is null, not 0.

`slsd calibrate` as one library call (options checked in one place, a file or a detector run):
`slsd_cli.labels.calibrate_pipeline.run_calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from slsd_cli.evaluation import matching
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_json, check_output, read_json
from slsd_cli.data.results import Detections, from_records
from slsd_cli.labels.delta_estimate import (ESTIMATED, FREQUENCY_GROUPS, SHRUNK, UNKNOWN, ClassSupport,
                                            DeltaEstimate, DeltaEstimator, estimate_delta)

if TYPE_CHECKING:
    import torch

    from slsd_cli.data.lvis import Annotations

IouType = Literal["bbox", "segm"]
FORMAT = "slsd-calibration-v1"


# ------------------------------------------------------------------ Eq. 4


def ccece(count: np.ndarray, correct_sum: np.ndarray, conf_sum: np.ndarray) -> np.ndarray:
    """Eq. 4, CCECE per class: Delta_i = sum_b (N_ib / N_i) (acc_ib - conf_ib).

    count, correct_sum, conf_sum: [C, B] per class and confidence bin (judged detections, how many
    of them are correct, the sum of their scores). Returns Delta [C] (float64); 0 for a class with
    no judged detection."""
    acc = _safe_div(correct_sum, count)
    conf = _safe_div(conf_sum, count)
    weights = _safe_div(count.astype(np.float64), count.sum(axis=1, keepdims=True).astype(np.float64))
    return (weights * (acc - conf)).sum(axis=1)


def ece(count: np.ndarray, correct_sum: np.ndarray, conf_sum: np.ndarray) -> float:
    """Expected calibration error of pooled bins [B]: sum_b (N_b / N) |acc_b - conf_b| (0 if N = 0)."""
    total = count.sum()
    if total == 0:
        return 0.0
    gap = np.abs(_safe_div(correct_sum, count) - _safe_div(conf_sum, count))
    return float((count / total * gap).sum())


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, dtype=np.float64), where=b > 0)


# ------------------------------------------------------------------ judging the detections


@dataclass
class Judged:
    """The judged detections of a calibration split (arrays [M]) and what was not judged."""

    labels: np.ndarray       # contiguous class index
    image_index: np.ndarray  # index into the annotations' sorted image ids
    scores: np.ndarray
    correct: np.ndarray      # bool: matched to a regular ground truth of its class
    totals: dict             # detections, judged, correct, unverified, ignored


def judge_detections(dets: Detections, gt: matching.GroundTruth, iou: float = 0.5,
                     iou_type: IouType = "bbox") -> Judged:
    """Match the detections to `gt` at `iou` and keep those the protocol judges (module docstring)."""
    dets.require(iou_type)
    space = gt.image_ids.size * gt.num_classes
    key = dets.image_index * gt.num_classes + dets.labels
    n = len(dets)

    # only detections whose (image, class) holds ground truth can match: sort and match those
    cand = np.flatnonzero(matching.isin_sorted(key, gt.key, space))
    cand = cand[matching.match_order(key[cand], dets.scores[cand])]
    status = matching.match(gt, key[cand], iou_type=iou_type, thresholds=np.array([iou]),
                            det_boxes=dets.boxes[cand] if iou_type == "bbox" else None,
                            det_rles=[dets.segmentations[i] for i in cand.tolist()] if iou_type == "segm" else None)
    matched = np.zeros(n, dtype=bool)
    ignored = np.zeros(n, dtype=bool)  # not judged: matched to an ignored gt, unmatched of a not-exhaustive class
    matched[cand] = status[:, 0, 0] == 1
    ignored[cand] = status[:, 0, 0] == 2
    del status, cand
    if gt.verified is not None:
        verified = matching.isin_sorted(key, gt.verified, space)
        ignored |= ~matched & matching.isin_sorted(key, gt.not_exhaustive, space)
    else:
        verified = np.ones(n, dtype=bool)
    judged = verified & ~ignored
    correct = matched[judged]
    return Judged(dets.labels[judged], dets.image_index[judged], dets.scores[judged], correct, {
        "detections": n, "judged": int(judged.sum()), "correct": int(correct.sum()),
        "unverified": int((~verified).sum()), "ignored": int((verified & ignored).sum()),
    })


def class_support(judged: Judged, gt: matching.GroundTruth, image_weights: np.ndarray | None = None) -> ClassSupport:
    """Per-class support of a judged split; `image_weights` [I] (e.g. bootstrap multiplicities) weighs
    each image's detections and instances (default 1)."""
    c = gt.num_classes
    regular = ~gt.ignore
    gt_labels, gt_images = gt.key[regular] % c, gt.key[regular] // c
    w_det = None if image_weights is None else image_weights[judged.image_index]
    w_gt = None if image_weights is None else image_weights[gt_images]
    return ClassSupport(
        detections=np.bincount(judged.labels, weights=w_det, minlength=c).astype(np.float64),
        correct=np.bincount(judged.labels, weights=judged.correct if w_det is None else judged.correct * w_det,
                            minlength=c).astype(np.float64),
        score_sum=np.bincount(judged.labels, weights=judged.scores if w_det is None else judged.scores * w_det,
                              minlength=c),
        instances=np.bincount(gt_labels, weights=w_gt, minlength=c).astype(np.float64))


def _check_options(bins: int, iou: float, iou_type: str) -> int:
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"iou type must be 'bbox' or 'segm', got {iou_type!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise InputError(f"bins must be a positive integer, got {bins}")
    if not 0.0 < iou <= 1.0:
        raise InputError(f"iou must lie in (0, 1], got {iou}")
    return int(bins)


def calibrate_detections(dets: Detections, annotations: "Annotations", bins: int = 10, iou: float = 0.5,
                         iou_type: IouType = "bbox", estimator: DeltaEstimator | None = None) -> dict:
    """The content of calibration.json for validated detections (see the module docstring);
    `estimator` default: `DeltaEstimator()` (shrink on detections, k = DEFAULT_K)."""
    bins = _check_options(bins, iou, iou_type)
    estimator = DeltaEstimator() if estimator is None else estimator
    dets.require(iou_type)
    gt = matching.ground_truth(annotations, annotations.protocol)
    judged = judge_detections(dets, gt, iou, iou_type)
    cell = judged.labels * bins + np.clip(np.floor(judged.scores * bins).astype(np.int64), 0, bins - 1)
    size = gt.num_classes * bins
    count = np.bincount(cell, minlength=size).reshape(gt.num_classes, bins)
    correct_sum = np.bincount(cell, weights=judged.correct, minlength=size).reshape(gt.num_classes, bins)
    conf_sum = np.bincount(cell, weights=judged.scores, minlength=size).reshape(gt.num_classes, bins)
    raw = ccece(count, correct_sum, conf_sum)
    support = class_support(judged, gt)
    estimate = estimate_delta(support, annotations.frequencies(), estimator, raw=raw)
    return _summarise(count, correct_sum, conf_sum, raw, support, estimate, annotations, bins, iou, iou_type,
                      {**judged.totals, "estimator": estimator.describe()})


def _summarise(count: np.ndarray, correct_sum: np.ndarray, conf_sum: np.ndarray, raw: np.ndarray,
               support: ClassSupport, estimate: DeltaEstimate, annotations: "Annotations", bins: int, iou: float,
               iou_type: str, totals: dict) -> dict:
    acc = _safe_div(correct_sum, count)
    conf = _safe_div(conf_sum, count)
    per_class_n = count.sum(axis=1)
    per_class = {}
    for c, cid in enumerate(annotations.category_ids):
        per_class[str(cid)] = {
            "delta": float(estimate.delta[c]),
            "raw_delta": float(raw[c]),
            "status": estimate.status[c],
            "weight": float(estimate.weight[c]),
            "count": int(per_class_n[c]),
            "correct": int(support.correct[c]),
            "instances": int(support.instances[c]),
            "bins": [{"count": int(count[c, b]), "accuracy": float(acc[c, b]), "confidence": float(conf[c, b])}
                     for b in range(bins)],
        }
    pooled = count.sum(axis=0), correct_sum.sum(axis=0), conf_sum.sum(axis=0)
    reliability = [{"lower": b / bins, "upper": (b + 1) / bins, "count": int(pooled[0][b]),
                    "accuracy": float(_safe_div(pooled[1], pooled[0])[b]),
                    "confidence": float(_safe_div(pooled[2], pooled[0])[b])} for b in range(bins)]
    frequencies = np.array(annotations.frequencies())
    status = np.array(estimate.status)
    groups = {}
    for name in FREQUENCY_GROUPS:
        members = frequencies == name
        with_dets = members & (per_class_n > 0)
        known = members & (status != UNKNOWN)
        judged = bool(with_dets.any())  # else the group has no mean Δ and no ECE: null, not 0
        groups[name] = {
            "classes": int(members.sum()),
            "classes_with_detections": int(with_dets.sum()),
            "classes_with_instances": int((members & (support.instances > 0)).sum()),
            **{kind: int((members & (status == kind)).sum()) for kind in (ESTIMATED, SHRUNK, UNKNOWN)},
            "count": int(per_class_n[members].sum()),
            "mean_delta": float(estimate.delta[known].mean()) if known.any() else None,
            "mean_raw_delta": float(raw[with_dets].mean()) if judged else None,
            "prior": estimate.priors.get(name),
            "ece": ece(count[members].sum(axis=0), correct_sum[members].sum(axis=0), conf_sum[members].sum(axis=0))
            if judged else None,
        }
    return {
        "format": FORMAT,
        "bins": bins,
        "iou": iou,
        "iou_type": iou_type,
        "protocol": annotations.protocol,
        "ece": ece(*pooled),
        **totals,
        "per_class": per_class,
        "reliability": reliability,
        "groups": groups,
    }


def compute_calibration(results: list[dict], annotations: "Annotations", bins: int = 10, iou: float = 0.5,
                        iou_type: IouType = "bbox", path: str | Path = "<detections>",
                        estimator: DeltaEstimator | None = None) -> dict:
    """calibration.json content for a parsed results list (LVIS/COCO results format, validated by
    `results.from_records`). An empty list gives the all-zero result (Delta = 0, ECE = 0)."""
    dets = from_records(results, annotations, path, masks=iou_type == "segm")
    return calibrate_detections(dets, annotations, bins, iou, iou_type, estimator)


def write_calibration(path: str | Path, result: dict, force: bool = False) -> Path:
    path = check_output(path, force)
    atomic_write_json(path, result, indent=1)
    return path


# ------------------------------------------------------------------ Δ for Eq. 5


def load_delta(path: str | Path, category_ids: Sequence[int]) -> "torch.Tensor":
    """Per-class Delta `[C]` (float32) from calibration.json, in the order of `category_ids`
    (a model's contiguous order); 0 for classes the file does not list. A file naming a class
    outside `category_ids`, or a Delta that is not a number in [-1, 1], is an InputError."""
    import torch  # here, so that `slsd calibrate` never loads it

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("per_class"), dict):
        raise InputError("not a calibration file (no 'per_class' object; see slsd calibrate)", path=path)
    index = {int(cid): i for i, cid in enumerate(category_ids)}
    delta = torch.zeros(len(index), dtype=torch.float32)
    for key, entry in data["per_class"].items():
        try:
            cid = int(key)
        except ValueError:
            raise InputError(f"category id {key!r} is not an integer", path=path, record=f"per_class.{key}") from None
        if cid not in index:
            raise InputError(f"category id {cid} is not one of the model's {len(index)} categories",
                             path=path, record=f"per_class.{key}")
        value = entry.get("delta") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
            raise InputError(f"delta must be a number in [-1, 1], got {value!r}", path=path,
                             record=f"per_class.{key}")
        delta[index[cid]] = float(value)
    return delta
