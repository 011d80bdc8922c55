"""Pseudo-labels from the teacher's detections (paper §3.2, DESIGN §2 Eq. 5).

The teacher's final detections on the weak view of an unlabeled image, those scoring above
`threshold`, become the student's targets on the strong view (same geometry, so nothing is warped):

- box: the detection's box, in input pixels;
- mask: the detection's 28x28 mask probabilities pasted into the image and binarised at 0.5
  (`mask_threshold`);
- label: the detection's class (used by box regression matching and the class-specific mask head);
- class target, by mode:
  - `onehot`: one-hot of the detected class (the semi-supervised baseline of Table 1);
  - `soft`: the teacher's per-class probability vector, normalised to a distribution (what the
    soft-target classification losses expect);
  - `soft` with a calibration Δ: Eq. 5, `y + λΔ` clipped to [0, 1] (renormalised for a softmax head)
    by `labels.calibration.correct_targets`, over every class (`scope=all`) or only the top class of
    the vector (`scope=predicted`; the detected class unless a sigmoid head put the same box above
    the threshold for two classes), then normalised to a distribution.

The threshold applies to the teacher's own detection score (before correction), so λ changes what
the student is taught about a box, never which boxes it is taught.

An image whose teacher finds nothing above the threshold gets an empty target (G = 0): the student
then learns background everywhere on it, and the losses stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

TargetMode = Literal["onehot", "soft"]
Scope = Literal["all", "predicted"]
MIN_BOX_SIDE = 1.0  # pixels; a thinner pseudo-box (after clipping to the image) is not a usable target


@dataclass
class PseudoLabelSpec:
    """How teacher detections become student targets (the `distill:` recipe keys, resolved)."""

    targets: TargetMode = "soft"
    threshold: float = 0.5
    lam: float = 0.0
    scope: Scope = "all"
    softmax: bool = False                   # the classifier is a softmax head (renormalise after Eq. 5)
    delta: Optional[torch.Tensor] = None    # per-class CCECE Δ [C] in the model's contiguous class order
    mask_threshold: float = 0.5             # pasted mask probability above which a pixel is the object

    def __post_init__(self) -> None:
        if self.targets not in ("onehot", "soft"):
            raise ValueError(f"targets must be 'onehot' or 'soft', got {self.targets!r}")
        if self.scope not in ("all", "predicted"):
            raise ValueError(f"correction scope must be 'all' or 'predicted', got {self.scope!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"pseudo-label threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask threshold must lie in (0, 1), got {self.mask_threshold}")

    @property
    def corrects(self) -> bool:
        """Eq. 5 applies (soft targets and a Δ; λ = 0 then leaves the vectors unchanged)."""
        return self.targets == "soft" and self.delta is not None


def corrected_probs(probs: torch.Tensor, spec: PseudoLabelSpec) -> torch.Tensor:
    """Eq. 5 on the teacher's foreground probability vectors [N, C]: `y + λΔ` clipped to [0, 1] over
    every class (`scope=all`) or the top class of each row (`scope=predicted`). For a softmax head the
    background column `1 - sum(y)` joins the vector so the row is renormalised as a whole
    (`labels.calibration.correct_targets`); the [N, C] foreground part is returned. Without Δ the
    vectors are returned as they are."""
    if not spec.corrects or probs.shape[0] == 0:
        return probs
    from slsd_cli.labels.calibration import correct_targets

    delta = spec.delta.to(device=probs.device, dtype=probs.dtype)
    if delta.shape != probs.shape[1:]:
        raise ValueError(f"calibration Δ has {delta.numel()} classes, the teacher predicts {probs.shape[1]}")
    if spec.softmax:
        background = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0)
        full = correct_targets(torch.cat([probs, background], dim=1), delta, spec.lam, spec.scope, softmax=True)
        return full[:, :probs.shape[1]]
    return correct_targets(probs, delta, spec.lam, spec.scope, softmax=False)


def to_distribution(vectors: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows normalised to sum to 1; a row with no mass (all zero after clipping) becomes one-hot of
    `fallback` (the detected class) instead of a division by zero."""
    if vectors.shape[0] == 0:
        return vectors
    vectors = vectors.clamp_min(0)
    total = vectors.sum(dim=1, keepdim=True)
    empty = total.squeeze(1) <= 0
    out = vectors / total.clamp_min(torch.finfo(vectors.dtype).tiny)
    if empty.any():
        hard = torch.nn.functional.one_hot(fallback, vectors.shape[1]).to(vectors.dtype)
        out = torch.where(empty[:, None], hard, out)
    return out


def class_targets(probs: torch.Tensor, labels: torch.Tensor, spec: PseudoLabelSpec) -> torch.Tensor:
    """The student's classification target [N, C] for detections with class vectors `probs` and
    detected classes `labels`."""
    num_classes = probs.shape[1]
    if spec.targets == "onehot":
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(probs.dtype)
    return to_distribution(corrected_probs(probs, spec), labels.long())


@dataclass
class PseudoLabelStats:
    """What one batch of pseudo-labels looked like (summed; reduce across ranks by summing)."""

    images: int = 0
    labels: int = 0
    confidence_sum: float = 0.0
    per_group: dict[str, int] = field(default_factory=lambda: {"r": 0, "c": 0, "f": 0})
    empty_images: int = 0

    def add(self, other: "PseudoLabelStats") -> None:
        self.images += other.images
        self.labels += other.labels
        self.confidence_sum += other.confidence_sum
        self.empty_images += other.empty_images
        for key, value in other.per_group.items():
            self.per_group[key] = self.per_group.get(key, 0) + value

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.images, self.labels, self.confidence_sum, self.empty_images,
                             self.per_group.get("r", 0), self.per_group.get("c", 0), self.per_group.get("f", 0)],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "PseudoLabelStats":
        v = [float(x) for x in values.tolist()]
        return cls(images=int(v[0]), labels=int(v[1]), confidence_sum=v[2], empty_images=int(v[3]),
                   per_group={"r": int(v[4]), "c": int(v[5]), "f": int(v[6])})

    def summary(self) -> dict[str, float]:
        """The logged figures: pseudo-labels per image (overall and per r/c/f group), mean confidence."""
        images = max(self.images, 1)
        out = {
            "pl_per_image": self.labels / images,
            "pl_confidence": self.confidence_sum / self.labels if self.labels else 0.0,
            "pl_empty_images": self.empty_images / images,
        }
        for group in ("r", "c", "f"):
            out[f"pl_per_image_{group}"] = self.per_group.get(group, 0) / images
        return out


def pseudo_label_targets(
    detections: Sequence[dict],
    image_sizes: Sequence[tuple[int, int]],
    spec: PseudoLabelSpec,
    mask_shape: Optional[tuple[int, int]] = None,
    groups: Optional[Sequence[str]] = None,
) -> tuple[list[dict], PseudoLabelStats]:
    """Student targets from the teacher's `predict` output, one dict per image.

    `detections[i]` holds `boxes [N,4]` (input pixels), `scores [N]`, `labels [N]`, `probs [N,C]`
    and `mask_probs [N,28,28]`; `image_sizes[i]` is the (h, w) of the image's valid region. Masks are
    pasted into a canvas of `mask_shape` (h, w), default the image size (use the padded batch size
    when the model expects batch-sized masks); pixels outside the image stay 0. `groups` gives
    the r/c/f group of each class for the statistics.

    Each target holds `boxes`, `labels`, `masks` (uint8) and `class_targets` [G, C] (a one-hot row in
    `onehot` mode), plus `scores` (the teacher's detection scores, for logging only).
    """
    from slsd_cli.model.postprocess import paste_masks

    targets: list[dict] = []
    stats = PseudoLabelStats()
    for det, (h, w) in zip(detections, image_sizes, strict=True):
        h, w = int(h), int(w)
        canvas_h, canvas_w = (h, w) if mask_shape is None else (int(mask_shape[0]), int(mask_shape[1]))
        num_classes = det["probs"].shape[1]
        raw_boxes = det["boxes"].detach().float()
        boxes = raw_boxes.clone()
        # a box may poke out of the image by rounding: clip the target (masks paste in the raw box)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, float(w))
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, float(h))
        keep = (det["scores"] > spec.threshold) & (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) \
            & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
        boxes = boxes[keep]
        scores = det["scores"][keep].detach().float()
        labels = det["labels"][keep].detach().long()
        probs = det["probs"][keep].detach().float()
        device = boxes.device
        masks = torch.zeros((boxes.shape[0], canvas_h, canvas_w), dtype=torch.uint8, device=device)
        if boxes.shape[0]:
            pasted = paste_masks(det["mask_probs"][keep].detach().float(), raw_boxes[keep], h, w)
            masks[:, :h, :w] = (pasted > spec.mask_threshold).to(torch.uint8)
        targets.append({
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "class_targets": class_targets(probs, labels, spec).reshape(-1, num_classes),
            "scores": scores,
        })
        stats.images += 1
        stats.labels += int(labels.numel())
        stats.confidence_sum += float(scores.sum())
        stats.empty_images += int(labels.numel() == 0)
        if groups is not None:
            for label in labels.tolist():
                stats.per_group[groups[label]] = stats.per_group.get(groups[label], 0) + 1
    return targets, stats
