"""Test-time selection of detections from the cascade's scored boxes, as the EVA-02 reference
(its detectron2 fork's `fast_rcnn_inference_single_image` and `CascadeROIHeads`) selects them.

- `select_detections`: candidates are the (box, class) pairs scoring above the threshold; then
  hard class-wise NMS keeping the top `max_detections` (detectron2's default path), or class-wise
  soft-NMS (`soft_nms`, the reference's "sys" evaluation), which keeps every candidate whose
  decayed score stays >= `SOFT_NMS_MIN_SCORE`, with no top-k (the evaluator keeps the top ones).
- `maskness`: the reference's mask-quality rescoring, score x the mean mask probability over the
  pixels above the threshold (0 when no pixel is).

`ModelConfig`'s test keys choose among them (`test_nms`, `test_soft_nms`, `test_soft_nms_iou`,
`test_soft_nms_sigma`, `test_maskness`); `slsd eval` / `slsd predict` set them per run.
"""

from __future__ import annotations

import torch
from torch import Tensor

SOFT_NMS_METHODS = ("none", "linear", "gaussian")
# the reference's (mmcv.ops.soft_nms as EVA-02 calls it): a box whose decayed score falls below this is dropped
SOFT_NMS_MIN_SCORE = 1e-3


def _class_offset_boxes(boxes: Tensor, classes: Tensor) -> Tensor:
    """Boxes shifted per class so boxes of different classes never overlap, computed as the
    reference does (in the boxes' dtype: far classes lose low bits of their coordinates there,
    and the reference's IoUs carry that rounding, so ours do too)."""
    top = boxes.max() if boxes.numel() else boxes.new_zeros(())
    offsets = classes.to(boxes) * (top + torch.tensor(1).to(boxes))
    return boxes + offsets[:, None]


def soft_nms(boxes: Tensor, scores: Tensor, classes: Tensor, method: str, iou_threshold: float,
             sigma: float, min_score: float = SOFT_NMS_MIN_SCORE) -> tuple[Tensor, Tensor]:
    """Class-wise soft-NMS (Bodla et al.) with mmcv's rules: repeatedly take the best remaining box
    of a class, multiply the score of every other remaining box of that class by `1 - IoU` when
    IoU >= `iou_threshold` (linear) or by exp(-IoU^2 / sigma) (gaussian), and drop those whose
    score falls below `min_score`. -> (indices of the kept boxes, their decayed scores), best first.

    All classes advance together (one selection per class per step, classes whose boxes are all
    decided leave the grid), so the loop runs as many steps as the largest class has candidates;
    ties between equal scores go to the lower index."""
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft-NMS method must be linear or gaussian, got {method!r}")
    if boxes.dtype in (torch.float16, torch.bfloat16):  # autocast: decay in float32, as the reference
        boxes, scores = boxes.float(), scores.float()
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0)
    index, coords, score = _class_grid(_class_offset_boxes(boxes, classes), scores, classes)
    x1, y1, x2, y2 = coords
    area = (x2 - x1) * (y2 - y1)
    alive = index >= 0
    kept_index, kept_score = [], []
    neg_inf = scores.new_full((), float("-inf"))
    while True:
        rows_alive = alive.any(dim=1)
        if not bool(rows_alive.all()):  # drop the finished classes, and the columns no box is left in
            columns = torch.nonzero(alive.any(dim=0)).squeeze(1)
            if columns.numel() == 0:
                break
            width = int(columns[-1]) + 1
            index, x1, y1, x2, y2, area, score, alive = (
                t[rows_alive, :width] for t in (index, x1, y1, x2, y2, area, score, alive))
        rows = torch.arange(alive.shape[0], device=alive.device)
        best = torch.where(alive, score, neg_inf).argmax(dim=1)  # the first maximum of each row
        kept_index.append(index[rows, best])
        kept_score.append(score[rows, best])
        alive[rows, best] = False
        w = (torch.minimum(x2, x2[rows, best][:, None]) - torch.maximum(x1, x1[rows, best][:, None])).clamp(min=0)
        h = (torch.minimum(y2, y2[rows, best][:, None]) - torch.maximum(y1, y1[rows, best][:, None])).clamp(min=0)
        inter = w * h
        iou = inter / (area[rows, best][:, None] + area - inter)
        if method == "linear":
            weight = torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            weight = torch.exp(-(iou * iou) / sigma)
        score = torch.where(alive, score * weight, score)
        alive &= ~(score < min_score)
    kept, new_scores = torch.cat(kept_index), torch.cat(kept_score)
    best_first = torch.sort(new_scores, descending=True, stable=True).indices
    return kept[best_first], new_scores[best_first]


def _class_grid(boxes: Tensor, scores: Tensor, classes: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Candidates laid out one class per row, in index order: (index [G, W] (-1 = no box), the four
    coordinates [G, W] each, scores [G, W])."""
    n = scores.shape[0]
    order = torch.sort(classes, stable=True).indices
    _, counts = torch.unique_consecutive(classes[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=scores.device) - torch.repeat_interleave(starts, counts)
    row = torch.repeat_interleave(torch.arange(counts.numel(), device=scores.device), counts)
    index = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=scores.device)
    index[row, slot] = order
    gathered = index.clamp(min=0)
    coords = tuple(boxes[gathered, k] for k in range(4))
    return index, coords, torch.where(index >= 0, scores[gathered], scores.new_zeros(()))


def select_detections(boxes: Tensor, probs: Tensor, score_threshold: float, nms: float, max_detections: int,
                      soft: str = "none", soft_iou: float = 0.3, soft_sigma: float = 0.5) -> dict[str, Tensor]:
    """One image's detections from boxes [R, 4] (class-agnostic) and class probabilities [R, C]:
    {"boxes", "scores", "labels", "probs" (the RoI's whole row)}, best first."""
    from torchvision.ops import batched_nms

    valid = torch.isfinite(boxes).all(1) & torch.isfinite(probs).all(1)
    roi, cls = torch.nonzero((probs > score_threshold) & valid.unsqueeze(1), as_tuple=True)
    scores = probs[roi, cls]
    if soft == "none":
        keep = batched_nms(boxes[roi], scores, cls, nms)[:max_detections]
        scores = scores[keep]
    else:
        keep, scores = soft_nms(boxes[roi], scores, cls, soft, soft_iou, soft_sigma)
    roi, cls = roi[keep], cls[keep]
    return {"boxes": boxes[roi], "scores": scores, "labels": cls, "probs": probs[roi]}


def maskness(mask_probs: Tensor, threshold: float) -> Tensor:
    """[N, M, M] mask probabilities -> [N] mean probability over the pixels above `threshold`
    (0 for a mask with none), the reference's mask-quality score."""
    above = mask_probs > threshold
    count = above.flatten(1).sum(dim=1)
    total = (mask_probs * above.to(mask_probs.dtype)).flatten(1).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1).to(total.dtype), torch.zeros_like(total))


def rescore_by_maskness(det: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Multiply each detection's score by its mask's `maskness` and re-sort, best first."""
    scores = det["scores"] * maskness(det["mask_probs"].float(), threshold).to(det["scores"].dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    n = scores.shape[0]
    out = {k: (v[order] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v) for k, v in det.items()}
    out["scores"] = scores[order]
    return out
