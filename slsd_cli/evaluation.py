"""LVIS and COCO average precision: exact, fast and lean.

`evaluate(annotations, detections)` returns the numbers of the official evaluators — lvis-api's
`LVISEval` for the LVIS protocol, pycocotools' `COCOeval` for COCO — computed with the same
floating-point operations in the same order, so they agree to the last bit (the tests check 1e-6
against both on noisy synthetic sets). The official code matches detections to ground truth one
(image, category, area range, IoU threshold, detection, ground truth) at a time in Python, and
faster-coco-eval, though its kernels are C++, still visits every (image, category) pair; on LVIS
(1,203 classes) both spend most of their time on pairs that hold nothing. Here the work is laid
out as arrays:

1. detections and ground truth are sorted once by (image, category, -score) and grouped into
   pairs; IoUs are computed (pycocotools' own `iou`, so values are bit-identical) only for pairs
   that hold both;
2. the greedy matching runs for all pairs, all 10 IoU thresholds and all 4 area ranges at once,
   one detection rank at a time (at most `max_dets` steps);
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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from slsd_cli.data.lvis import Annotations, Protocol, segmentation_to_rle, validate_results
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_path, read_json

IOU_TYPES = ("bbox", "segm")
# Exactly the official parameter arrays (np.arange would drift).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_LABELS = ("all", "small", "medium", "large")
AREA_RANGES = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]])
FREQUENCY_GROUPS = ("r", "c", "f")
_RLE_CHUNK_CHARS = 32_768  # RLE characters validated per vectorised batch


def lvis_api():
    """Import the official lvis-api under numpy 2. lvis 0.5.3 still calls `np.float` (removed in
    numpy 1.24); the alias is restored only when missing, and only that one."""
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    import lvis

    return lvis


# ------------------------------------------------------------------ detections: load and check


def load_detections(path: str | Path, annotations: Annotations) -> list[dict]:
    """Read a results json (LVIS/COCO results format) and check every record against the
    annotations: ids, scores, boxes (`validate_results`) and the RLE masks themselves (run lengths
    must decode and add up to the image's area). Uncompressed RLE is compressed in place.
    A bad record is an InputError naming it."""
    path = Path(path)
    results = validate_results(read_json(path), annotations, path)
    check_segmentations(results, annotations, path)
    return results


def check_segmentations(results: list[dict], annotations: Annotations, path: str | Path) -> None:
    """Validate the run lengths of every RLE mask in `results` (vectorised over all masks):
    compressed strings must decode to non-negative runs summing to height x width. Uncompressed
    RLE (a list of counts) is checked the same way and replaced by its compressed form."""
    path = Path(path)
    compressed: list[int] = []
    for i, det in enumerate(results):
        seg = det.get("segmentation")
        if seg is None:
            continue
        counts = seg["counts"]
        if isinstance(counts, str):
            compressed.append(i)
            continue
        image = annotations.images[det["image_id"]]
        area = image["height"] * image["width"]
        if (not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                or sum(counts) != area):
            raise InputError(f"malformed RLE: run lengths must be non-negative and sum to "
                             f"{image['height']}x{image['width']}", path=path, record=f"[{i}]")
        det["segmentation"] = _compress(mask_utils.frPyObjects(seg, image["height"], image["width"]))
    if not compressed:
        return
    segs = [results[i]["segmentation"] for i in compressed]
    lengths = np.fromiter((len(seg["counts"]) for seg in segs), np.int64, len(segs))
    areas = np.fromiter((seg["size"][0] * seg["size"][1] for seg in segs), np.int64, len(segs))
    # batches of ~_RLE_CHUNK_CHARS characters: the temporaries stay in cache (measured 2x faster)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(_RLE_CHUNK_CHARS, int(lengths.sum()), _RLE_CHUNK_CHARS))
    bounds = np.unique(np.concatenate(([0], bounds + 1, [len(segs)])))
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        bad = _bad_rle_strings([seg["counts"] for seg in segs[start:stop]], areas[start:stop])
        if bad.size:
            i = compressed[start + int(bad[0])]
            raise InputError("malformed RLE: counts do not decode to runs covering the image",
                             path=path, record=f"[{i}]")


def _compress(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _bad_rle_strings(strings: Sequence[str], areas: np.ndarray) -> np.ndarray:
    """Indices of compressed RLE strings that do not decode (as pycocotools' `rleFrString` reads
    them) to non-negative runs summing to `areas[i]`. Vectorised over all characters: 6-bit
    characters -> tokens of 5-bit groups with a sign bit -> delta-decoded run lengths."""
    n = len(strings)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n)
    try:
        buf = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        return np.array([i for i, s in enumerate(strings) if not s.isascii()][:1], dtype=np.int64)
    bad = lengths == 0
    full = np.flatnonzero(~bad)
    if not full.size:
        return np.flatnonzero(bad)
    char_start = (np.cumsum(lengths) - lengths)[full]
    char_end = char_start + lengths[full]                                   # exclusive
    bad_char = (buf < 48) | (buf > 48 + 63)
    bad[full] |= np.logical_or.reduceat(bad_char, char_start)
    c = (buf - np.uint8(48)) & np.uint8(63)
    more = (c & np.uint8(0x20)) != 0
    bad[full] |= more[char_end - 1]                                         # ends inside a token
    is_end = ~more
    is_end[char_end - 1] = True                                             # tokens never span strings
    token_end = np.flatnonzero(is_end)
    token_start = np.concatenate(([0], token_end[:-1] + 1))
    token_len = token_end - token_start + 1
    first_token = np.searchsorted(token_start, char_start)
    bad[full] |= np.logical_or.reduceat(token_len > 7, first_token)          # > 35 bits: not a run length
    # token values: 5 bits per character, least significant first (most tokens are one character)
    low = c & np.uint8(0x1F)
    x = low[token_start].astype(np.int64)
    longer = np.flatnonzero(token_len > 1)
    for j in range(1, 7):
        longer = longer[token_len[longer] > j]
        if not longer.size:
            break
        x[longer] += low[token_start[longer] + j].astype(np.int64) << (5 * j)
    negative = (c[token_end] & np.uint8(0x10)) != 0
    x[negative] -= np.int64(1) << (5 * np.minimum(token_len[negative], 7))  # sign-extend
    # delta decoding: cnts[0] = x[0], cnts[m] = x[m] + cnts[m-2] for m > 2, i.e. running sums along
    # the chains m = 1, 3, 5, ... and m = 2, 4, 6, ... of each string
    token_string = np.repeat(np.arange(full.size), np.diff(np.append(first_token, token_start.size)))
    m = np.arange(token_start.size) - first_token[token_string]
    odd = (m & 1) == 1
    even = ~odd & (m >= 2)
    counts = np.where(m == 0, x, 0)
    for chain in (odd, even):
        cs = np.cumsum(np.where(chain, x, 0))
        before = np.where(first_token > 0, cs[np.maximum(first_token - 1, 0)], 0)
        counts = np.where(chain, cs - before[token_string], counts)
    bad[full] |= np.logical_or.reduceat(counts < 0, first_token)
    bad[full] |= np.add.reduceat(counts, first_token) != areas[full]
    return np.flatnonzero(bad)


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


def capped(detections: list[dict], protocol: Protocol, max_dets: int) -> list[dict]:
    """The detections `evaluate` scores: for LVIS each image's top `max_dets`, else all."""
    if protocol != "lvis":
        return detections
    n = len(detections)
    keep = limit_per_image(np.fromiter((d["image_id"] for d in detections), np.int64, n),
                           np.fromiter((d["score"] for d in detections), np.float64, n), max_dets)
    return detections if keep.size == n else [detections[i] for i in keep.tolist()]


def default_iou_types(detections: list[dict]) -> tuple[str, ...]:
    """bbox and segm when every detection has a mask (or there are none), else bbox."""
    return IOU_TYPES if all("segmentation" in d for d in detections) else ("bbox",)


def write_results(path: str | Path, records: Iterable[dict | str]) -> int:
    """Stream detections into a json list atomically (one record a line; strings are taken as
    already-serialised records). Returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for record in records:
            text = record if isinstance(record, str) else json.dumps(record, allow_nan=False)
            out.write(("\n" if n == 0 else ",\n") + text)
            n += 1
        out.write("\n]\n" if n else "]\n")
    return n


# ------------------------------------------------------------------ the evaluator


@dataclass
class _GroundTruth:
    """Ground truth of one annotations file as arrays, shared by both IoU types."""

    image_ids: np.ndarray       # sorted image ids (the evaluation's image order)
    category_ids: np.ndarray    # sorted category ids (the evaluation's category order)
    key: np.ndarray             # per annotation: image_index * K + category_index
    area: np.ndarray
    ignore: np.ndarray          # bool: crowd (COCO) or an explicit LVIS `ignore` flag
    crowd: np.ndarray           # bool: iscrowd (COCO only; LVIS never uses it)
    anns: list[dict]
    images: dict[int, dict]
    verified: np.ndarray | None     # LVIS: sorted keys of (image, category) with gt or negative
    not_exhaustive: np.ndarray | None  # LVIS: sorted keys of not-exhaustive (image, category)


def _ground_truth(annotations: Annotations, protocol: Protocol) -> _GroundTruth:
    image_ids = np.array(annotations.image_ids, dtype=np.int64)
    category_ids = np.array(annotations.category_ids, dtype=np.int64)
    num_classes = category_ids.size
    anns = annotations.annotations
    n = len(anns)
    key = (np.searchsorted(image_ids, np.fromiter((a["image_id"] for a in anns), np.int64, n)) * num_classes
           + np.searchsorted(category_ids, np.fromiter((a["category_id"] for a in anns), np.int64, n)))
    area = np.empty(n, dtype=np.float64)
    for i, a in enumerate(anns):
        if "area" in a:
            area[i] = a["area"]
        else:  # the official evaluators require `area`; the natural value is the mask's area
            image = annotations.images[a["image_id"]]
            area[i] = float(mask_utils.area(segmentation_to_rle(a["segmentation"], image["height"], image["width"])))
    if protocol == "lvis":
        crowd = np.zeros(n, dtype=bool)
        ignore = np.fromiter((bool(a.get("ignore", 0)) for a in anns), bool, n)
        verified, not_exhaustive = [], []
        for img_index, image_id in enumerate(image_ids.tolist()):
            image = annotations.images[image_id]
            for name, out in (("neg_category_ids", verified), ("not_exhaustive_category_ids", not_exhaustive)):
                cats = image.get(name) or []
                if cats:
                    out.append(img_index * num_classes + np.searchsorted(category_ids, np.array(cats, np.int64)))
        verified_keys = np.unique(np.concatenate([key, *verified]))
        nel_keys = np.unique(np.concatenate(not_exhaustive)) if not_exhaustive else np.zeros(0, np.int64)
        return _GroundTruth(image_ids, category_ids, key, area, ignore, crowd, anns, annotations.images,
                           verified_keys, nel_keys)
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)
    return _GroundTruth(image_ids, category_ids, key, area, crowd.copy(), crowd, anns, annotations.images, None, None)


def evaluate(annotations: Annotations, detections: list[dict], *, protocol: Protocol | None = None,
             iou_types: Sequence[str] = IOU_TYPES, max_dets: int = 300, path: str | Path | None = None) -> dict:
    """Evaluate validated detections (see `load_detections`) against `annotations`.

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
    if "segm" in iou_types:
        missing = next((i for i, d in enumerate(detections) if "segmentation" not in d), None)
        if missing is not None:
            raise InputError("segm evaluation needs a 'segmentation' (RLE) in every detection; evaluate "
                             "bbox only (--iou-type bbox) or add masks", path=path, record=f"[{missing}]")
    n = len(detections)
    image_ids = np.fromiter((d["image_id"] for d in detections), np.int64, n)
    category_ids = np.fromiter((d["category_id"] for d in detections), np.int64, n)
    scores = np.fromiter((d["score"] for d in detections), np.float64, n)
    keep = limit_per_image(image_ids, scores, max_dets) if protocol == "lvis" else np.arange(n)
    metrics: dict[str, Any] = {
        "protocol": protocol, "max_dets": max_dets, "num_images": len(annotations.images),
        "num_detections": int(keep.size), "num_detections_over_max_dets": int(n - keep.size),
    }
    gt = _ground_truth(annotations, protocol)
    num_classes = gt.category_ids.size
    dt_key = np.searchsorted(gt.image_ids, image_ids) * num_classes + np.searchsorted(gt.category_ids, category_ids)
    for iou_type in iou_types:
        precision, recall = _evaluate_arrays(gt, detections, keep, dt_key[keep], scores[keep], iou_type,
                                             protocol, max_dets)
        metrics[iou_type] = summarize(precision, recall, annotations, protocol, max_dets)
    return metrics


def _evaluate_arrays(gt: _GroundTruth, detections: list[dict], dt_index: np.ndarray, dt_key: np.ndarray,
                     dt_score: np.ndarray, iou_type: str, protocol: Protocol,
                     max_dets: int) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, K, A] and recall [T, K, A] (-1 where undefined), as the official
    `accumulate` (for COCO, the slice at maxDets = max_dets). `dt_index` selects the detections
    evaluated (in input order), `dt_key` (image_index * K + category_index) and `dt_score` are theirs."""
    num_classes = gt.category_ids.size
    if protocol == "lvis":  # federated: only categories verified (present or negative) in the image count
        verified = np.isin(dt_key, gt.verified)
        dt_key, dt_score, dt_index = dt_key[verified], dt_score[verified], dt_index[verified]
    # sort by (image, category, -score, input order): the order of every official per-pair list
    order = np.lexsort((dt_index, -dt_score, dt_key))
    dt_key, dt_score, dt_index = dt_key[order], dt_score[order], dt_index[order]
    pair_start, pair_size = _runs(dt_key)
    if protocol == "coco":  # pycocotools keeps the top maxDets of each (image, category)
        rank = np.arange(dt_key.size) - np.repeat(pair_start, pair_size)
        top = rank < max_dets
        if not top.all():
            dt_key, dt_score, dt_index = dt_key[top], dt_score[top], dt_index[top]
            pair_start, pair_size = _runs(dt_key)
    dets = [detections[i] for i in dt_index.tolist()]
    dt_area = _detection_areas(dets, iou_type)
    if protocol == "lvis" and gt.not_exhaustive.size:
        dt_nel = np.isin(dt_key, gt.not_exhaustive)
    else:
        dt_nel = np.zeros(dt_key.size, dtype=bool)

    gt_order = np.argsort(gt.key, kind="stable")
    gt_key = gt.key[gt_order]
    gt_pair_start, gt_pair_size = _runs(gt_key)
    gt_area = gt.area[gt_order]
    gt_crowd = gt.crowd[gt_order]
    # per-area ignore flags [num_gt, A] of the ground truth (official: ignore or area out of range)
    gt_ig_area = (gt.ignore[gt_order][:, None] | (gt_area[:, None] < AREA_RANGES[:, 0])
                  | (gt_area[:, None] > AREA_RANGES[:, 1]))

    # pairs holding both detections and ground truth: the only places IoU and matching happen
    both, dt_p, gt_p = np.intersect1d(dt_key[pair_start], gt_key[gt_pair_start], assume_unique=True,
                                      return_indices=True)
    status = np.zeros((dt_key.size, IOU_THRESHOLDS.size, AREA_RANGES.shape[0]), dtype=np.int8)
    if both.size:
        _match_pairs(dets, gt, gt_order, iou_type, protocol, pair_start[dt_p], pair_size[dt_p],
                     gt_pair_start[gt_p], gt_pair_size[gt_p], gt_ig_area, gt_crowd, status)
    del dets

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


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal values in a sorted array."""
    if not sorted_keys.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    return start, np.diff(np.append(start, sorted_keys.size))


def _detection_areas(dets: list[dict], iou_type: str) -> np.ndarray:
    """Area used for a detection's area range: its box area (bbox) or mask area (segm), as the
    official loaders set it; a box-less detection (bbox evaluation) falls back to its mask."""
    n = len(dets)
    if iou_type == "segm":
        return _mask_areas([d["segmentation"] for d in dets])
    area = np.empty(n, dtype=np.float64)
    no_box = []
    for i, d in enumerate(dets):
        box = d.get("bbox")
        if box is None:
            no_box.append(i)
        else:
            area[i] = box[2] * box[3]
    if no_box:
        area[no_box] = _mask_areas([dets[i]["segmentation"] for i in no_box])
    return area


def _mask_areas(rles: list[dict]) -> np.ndarray:
    """Pixel counts of RLE masks (pycocotools 2.0.11's `area` breaks on more than 255 masks under
    numpy 2, so batches of 255)."""
    out = np.empty(len(rles), dtype=np.float64)
    for s in range(0, len(rles), 255):
        out[s:s + 255] = mask_utils.area(rles[s:s + 255])
    return out


def _geometry(dets: list[dict], iou_type: str) -> list:
    if iou_type == "segm":
        return [d["segmentation"] for d in dets]
    return [d["bbox"] if "bbox" in d else mask_utils.toBbox(d["segmentation"]).tolist() for d in dets]


def _match_pairs(dets, gt, gt_order, iou_type, protocol, dt_start, dt_size, gt_start, gt_size,
                 gt_ig_area, gt_crowd, status):
    """Greedy matching of every (image, category) pair, for all IoU thresholds and area ranges
    at once. status[d, t, a]: 0 unmatched, 1 matched to a regular gt, 2 matched to an ignored gt.

    The official rule, per detection in score order: among still-free ground truth (crowd regions
    stay free) with IoU >= threshold, take the regular ones if any, else the ignored ones, and of
    those the highest IoU, the last one in annotation order on ties."""
    num_pairs = dt_start.size
    # IoUs, pair by pair, with pycocotools (bit-identical to the official code)
    iou_offset = np.zeros(num_pairs + 1, dtype=np.int64)
    iou_offset[1:] = np.cumsum(dt_size * gt_size)
    flat = np.empty(int(iou_offset[-1]), dtype=np.float64)
    anns = gt.anns
    use_crowd = protocol == "coco"
    for p in range(num_pairs):
        ds, dn, gs, gn = int(dt_start[p]), int(dt_size[p]), int(gt_start[p]), int(gt_size[p])
        g_anns = [anns[j] for j in gt_order[gs:gs + gn].tolist()]
        if iou_type == "segm":
            g = [segmentation_to_rle(a["segmentation"], *_hw(gt, a)) for a in g_anns]
        else:
            g = [a["bbox"] for a in g_anns]
        crowd = [int(c) for c in gt_crowd[gs:gs + gn]] if use_crowd else [0] * gn
        ious = mask_utils.iou(_geometry(dets[ds:ds + dn], iou_type), g, crowd)
        flat[iou_offset[p]:iou_offset[p + 1]] = np.asarray(ious, dtype=np.float64).ravel()

    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
    num_t, num_a = thresholds.size, AREA_RANGES.shape[0]
    width = 1 << np.ceil(np.log2(np.maximum(gt_size, 1))).astype(np.int64)  # bucket by padded #gt
    for g_width in np.unique(width).tolist():
        members = np.flatnonzero(width == g_width)
        members = members[np.argsort(-dt_size[members], kind="stable")]  # most detections first
        nd, ng = dt_size[members], gt_size[members]
        cols = np.arange(g_width)
        valid = cols[None, :] < ng[:, None]                                 # [P, G]
        gidx = np.where(valid, gt_start[members][:, None] + cols[None, :], 0)
        g_ig = gt_ig_area[gidx] & valid[:, :, None]                         # [P, G, A]
        g_ig = np.transpose(g_ig, (0, 2, 1))                                # [P, A, G]
        g_crowd = gt_crowd[gidx] & valid                                    # [P, G]
        free = np.broadcast_to(valid[:, None, None, :], (members.size, num_t, num_a, g_width)).copy()
        active_counts = np.searchsorted(-nd, -np.arange(int(nd.max())), side="left")  # pairs with nd > r
        base = iou_offset[members]
        for r, n_active in enumerate(active_counts.tolist()):
            flat_idx = base[:n_active, None] + r * ng[:n_active, None] + cols[None, :]
            row = np.where(valid[:n_active], flat[np.where(valid[:n_active], flat_idx, 0)], -1.0)  # [n, G]
            cand = (row[:, None, None, :] >= thresholds[None, :, None, None]) & free[:n_active]  # [n, T, A, G]
            ig = g_ig[:n_active, None, :, :]
            regular = cand & ~ig
            has_regular = regular.any(axis=-1)
            cand = np.where(has_regular[..., None], regular, cand & ig)
            found = cand.any(axis=-1)                                           # [n, T, A]
            vals = np.where(cand, row[:, None, None, :], -np.inf)
            best = vals.max(axis=-1, keepdims=True)
            winners = cand & (vals == best)
            pick = g_width - 1 - np.argmax(winners[..., ::-1], axis=-1)       # last index on ties
            picked_ignored = np.take_along_axis(np.broadcast_to(ig, cand.shape), pick[..., None], -1)[..., 0]
            dt_rows = dt_start[members[:n_active]] + r
            status[dt_rows] = np.where(found, np.where(picked_ignored, 2, 1), 0).astype(np.int8)
            # the picked gt is taken, unless it is a crowd region
            pi, ti, ai = np.nonzero(found)
            gi = pick[pi, ti, ai]
            free[pi, ti, ai, gi] = g_crowd[pi, gi]
    return status


def _hw(gt: _GroundTruth, ann: dict) -> tuple[int, int]:
    image = gt.images[ann["image_id"]]
    return image["height"], image["width"]


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

