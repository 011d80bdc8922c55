"""Class-conditional calibration: CCECE (paper Eq. 4), ECE, and the correction of Eq. 5.

How we read Eq. 4 (DESIGN §2): the detections predicted as class i are binned by confidence into B
equal-width bins of [0, 1] (bin b = [b/B, (b+1)/B), a score of 1 falls in the last bin);

    Delta_i = sum_b (N_ib / N_i) (acc_ib - conf_ib)

where a detection is correct when it matches, greedily by decreasing score at IoU >= `iou`, a
not-yet-matched ground truth of the same class on the same image (the COCO/LVIS matching rule: each
detection takes the free ground truth of highest IoU; equal IoUs go to the later ground truth, as in
pycocotools). Negative Delta: over-confident. Classes with no judged detection get Delta = 0.
ECE is the same weighted sum with |acc - conf| over the bins of all judged detections pooled.

Which detections are judged:
- LVIS protocol (`Annotations.protocol == "lvis"`): only detections on images where their class is
  verified (a ground truth of it on the image, or listed in the image's `neg_category_ids`), as in
  LVIS evaluation; in addition, an unmatched detection of a class in the image's
  `not_exhaustive_category_ids` is not judged (LVIS evaluation ignores those false positives,
  because not every instance of such a class is annotated).
- COCO protocol: every detection; an unmatched detection that overlaps a crowd region of its class
  (`iscrowd: 1`, intersection over the detection's area >= `iou`) is not judged (COCO ignores it).
Every detection that is not judged is counted in the output ("unverified", "ignored").

Everything is arrays: detections and ground truth are sorted once by (image, class), IoUs are
computed only for (detection, ground truth) pairs of the same (image, class), and the greedy
matching runs for all groups at once, one detection rank at a time; statistics are `np.bincount`s.
`load_detections` reads LVIS-sized results files without building 6 M Python dicts when the file
holds plain box results (see `_parse_box_results`).
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from slsd_cli.data.lvis import Annotations, segmentation_to_rle, validate_results
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_json, check_output, read_json

IouType = Literal["bbox", "segm"]
FORMAT = "slsd-calibration-v1"
FREQUENCY_GROUPS = ("r", "c", "f")
_PAIR_BUDGET = 4_000_000  # (detection, ground truth) pairs held at once during matching


# ------------------------------------------------------------------ detections as arrays


@dataclass
class Detections:
    """Validated detections as arrays (input order)."""

    image_ids: np.ndarray   # int64 [N]
    labels: np.ndarray      # int64 [N], contiguous class index (Annotations.category_index)
    scores: np.ndarray      # float64 [N]
    boxes: np.ndarray       # float64 [N, 4], xywh (NaN rows for results without a box)
    segmentations: list[dict] | None = None  # compressed RLE per detection (segm only)

    def __len__(self) -> int:
        return int(self.scores.size)


def detections_from_results(results: list[dict], annotations: Annotations, iou_type: IouType = "bbox",
                            path: str | Path = "<detections>", validated: bool = False) -> Detections:
    """Check a results list (`lvis.validate_results`) and turn it into arrays. Every result needs a
    `bbox` for iou_type bbox, a `segmentation` for segm."""
    _check_iou_type(iou_type)
    if not validated:
        results = validate_results(results, annotations, path)
    n = len(results)
    key = "bbox" if iou_type == "bbox" else "segmentation"
    missing = next((i for i, d in enumerate(results) if key not in d), None)
    if missing is not None:
        raise InputError(f"iou type {iou_type} needs '{key}' in every result", path=path, record=f"[{missing}]")
    image_ids = np.fromiter((d["image_id"] for d in results), np.int64, n)
    category_ids = np.fromiter((d["category_id"] for d in results), np.int64, n)
    scores = np.fromiter((d["score"] for d in results), np.float64, n)
    boxes = np.full((n, 4), np.nan)
    with_box = [i for i, d in enumerate(results) if "bbox" in d]
    if with_box:
        boxes[with_box] = np.array([results[i]["bbox"] for i in with_box], dtype=np.float64).reshape(-1, 4)
    segms = None
    if iou_type == "segm":
        segms = []
        for d in results:
            image = annotations.images[d["image_id"]]
            segms.append(segmentation_to_rle(d["segmentation"], image["height"], image["width"]))
    labels = _labels(category_ids, annotations)
    return Detections(image_ids, labels, scores, boxes, segms)


def _labels(category_ids: np.ndarray, annotations: Annotations) -> np.ndarray:
    """Contiguous class index of known category ids."""
    return _index_of(category_ids, np.asarray(annotations.category_ids, dtype=np.int64))


def _index_of(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Index of each value in `sorted_ids` (int64), -1 where absent. A dense table when the id range
    is small (LVIS image ids < 600k), else a binary search."""
    values = np.asarray(values, dtype=np.int64)
    if sorted_ids.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    low, high = int(sorted_ids[0]), int(sorted_ids[-1])
    if high - low < (1 << 25):
        table = np.full(high - low + 1, -1, dtype=np.int64)
        table[sorted_ids - low] = np.arange(sorted_ids.size)
        inside = (values >= low) & (values <= high)
        out = np.full(values.shape, -1, dtype=np.int64)
        out[inside] = table[values[inside] - low]
        return out
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == values, pos, -1)


def load_detections(path: str | Path, annotations: Annotations, iou_type: IouType = "bbox") -> Detections:
    """Read and check a results json (LVIS/COCO results format) into arrays.

    A file of plain box results (each object holds exactly image_id, category_id, bbox and score,
    plus optionally a segmentation that iou type bbox does not need) is parsed by a vectorised
    reader: ~10x faster than `json.load` and a fraction of its memory at LVIS scale. Anything else
    (other keys, exponents, NaN, malformed json...) goes through `json` + `validate_results`, which
    also gives the precise error message for malformed files.
    """
    _check_iou_type(iou_type)
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    if iou_type == "bbox":
        columns = _parse_box_results(path)
        if columns is not None:
            return _detections_from_columns(columns, annotations, path)
    results = validate_results(read_json(path), annotations, path)
    if iou_type == "segm" and results:
        from slsd_cli.evaluation import check_segmentations  # RLE run-length checks (eval engineer's)

        check_segmentations(results, annotations, path)
    return detections_from_results(results, annotations, iou_type, path, validated=True)


_RESULT_KEYS = (b"image_id", b"category_id", b"bbox", b"score")
# A segmentation object ({"size": [h, w], "counts": ...}) with the comma that joins it to its record.
_SEGMENTATION = re.compile(rb',\s*"segmentation"\s*:\s*\{[^{}]*\}|"segmentation"\s*:\s*\{[^{}]*\}\s*,')
_NUMBER_BYTES = b"0123456789.-"
_TO_SPACES = bytes(b if b in _NUMBER_BYTES else 32 for b in range(256))


def _parse_box_results(source: bytes | Path) -> np.ndarray | None:
    """Columns [N, 7] (image_id, category_id, x, y, w, h, score) of a results file, or None when the
    file is not plain box results (then the caller falls back to `json`).

    The check is exact on structure: removing every digit, '.', '-' and whitespace must leave
    `[R,R,...,R]` where R is one record's skeleton `{"image_id":,"category_id":,"bbox":[,,,],
    "score":}` (the four keys in any order, the same order in every record), and the numbers
    must be exactly 7 per record.
    """
    body = source.read_bytes() if isinstance(source, Path) else source  # read here: the only reference
    del source
    if b'"segmentation"' in body:
        body = _SEGMENTATION.sub(b"", body)
    skeleton = body.translate(None, delete=_NUMBER_BYTES + b" \t\n\r")
    if len(skeleton) < 2 or skeleton[:1] != b"[" or skeleton[-1:] != b"]":
        return None
    if skeleton == b"[]":
        return np.zeros((0, 7))
    end = skeleton.find(b"}")
    record = skeleton[1:end + 1]
    positions = {key: record.find(b'"' + key + b'":') for key in _RESULT_KEYS}
    if min(positions.values()) < 0:
        return None
    order = sorted(_RESULT_KEYS, key=positions.__getitem__)
    expected = b"{" + b",".join(b'"' + k + b'":' + (b"[,,,]" if k == b"bbox" else b"") for k in order) + b"}"
    if record != expected:
        return None
    n, rest = divmod(len(skeleton) - 1, len(record) + 1)
    if rest:
        return None
    step = len(record) + 1
    block_records = 65536
    block = (record + b",") * block_records
    for start in range(0, n, block_records):
        k = min(block_records, n - start)
        want = block[:k * step] if start + k < n else block[:k * step - 1] + b"]"
        if skeleton[1 + start * step:1 + (start + k) * step] != want:
            return None
    del skeleton, block
    tokens = body.translate(_TO_SPACES)
    del body
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older numpy warns and stops early: the count check catches it
            values = np.fromstring(tokens, dtype=np.float64, sep=" ")
    except ValueError:  # a token that is not a number ("1.2.3", "-")
        return None
    del tokens
    if values.size != 7 * n:
        return None
    values = values.reshape(n, 7)
    column = {}
    at = 0
    for key in order:
        width = 4 if key == b"bbox" else 1
        column[key] = slice(at, at + width)
        at += width
    return np.concatenate([values[:, column[b"image_id"]], values[:, column[b"category_id"]],
                           values[:, column[b"bbox"]], values[:, column[b"score"]]], axis=1)


def _detections_from_columns(columns: np.ndarray, annotations: Annotations, path: Path) -> Detections:
    """Validate parsed columns with the checks (and messages) of `lvis.validate_results`."""
    image_ids, category_ids, boxes, scores = columns[:, 0], columns[:, 1], columns[:, 2:6], columns[:, 6]
    integral = (image_ids == np.round(image_ids)) & (category_ids == np.round(category_ids))
    image_index = np.where(integral, _index_of(np.where(integral, image_ids, -1),
                                               np.asarray(annotations.image_ids, dtype=np.int64)), -1)
    labels = np.where(integral, _labels(np.where(integral, category_ids, -1), annotations), -1)
    checks = (
        ~integral,
        image_index < 0,
        labels < 0,
        (scores < 0) | (scores > 1),
        (boxes[:, 2] < 0) | (boxes[:, 3] < 0),
    )
    for bad in checks:
        index = np.flatnonzero(bad)
        if index.size:
            i = int(index[0])
            row = columns[i]
            record = {"image_id": _as_number(row[0]), "category_id": _as_number(row[1]),
                      "bbox": row[2:6].tolist(), "score": float(row[6])}
            try:
                validate_results([record], annotations, path)
            except InputError as exc:
                raise InputError(exc.message, path=path, record=f"[{i}]") from None
            raise InputError(f"image_id and category_id must be integers, got {record['image_id']}, "
                             f"{record['category_id']}", path=path, record=f"[{i}]")
    return Detections(image_ids.astype(np.int64), labels, scores.copy(), boxes.copy(), None)


def _as_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"iou type must be 'bbox' or 'segm', got {iou_type!r}")


# ------------------------------------------------------------------ ground truth


@dataclass
class _GroundTruth:
    key: np.ndarray         # image_index * C + label, sorted
    boxes: np.ndarray       # xyxy, in key order
    crowd: np.ndarray       # bool, in key order
    rles: list | None       # compressed RLE, in key order (segm)
    verified: np.ndarray | None       # LVIS: sorted unique keys with a gt or a verified negative
    not_exhaustive: np.ndarray | None  # LVIS: sorted unique keys of not-exhaustive classes


def _ground_truth(annotations: Annotations, image_ids: np.ndarray, iou_type: str) -> _GroundTruth:
    anns = annotations.annotations
    c = annotations.num_classes
    n = len(anns)
    img = _index_of(np.fromiter((a["image_id"] for a in anns), np.int64, n), image_ids)
    lab = _labels(np.fromiter((a["category_id"] for a in anns), np.int64, n), annotations)
    key = img * c + lab
    order = np.argsort(key, kind="stable")  # stable: equal keys keep file order
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)[order]
    boxes[:, 2:] += boxes[:, :2]
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)[order]
    rles = None
    if iou_type == "segm":
        rles = []
        for i in order.tolist():
            image = annotations.images[anns[i]["image_id"]]
            rles.append(segmentation_to_rle(anns[i]["segmentation"], image["height"], image["width"]))
    verified = not_exhaustive = None
    if annotations.protocol == "lvis":
        crowd[:] = False  # LVIS has no crowd regions
        verified = np.unique(np.concatenate([key, _image_category_keys(annotations, image_ids, "neg_category_ids")]))
        not_exhaustive = np.unique(_image_category_keys(annotations, image_ids, "not_exhaustive_category_ids"))
    return _GroundTruth(key[order], boxes, crowd, rles, verified, not_exhaustive)


def _image_category_keys(annotations: Annotations, image_ids: np.ndarray, field: str) -> np.ndarray:
    """Keys (image_index * C + label) of the categories an image lists in `field`."""
    lists = [annotations.images[i].get(field) or [] for i in image_ids.tolist()]
    sizes = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    ids = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(sizes.sum()))
    return np.repeat(np.arange(len(lists)), sizes) * annotations.num_classes + _labels(ids, annotations)


# ------------------------------------------------------------------ matching


def _box_iou_pairs(d: np.ndarray, g: np.ndarray, crowd: bool = False) -> np.ndarray:
    """IoU of paired xyxy boxes (pycocotools' formula; crowd: intersection over the detection)."""
    iw = np.minimum(d[:, 2], g[:, 2]) - np.maximum(d[:, 0], g[:, 0])
    ih = np.minimum(d[:, 3], g[:, 3]) - np.maximum(d[:, 1], g[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_d = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])
    union = area_d if crowd else area_d + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _pair_layout(det_pos: np.ndarray, gt_lo: np.ndarray, gt_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, ground truth) pair: detection-major, ground truth in key order."""
    total = int(gt_count.sum())
    pair_det = np.repeat(det_pos, gt_count)
    first = np.repeat(np.cumsum(gt_count) - gt_count, gt_count)
    pair_gt = np.repeat(gt_lo, gt_count) + (np.arange(total) - first)
    return pair_det, pair_gt


def _segm_iou_pairs(pair_det: np.ndarray, pair_gt: np.ndarray, det_rles: list, gt_rles: list,
                    crowd: bool) -> np.ndarray:
    """Mask IoUs of pairs laid out by `_pair_layout`, one pycocotools call per detection run."""
    from pycocotools import mask as mask_utils

    out = np.empty(pair_det.size)
    starts = np.flatnonzero(np.r_[True, pair_det[1:] != pair_det[:-1]]) if pair_det.size else np.zeros(0, int)
    ends = np.r_[starts[1:], pair_det.size]
    # consecutive detections of one group share their ground-truth range: one call per group
    s = 0
    while s < starts.size:
        g0, g1 = pair_gt[starts[s]], pair_gt[ends[s] - 1] + 1
        e = s + 1
        while e < starts.size and pair_gt[starts[e]] == g0 and pair_gt[ends[e] - 1] + 1 == g1:
            e += 1
        dets = [det_rles[i] for i in pair_det[starts[s:e]].tolist()]
        gts = gt_rles[g0:g1]
        ious = np.asarray(mask_utils.iou(dets, gts, [int(crowd)] * len(gts)), dtype=np.float64)
        out[starts[s]:ends[e - 1]] = ious.reshape(-1)
        s = e
    return out


def _greedy_match(pair_det: np.ndarray, pair_gt: np.ndarray, iou: np.ndarray, det_rank: np.ndarray,
                  threshold: float, matched: np.ndarray, gt_taken: np.ndarray) -> None:
    """Greedy matching of all groups at once, one detection rank at a time (rank = position of a
    detection in its (image, class) group by decreasing score). Each detection takes the free ground
    truth of highest IoU >= threshold (ties: the later one, as pycocotools). Pairs must be
    detection-major; results go to `matched` (per detection) and `gt_taken` (per ground truth)."""
    if pair_det.size == 0:
        return
    pair_rank = det_rank[pair_det]
    by_rank = np.argsort(pair_rank.astype(np.int32 if pair_rank.max() >= 2**15 else np.int16), kind="stable")
    rank_sorted = pair_rank[by_rank]
    bounds = np.flatnonzero(np.r_[True, rank_sorted[1:] != rank_sorted[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = by_rank[a:b]
        det, gt, val = pair_det[sel], pair_gt[sel], iou[sel]
        val = np.where(gt_taken[gt], -1.0, val)
        new_det = np.r_[True, det[1:] != det[:-1]]
        starts = np.flatnonzero(new_det)
        seg = np.cumsum(new_det) - 1
        best = np.maximum.reduceat(val, starts)
        hit = (val == best[seg]) & (best[seg] >= threshold)
        idx = np.flatnonzero(hit)
        if idx.size == 0:
            continue
        last = idx[np.r_[seg[idx][1:] != seg[idx][:-1], True]]  # last of equal IoUs, as pycocotools
        matched[det[last]] = True
        gt_taken[gt[last]] = True


def _blocks(group_pairs: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split consecutive groups into runs holding about `budget` pairs each."""
    if group_pairs.size == 0:
        return []
    cum = np.cumsum(group_pairs)
    cuts = np.searchsorted(cum, np.arange(budget, int(cum[-1]), budget), side="left") + 1
    edges = np.unique(np.r_[0, cuts, group_pairs.size])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


# ------------------------------------------------------------------ CCECE / ECE


def calibrate_detections(dets: Detections, annotations: Annotations, bins: int = 10, iou: float = 0.5,
                         iou_type: IouType = "bbox") -> dict:
    """The content of calibration.json for validated detections (see the module docstring)."""
    _check_iou_type(iou_type)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise InputError(f"bins must be a positive integer, got {bins}")
    bins = int(bins)
    if not 0.0 < iou <= 1.0:
        raise InputError(f"iou must lie in (0, 1], got {iou}")
    if iou_type == "segm" and dets.segmentations is None and len(dets):
        raise InputError("iou type segm needs the detections' segmentations")
    num_classes = annotations.num_classes
    image_ids = np.asarray(annotations.image_ids, dtype=np.int64)
    gt = _ground_truth(annotations, image_ids, iou_type)
    threshold = min(iou, 1 - 1e-10)  # pycocotools' rule
    member = _KeySet.factory(image_ids.size * num_classes)

    n = len(dets)
    key = _index_of(dets.image_ids, image_ids) * num_classes + dets.labels
    matched = np.zeros(n, dtype=bool)
    ignored = np.zeros(n, dtype=bool)  # unmatched and not judged (crowd region, not-exhaustive class)
    for crowd in (False, True):
        gt_sel = np.flatnonzero(gt.crowd == crowd)
        if gt_sel.size == 0 or n == 0:
            continue
        sel_keys = gt.key[gt_sel]  # sorted
        cand = np.flatnonzero(member(sel_keys)(key))  # detections whose (image, class) has such gt
        if crowd:
            cand = cand[~matched[cand]]
        if cand.size == 0:
            continue
        # sort the candidates by (image, class, -score, input order)
        cand = cand[np.argsort(-dets.scores[cand], kind="stable")]
        cand = cand[np.argsort(key[cand], kind="stable")]
        ckey = key[cand]
        new_group = np.r_[True, ckey[1:] != ckey[:-1]]
        group_start = np.flatnonzero(new_group)
        group_size = np.diff(np.r_[group_start, cand.size])
        rank = np.arange(cand.size) - np.repeat(group_start, group_size)
        lo = np.searchsorted(sel_keys, ckey[group_start], "left")
        count = np.searchsorted(sel_keys, ckey[group_start], "right") - lo
        if iou_type == "bbox":
            boxes = dets.boxes[cand]
            boxes[:, 2:] += boxes[:, :2]
        else:
            rles = [dets.segmentations[i] for i in cand.tolist()]
        local_matched = np.zeros(cand.size, dtype=bool)
        gt_taken = np.zeros(gt.key.size, dtype=bool)
        for a, b in _blocks(group_size * count, _PAIR_BUDGET):
            det_group = np.repeat(np.arange(a, b), group_size[a:b])
            det_pos = np.arange(group_start[a], group_start[b - 1] + group_size[b - 1])
            pair_det, pair_sel = _pair_layout(det_pos, lo[det_group], count[det_group])
            pair_gt = gt_sel[pair_sel]
            if iou_type == "bbox":
                values = _box_iou_pairs(boxes[pair_det], gt.boxes[pair_gt], crowd)
            else:
                values = _segm_iou_pairs(pair_det, pair_gt, rles, gt.rles, crowd)
            if not crowd:
                _greedy_match(pair_det, pair_gt, values, rank, threshold, local_matched, gt_taken)
            else:  # an unmatched detection inside a crowd region of its class is ignored (COCO)
                local_matched[pair_det[values >= threshold]] = True
        (ignored if crowd else matched)[cand[local_matched]] = True

    if gt.verified is not None:
        verified = member(gt.verified)(key)
        ignored |= ~matched & member(gt.not_exhaustive)(key)
    else:
        verified = np.ones(n, dtype=bool)
    judged = verified & ~ignored

    labels = dets.labels[judged]
    scores = dets.scores[judged]
    correct = matched[judged]
    cell = labels * bins + np.clip(np.floor(scores * bins).astype(np.int64), 0, bins - 1)
    size = num_classes * bins
    count = np.bincount(cell, minlength=size).reshape(num_classes, bins)
    correct_sum = np.bincount(cell, weights=correct, minlength=size).reshape(num_classes, bins)
    conf_sum = np.bincount(cell, weights=scores, minlength=size).reshape(num_classes, bins)
    return _summarise(count, correct_sum, conf_sum, annotations, bins, iou, iou_type, {
        "detections": n, "judged": int(judged.sum()), "correct": int(correct.sum()),
        "unverified": int((~verified).sum()), "ignored": int((verified & ignored).sum()),
    })


class _KeySet:
    """Membership of (image, class) keys in a sorted key set: a dense lookup table when the key
    space is small enough (LVIS val: 20k images x 1,203 classes = 24 MB), else a binary search."""

    DENSE_LIMIT = 1 << 28

    @staticmethod
    def factory(space: int):
        def member(keys: np.ndarray):
            if space <= _KeySet.DENSE_LIMIT:
                table = np.zeros(space, dtype=bool)
                table[keys] = True
                return lambda query: table[query]
            return lambda query: _isin_sorted(query, keys)
        return member


def _isin_sorted(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`np.isin(query, keys)` for a sorted `keys`, by binary search (no sort of `query`)."""
    if keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return keys[pos] == query


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _ece(count: np.ndarray, correct_sum: np.ndarray, conf_sum: np.ndarray) -> float:
    """ECE of pooled bins (count/correct/conf sums over bins)."""
    total = count.sum()
    if total == 0:
        return 0.0
    gap = np.abs(_safe_div(correct_sum, count) - _safe_div(conf_sum, count))
    return float((count / total * gap).sum())


def _summarise(count: np.ndarray, correct_sum: np.ndarray, conf_sum: np.ndarray, annotations: Annotations,
               bins: int, iou: float, iou_type: str, totals: dict) -> dict:
    acc = _safe_div(correct_sum, count)
    conf = _safe_div(conf_sum, count)
    per_class_n = count.sum(axis=1)
    weights = _safe_div(count.astype(np.float64), per_class_n[:, None].astype(np.float64))
    delta = (weights * (acc - conf)).sum(axis=1)  # Eq. 4; 0 for classes with no judged detection
    per_class = {}
    for c, cid in enumerate(annotations.category_ids):
        per_class[str(cid)] = {
            "delta": float(delta[c]),
            "count": int(per_class_n[c]),
            "bins": [{"count": int(count[c, b]), "accuracy": float(acc[c, b]), "confidence": float(conf[c, b])}
                     for b in range(bins)],
        }
    pooled = count.sum(axis=0), correct_sum.sum(axis=0), conf_sum.sum(axis=0)
    reliability = [{"lower": b / bins, "upper": (b + 1) / bins, "count": int(pooled[0][b]),
                    "accuracy": float(_safe_div(pooled[1], pooled[0])[b]),
                    "confidence": float(_safe_div(pooled[2], pooled[0])[b])} for b in range(bins)]
    frequencies = np.array(annotations.frequencies())
    groups = {}
    for name in FREQUENCY_GROUPS:
        members = frequencies == name
        with_dets = members & (per_class_n > 0)
        groups[name] = {
            "classes": int(members.sum()),
            "classes_with_detections": int(with_dets.sum()),
            "count": int(per_class_n[members].sum()),
            "mean_delta": float(delta[with_dets].mean()) if with_dets.any() else 0.0,
            "ece": _ece(count[members].sum(axis=0), correct_sum[members].sum(axis=0), conf_sum[members].sum(axis=0)),
        }
    return {
        "format": FORMAT,
        "bins": bins,
        "iou": iou,
        "iou_type": iou_type,
        "protocol": annotations.protocol,
        "ece": _ece(*pooled),
        **totals,
        "per_class": per_class,
        "reliability": reliability,
        "groups": groups,
    }


def compute_calibration(results: list[dict], annotations: Annotations, bins: int = 10, iou: float = 0.5,
                        iou_type: IouType = "bbox") -> dict:
    """calibration.json content for a results list (LVIS/COCO results format; checked with
    `lvis.validate_results`). An empty list gives the all-zero result (Delta = 0, ECE = 0)."""
    dets = detections_from_results(results, annotations, iou_type)
    return calibrate_detections(dets, annotations, bins, iou, iou_type)


def write_calibration(path: str | Path, result: dict, force: bool = False) -> Path:
    path = check_output(path, force)
    atomic_write_json(path, result, indent=1)
    return path


# ------------------------------------------------------------------ Eq. 5


def load_delta(path: str | Path, category_ids: Sequence[int]) -> torch.Tensor:
    """Per-class Delta `[C]` (float32) from calibration.json, in the order of `category_ids`
    (a model's contiguous order); 0 for classes the file does not list. A file naming a class
    outside `category_ids`, or a Delta that is not a number in [-1, 1], is an InputError."""
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


def correct_targets(probs: torch.Tensor, delta: torch.Tensor, lam: float,
                    scope: Literal["all", "predicted"] = "all", softmax: bool = False) -> torch.Tensor:
    """Eq. 5: `y + lam * Delta`, clipped to [0, 1] (a new tensor; `probs` is not modified).

    probs `[N, C]` (sigmoid head) or `[N, C + 1]` (softmax head, background last: it gets no
    correction). scope "all" corrects every class component (the literal reading); "predicted" only
    each row's top foreground class. With `softmax=True` rows are renormalised to sum to 1 (a row
    clipped to all zeros keeps its uncorrected values).
    """
    if scope not in ("all", "predicted"):
        raise InputError(f"calibration scope must be 'all' or 'predicted', got {scope!r}")
    num_classes = delta.numel()
    if probs.ndim != 2 or probs.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"probs must be [N, {num_classes}] or [N, {num_classes + 1}], got {tuple(probs.shape)}")
    shift = (lam * delta).to(probs)
    out = probs.clone()
    fg = out[:, :num_classes]
    if scope == "all":
        fg += shift
    elif probs.shape[0]:
        top = probs[:, :num_classes].argmax(dim=1)
        rows = torch.arange(probs.shape[0], device=probs.device)
        fg[rows, top] += shift[top]
    out.clamp_(0.0, 1.0)
    if softmax:
        total = out.sum(dim=1, keepdim=True)
        out = torch.where(total > 0, out / total.clamp(min=torch.finfo(out.dtype).tiny), probs)
    return out
