"""Training-time IoU matching of candidate boxes (anchors, proposals) to ground truth, and balanced
sampling (torch). Not the evaluation matcher of detections: that is `slsd_cli.evaluation.matching`.

`match(iou, low, high, allow_low_quality)` labels each candidate 1 (foreground, IoU >= high),
0 (background, IoU < low) or -1 (ignored, in between), and gives the index of its best ground truth.
`sample(labels, num, positive_fraction)` picks a random subset with at most `positive_fraction`
positives, as the R-CNN samplers do. `in_ignore_regions(boxes, regions, iou)` flags the candidates
that overlap an ignore region (a teacher detection under the pseudo-label threshold; docs/method.md).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def match(iou: Tensor, low: float, high: float, allow_low_quality: bool = False) -> tuple[Tensor, Tensor]:
    """iou [G, N] -> (matched ground-truth index [N] long, label [N] int8 in {-1, 0, 1}).

    With no ground truth (G == 0) every candidate is background (index 0, never used)."""
    n = iou.shape[1]
    if iou.shape[0] == 0:
        return (torch.zeros(n, dtype=torch.long, device=iou.device),
                torch.zeros(n, dtype=torch.int8, device=iou.device))
    best, idx = iou.max(dim=0)
    labels = torch.full((n,), -1, dtype=torch.int8, device=iou.device)
    labels[best < low] = 0
    labels[best >= high] = 1
    if allow_low_quality:
        # each ground truth also claims the candidates it overlaps best (ties included)
        best_per_gt = iou.max(dim=1, keepdim=True).values
        gt_i, cand = torch.nonzero((iou == best_per_gt) & (best_per_gt > 0), as_tuple=True)
        labels[cand] = 1
    return idx, labels


def sample(labels: Tensor, num: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random balanced subset: (positive indices, negative indices) among labels 1 / 0."""
    pos = torch.nonzero(labels == 1).squeeze(1)
    neg = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(pos.numel(), int(num * positive_fraction))
    num_neg = min(neg.numel(), num - num_pos)
    pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
    return pos, neg


def in_ignore_regions(boxes: Tensor, regions: Tensor | None, iou: float) -> Tensor | None:
    """[N] bool: the candidates `boxes [N, 4]` whose best IoU with an ignore region `regions [K, 4]`
    is >= `iou`; None when there is no region (so callers keep their exact no-ignore path)."""
    if regions is None or regions.shape[0] == 0 or boxes.shape[0] == 0:
        return None
    return box_iou(regions.to(boxes.dtype), boxes).max(dim=0).values >= iou
