"""RoI classification losses with soft targets, box and mask losses.

Soft targets. Every ground truth g carries a target distribution `class_targets[g]` over the C
classes (default one-hot(label)); a RoI matched to g (foreground) takes that row by a row gather,
a background RoI takes the all-zero row. Then
- sigmoid: BCE-with-logits over the C class logits (the extra background logit is unused), the
  target of a background RoI being all zeros; with the federated loss only a class subset counts:
  every class with a non-zero target in the batch, plus classes sampled without replacement with
  probability ~ image_count^power until `num_fed` classes are chosen (Zhou et al., "Probabilistic
  two-stage detection"; detectron2's use_fed_loss). Sum over RoIs and classes / number of RoIs.
- softmax: cross-entropy over C+1 logits with target [class_targets[g], 0] for foreground and the
  background one-hot for background: -(t * log_softmax).sum(1), mean over RoIs.
With one-hot targets both equal the hard-label losses exactly (the tests check bit equality).
An optional per-RoI weight (the image's `loss_weight`) multiplies each RoI's term; the normaliser
(the number of RoIs) is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_class_targets(class_targets: Tensor, matched: Tensor, foreground: Tensor) -> Tensor:
    """Rows [n, C] of class_targets [G, C] for the matched ground truth of each RoI, zero for background."""
    n, c = matched.shape[0], class_targets.shape[1]
    if class_targets.shape[0] == 0:
        return class_targets.new_zeros((n, c))
    rows = class_targets[matched]
    return rows * foreground.unsqueeze(1).to(rows.dtype)


def federated_classes(targets: Tensor, class_weights: Tensor, num_fed: int,
                      generator: torch.Generator | None = None, present: Tensor | None = None) -> Tensor:
    """Boolean mask [C] of the classes in the federated loss: the `present` classes (a boolean mask
    [C]; default: every class with a non-zero target in `targets` [N, C]) always, plus classes
    sampled ~ class_weights until num_fed are chosen."""
    chosen = (targets > 0).any(dim=0) if present is None else present.to(device=targets.device, dtype=torch.bool)
    missing = num_fed - int(chosen.sum())
    if missing > 0:
        prob = class_weights.float().clone()
        prob[chosen] = 0
        available = int((prob > 0).sum())
        if available > 0:
            picked = torch.multinomial(prob, min(missing, available), replacement=False, generator=generator)
            chosen = chosen.clone()
            chosen[picked] = True
    return chosen


def labeled_classes(labels: list[Tensor], matched: list[Tensor], foreground: list[Tensor], num_classes: int) -> Tensor:
    """Boolean mask [C]: the classes of the ground truths (or pseudo-labels) matched to foreground RoIs,
    detectron2's "present" classes of the federated loss, whatever their smoothed targets spread."""
    present = torch.zeros(num_classes, dtype=torch.bool, device=labels[0].device if labels else None)
    for lab, m, f in zip(labels, matched, foreground):
        if lab.numel() and bool(f.any()):
            present[lab[m[f]]] = True
    return present


def sigmoid_classification_loss(logits: Tensor, targets: Tensor, roi_weights: Tensor | None = None,
                                fed_mask: Tensor | None = None) -> Tensor:
    """logits [N, C+1] (last = background, unused), targets [N, C] in [0, 1]."""
    num_classes = targets.shape[1]
    loss = F.binary_cross_entropy_with_logits(logits[:, :num_classes].float(), targets.float(), reduction="none")
    if fed_mask is not None:
        loss = loss * fed_mask.to(loss.dtype).unsqueeze(0)
    if roi_weights is not None:
        loss = loss * roi_weights.to(loss.dtype).unsqueeze(1)
    return loss.sum() / max(logits.shape[0], 1)


def softmax_classification_loss(logits: Tensor, targets: Tensor, foreground: Tensor,
                                roi_weights: Tensor | None = None) -> Tensor:
    """logits [N, C+1] (last = background), targets [N, C] (foreground rows), foreground [N] bool."""
    full = torch.cat([targets.float(), (~foreground).float().unsqueeze(1)], dim=1)
    logp = F.log_softmax(logits.float(), dim=1)
    per_roi = -(full * logp).sum(dim=1)
    if roi_weights is not None:
        per_roi = per_roi * roi_weights.to(per_roi.dtype)
    if per_roi.numel() == 0:
        return logits.sum() * 0.0
    # mean over RoIs through nll_loss's own reduction, so that one-hot targets give F.cross_entropy
    # bit for bit (a plain .mean() sums in another order and can differ in the last bit)
    return F.nll_loss((-per_roi).unsqueeze(1), torch.zeros_like(foreground, dtype=torch.long))


def box_regression_loss(deltas: Tensor, target_deltas: Tensor, foreground: Tensor,
                        roi_weights: Tensor | None = None) -> Tensor:
    """L1 over foreground RoIs' class-agnostic deltas [N, 4], divided by the number of RoIs N."""
    fg = torch.nonzero(foreground).squeeze(1)
    loss = F.l1_loss(deltas[fg].float(), target_deltas[fg].float(), reduction="none").sum(dim=1)
    if roi_weights is not None:
        loss = loss * roi_weights[fg].to(loss.dtype)
    return loss.sum() / max(deltas.shape[0], 1)


def mask_loss(mask_logits: Tensor, mask_targets: Tensor, roi_weights: Tensor | None = None) -> Tensor:
    """Per-pixel BCE of the ground-truth class channel [n, M, M], mean over RoIs and pixels;
    a zero (still differentiable) loss when there is no foreground RoI."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    loss = F.binary_cross_entropy_with_logits(mask_logits.float(), mask_targets.float(), reduction="none")
    loss = loss.mean(dim=(1, 2))
    if roi_weights is not None:
        loss = loss * roi_weights.to(loss.dtype)
    return loss.sum() / mask_logits.shape[0]
