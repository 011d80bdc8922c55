"""The COCO/LVIS greedy matcher, shared by `slsd eval` (10 IoU thresholds x 4 area ranges) and
`slsd calibrate` (one IoU threshold, all areas). (The training-time matching of anchors and
proposals is `slsd_cli.model.proposal_matching`.)

The rule (pycocotools' `evaluateImg`, lvis-api's `evaluate_img`), per (image, category) pair and
per detection in decreasing score (ties: input order): among the ground truth still free (crowd
regions stay free) with IoU >= threshold, take the regular ones if any, else the ignored ones, and
of those the highest IoU, the last one in annotation order on ties. Ground truth is ignored when
flagged (`iscrowd` under COCO, `ignore` under LVIS) or outside the area range.

Contracts:
- `GroundTruth`: the annotations as arrays in pair order (sorted by key = image_index * K +
  category_index, annotation order within a key), built once per annotations file.
- `match(gt, det_key, geometry, ...)`: detections sorted by (key, -score, input order) (see
  `match_order`); returns status int8 [N, T, A]: 0 unmatched, 1 matched to a regular ground
  truth, 2 matched to an ignored one.
- IoUs are computed only for pairs holding both detections and ground truth: boxes vectorised with
  pycocotools' `bbIou` expressions in its order of operations (bit-identical values), masks with
  pycocotools' own `iou`, pair by pair. Pairs are processed in blocks of at most `budget` IoUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from slsd_cli.data.results import index_of

if TYPE_CHECKING:
    from slsd_cli.data.lvis import Annotations, Protocol

IOU_BUDGET = 4_000_000  # (detection, ground truth) IoUs held at once


@dataclass
class GroundTruth:
    """Ground truth of one annotations file as arrays, sorted by key (annotation order within a key)."""

    image_ids: np.ndarray       # sorted image ids (index = image_index)
    category_ids: np.ndarray    # sorted category ids (index = label)
    key: np.ndarray             # int64 [G]: image_index * K + label, sorted
    order: np.ndarray           # int64 [G]: position of each row in annotations.annotations
    boxes: np.ndarray           # float64 [G, 4] xywh
    ignore: np.ndarray          # bool [G]: crowd (COCO) or an explicit LVIS `ignore` flag
    crowd: np.ndarray           # bool [G]: iscrowd (COCO only; LVIS has no crowd regions)
    verified: np.ndarray | None        # LVIS: sorted keys of (image, category) with gt or negative
    not_exhaustive: np.ndarray | None  # LVIS: sorted keys of not-exhaustive (image, category)
    annotations: "Annotations"
    _areas: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.category_ids.size)

    def areas(self) -> np.ndarray:
        """float64 [G]: each annotation's `area`, or its mask's area when it has none (the official
        evaluators need `area`; the natural value is the mask's)."""
        from pycocotools import mask as mask_utils

        if self._areas is None:
            anns = self.annotations.annotations
            self._areas = np.empty(self.order.size, dtype=np.float64)
            for row, i in enumerate(self.order.tolist()):
                a = anns[i]
                self._areas[row] = a["area"] if "area" in a else float(mask_utils.area(self.rle(row)))
        return self._areas

    def ignored(self, area_ranges: np.ndarray | None = None) -> np.ndarray:
        """bool [G, A]: ignored (flagged, or the area outside range a); A = 1 without ranges."""
        if area_ranges is None:
            return self.ignore[:, None]
        areas = self.areas()[:, None]
        return self.ignore[:, None] | (areas < area_ranges[:, 0]) | (areas > area_ranges[:, 1])

    def rle(self, row: int) -> dict:
        """Compressed RLE of the ground truth at `row`."""
        from slsd_cli.data.lvis import segmentation_to_rle

        ann = self.annotations.annotations[int(self.order[row])]
        image = self.annotations.images[ann["image_id"]]
        return segmentation_to_rle(ann["segmentation"], image["height"], image["width"])


def ground_truth(annotations: "Annotations", protocol: "Protocol") -> GroundTruth:
    image_ids = np.asarray(annotations.image_ids, dtype=np.int64)
    category_ids = np.asarray(annotations.category_ids, dtype=np.int64)
    num_classes = category_ids.size
    anns = annotations.annotations
    n = len(anns)
    key = (index_of(np.fromiter((a["image_id"] for a in anns), np.int64, n), image_ids) * num_classes
           + index_of(np.fromiter((a["category_id"] for a in anns), np.int64, n), category_ids))
    order = np.argsort(key, kind="stable")
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)[order]
    if protocol == "lvis":
        crowd = np.zeros(n, dtype=bool)
        ignore = np.fromiter((bool(a.get("ignore", 0)) for a in anns), bool, n)[order]
        verified = np.unique(np.concatenate([key, _image_category_keys(annotations, image_ids, "neg_category_ids")]))
        not_exhaustive = np.unique(_image_category_keys(annotations, image_ids, "not_exhaustive_category_ids"))
    else:
        crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)[order]
        ignore, verified, not_exhaustive = crowd.copy(), None, None
    return GroundTruth(image_ids, category_ids, key[order], order, boxes, ignore, crowd, verified,
                       not_exhaustive, annotations)


def _image_category_keys(annotations: "Annotations", image_ids: np.ndarray, field: str) -> np.ndarray:
    """Keys (image_index * K + label) of the categories each image lists in `field`."""
    lists = [annotations.images[i].get(field) or [] for i in image_ids.tolist()]
    sizes = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    ids = np.fromiter((c for x in lists for c in x), np.int64, int(sizes.sum()))
    labels = index_of(ids, np.asarray(annotations.category_ids, dtype=np.int64))
    return np.repeat(np.arange(len(lists)), sizes) * annotations.num_classes + labels


DENSE_KEYS = 1 << 28  # key spaces up to this size are looked up in a bool table (LVIS val: 24 MB)


def isin_sorted(query: np.ndarray, keys: np.ndarray, space: int | None = None) -> np.ndarray:
    """`np.isin(query, keys)` for sorted `keys` of non-negative ints below `space`: a table lookup
    when `space` is given and small enough, else a binary search (no sort of `query`)."""
    if keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    if space is not None and space <= DENSE_KEYS:
        table = np.zeros(space, dtype=bool)
        table[keys] = True
        return table[query]
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return keys[pos] == query


def match_order(key: np.ndarray, score: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The order `match` wants: by (key, -score, tiebreak) — every official per-pair list. Without
    `tiebreak` (or an increasing one) ties keep input order: two stable sorts, faster than lexsort."""
    if tiebreak is not None and (tiebreak.size < 2 or not (np.diff(tiebreak) > 0).all()):
        return np.lexsort((tiebreak, -score, key))
    by_score = np.argsort(-score, kind="stable")
    return by_score[np.argsort(key[by_score], kind="stable")]


def runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal values in a sorted array."""
    if not sorted_keys.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    return start, np.diff(np.append(start, sorted_keys.size))


def match(gt: GroundTruth, det_key: np.ndarray, *, iou_type: str, thresholds: np.ndarray,
          area_ranges: np.ndarray | None = None, det_boxes: np.ndarray | None = None,
          det_rles: list | None = None, budget: int = IOU_BUDGET) -> np.ndarray:
    """Greedy matching of detections sorted by `match_order` (keys `det_key`). Geometry: `det_boxes`
    [N, 4] xywh (bbox) or `det_rles` (segm). `area_ranges` [A, 2] (None: one range, every area).
    Returns status int8 [N, T, A] (see the module docstring)."""
    thresholds = np.minimum(np.asarray(thresholds, dtype=np.float64), 1 - 1e-10)  # pycocotools' rule
    num_a = 1 if area_ranges is None else len(area_ranges)
    status = np.zeros((det_key.size, thresholds.size, num_a), dtype=np.int8)
    dt_start, dt_size = runs(det_key)
    gt_start, gt_size = runs(gt.key)
    both, dt_p, gt_p = np.intersect1d(det_key[dt_start] if dt_start.size else det_key[:0],
                                      gt.key[gt_start], assume_unique=True, return_indices=True)
    if not both.size:
        return status
    gt_ignore = gt.ignored(area_ranges)
    dt_start, dt_size, gt_start, gt_size = dt_start[dt_p], dt_size[dt_p], gt_start[gt_p], gt_size[gt_p]
    if iou_type == "bbox":
        dt_cols, gt_cols = _box_columns(det_boxes), _box_columns(gt.boxes)

        def ious(sel: np.ndarray) -> np.ndarray:
            d, g = _pair_rows(dt_start[sel], dt_size[sel], gt_start[sel], gt_size[sel])
            return box_iou(dt_cols, d, gt_cols, g, gt.crowd[g])
    else:
        def ious(sel: np.ndarray) -> np.ndarray:
            return _mask_ious(det_rles, gt, dt_start[sel], dt_size[sel], gt_start[sel], gt_size[sel])
    _greedy(ious, dt_start, dt_size, gt_start, gt_size, gt_ignore, gt.crowd, thresholds, status, budget)
    return status


def _box_columns(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x, y, x + w, y + h, w * h) of xywh boxes: the per-box terms of pycocotools' `bbIou`."""
    x, y, w, h = (np.ascontiguousarray(boxes[:, i]) for i in range(4))
    return x, y, w + x, h + y, w * h


def box_iou(dt: tuple[np.ndarray, ...], d: np.ndarray, gt: tuple[np.ndarray, ...], g: np.ndarray,
            crowd: np.ndarray) -> np.ndarray:
    """IoU of detection rows `d` with ground-truth rows `g` (`_box_columns` of each; crowd:
    intersection over the detection's area) with pycocotools' `bbIou` expressions in its order,
    so the values are bit-identical."""
    w = np.minimum(dt[2][d], gt[2][g]) - np.maximum(dt[0][d], gt[0][g])
    h = np.minimum(dt[3][d], gt[3][g]) - np.maximum(dt[1][d], gt[1][g])
    overlap = (w > 0) & (h > 0)
    inter = w * h
    da = dt[4][d]
    union = np.where(crowd, da, da + gt[4][g] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _pair_rows(dt_start, dt_size, gt_start, gt_size) -> tuple[np.ndarray, np.ndarray]:
    """Detection and ground-truth rows of every IoU of the given pairs, pair after pair,
    detection-major within a pair (entry r * gt_size + g)."""
    # one detection row at a time, then its pair's ground truth rows: repeats and aranges only
    # (an integer division per IoU was 10x slower)
    det_pair = np.repeat(np.arange(dt_size.size), dt_size)
    det_rows = np.arange(det_pair.size) + np.repeat(dt_start - (np.cumsum(dt_size) - dt_size), dt_size)
    ng = gt_size[det_pair]
    first = np.cumsum(ng) - ng  # entry of each detection row's first IoU
    return np.repeat(det_rows, ng), np.arange(int(ng.sum())) + np.repeat(gt_start[det_pair] - first, ng)


def _mask_ious(det_rles, gt, dt_start, dt_size, gt_start, gt_size) -> np.ndarray:
    """Mask IoUs of the given pairs (layout of `_pair_rows`), one pycocotools call per pair."""
    from pycocotools import mask as mask_utils

    out = np.empty(int((dt_size * gt_size).sum()), dtype=np.float64)
    at = 0
    for ds, dn, gs, gn in zip(dt_start.tolist(), dt_size.tolist(), gt_start.tolist(), gt_size.tolist()):
        g = [gt.rle(j) for j in range(gs, gs + gn)]
        crowd = [int(c) for c in gt.crowd[gs:gs + gn]]
        values = np.asarray(mask_utils.iou(det_rles[ds:ds + dn], g, crowd), dtype=np.float64)
        out[at:at + dn * gn] = values.ravel()
        at += dn * gn
    return out


def _greedy(ious: Callable[[np.ndarray], np.ndarray], dt_start, dt_size, gt_start, gt_size, gt_ignore,
            gt_crowd, thresholds, status, budget) -> None:
    """The greedy rule for all pairs, all thresholds and all area ranges at once, one detection
    rank at a time. Pairs are bucketed by their number of ground truth (padded to a power of two)
    and, within a bucket, processed most detections first in blocks of <= `budget` IoUs."""
    num_t, num_a = thresholds.size, gt_ignore.shape[1]
    width = 1 << np.ceil(np.log2(np.maximum(gt_size, 1))).astype(np.int64)
    for g_width in np.unique(width).tolist():
        members = np.flatnonzero(width == g_width)
        members = members[np.argsort(-dt_size[members], kind="stable")]  # most detections first
        cost = np.cumsum(dt_size[members] * gt_size[members])
        cuts = np.searchsorted(cost, np.arange(budget, int(cost[-1]), budget), side="right")
        edges = np.unique(np.concatenate(([0], cuts, [members.size])))
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
            block = members[a:b]
            flat = ious(block)
            nd, ng = dt_size[block], gt_size[block]
            base = np.concatenate(([0], np.cumsum(nd * ng)[:-1]))
            cols = np.arange(g_width)
            valid = cols[None, :] < ng[:, None]                                 # [P, G]
            gidx = np.where(valid, gt_start[block][:, None] + cols[None, :], 0)
            g_ig = np.transpose(gt_ignore[gidx] & valid[:, :, None], (0, 2, 1))  # [P, A, G]
            g_crowd = gt_crowd[gidx] & valid                                    # [P, G]
            free = np.broadcast_to(valid[:, None, None, :], (block.size, num_t, num_a, g_width)).copy()
            active_counts = np.searchsorted(-nd, -np.arange(int(nd.max())), side="left")  # pairs with nd > r
            for r, n_active in enumerate(active_counts.tolist()):
                v = valid[:n_active]
                flat_idx = base[:n_active, None] + r * ng[:n_active, None] + cols[None, :]
                row = np.where(v, flat[np.where(v, flat_idx, 0)], -1.0)                      # [n, G]
                cand = (row[:, None, None, :] >= thresholds[None, :, None, None]) & free[:n_active]  # [n, T, A, G]
                ig = g_ig[:n_active, None, :, :]
                regular = cand & ~ig
                cand = np.where(regular.any(axis=-1)[..., None], regular, cand & ig)
                found = cand.any(axis=-1)                                                   # [n, T, A]
                vals = np.where(cand, row[:, None, None, :], -np.inf)
                winners = cand & (vals == vals.max(axis=-1, keepdims=True))
                pick = g_width - 1 - np.argmax(winners[..., ::-1], axis=-1)               # last index on ties
                picked_ignored = np.take_along_axis(np.broadcast_to(ig, cand.shape), pick[..., None], -1)[..., 0]
                status[dt_start[block[:n_active]] + r] = np.where(found, np.where(picked_ignored, 2, 1), 0)
                pi, ti, ai = np.nonzero(found)
                free[pi, ti, ai, pick[pi, ti, ai]] = g_crowd[pi, pick[pi, ti, ai]]  # crowd regions stay free
