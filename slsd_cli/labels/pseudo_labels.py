"""Pseudo-labels from the teacher's detections, and the calibration correction (paper §3.2, Eq. 5;
docs/method.md).

The teacher's final detections on the weak view of an unlabeled image become the student's targets
on the strong view (same geometry, so nothing is warped):

- box: the detection's box, in input pixels, clipped to the image;
- mask: the detection's 28x28 mask probabilities pasted into the image and binarised at
  `mask_threshold`;
- label: the detection's class (used by box regression matching and the class-specific mask head);
- class target, by mode:
  - `onehot`: one-hot of the detected class (the semi-supervised baseline of Table 1);
  - `soft`: Eq. 5 (`calibration_correction`): the teacher's per-class probability vector plus λΔ
    (Δ = 0 without a calibration file), clipped to [0, 1] and normalised once to a distribution.

Which detections become pseudo-labels: those whose *filter score* exceeds `threshold`. The filter
score is the teacher's detection score (`threshold_on="raw"`) or the Eq. 5-corrected probability of
the detected class (`threshold_on="corrected"`: λ then changes which boxes the student sees, not
only their targets). Detections whose filter score lies in `[ignore_low, threshold]` (and that are
not pseudo-labels) become *ignore regions* (`ignore_boxes [K, 4]`): the detector gives proposals and
anchors overlapping them no background loss, so an object the teacher half-sees is not taught as
background. `ignore_low=None` (the default) switches the band off. `background="teacher"` asks the
distillation phase for Soft Teacher's background weighting (the teacher scores the student's
background RoIs: `model.detector.CascadeMaskRCNN.background_scorers`).

An image whose teacher finds nothing above the threshold gets an empty target (G = 0): the student
then learns background everywhere on it (except in its ignore regions), and the losses stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, get_args

import torch

from slsd_cli.data.lvis import FREQUENCY_GROUPS as GROUPS
from slsd_cli.recipe import BackgroundMode, CorrectionScope, PseudoTargets, ThresholdOn
MIN_BOX_SIDE = 1.0  # pixels; a thinner pseudo-box (after clipping to the image) is not a usable target


@dataclass
class PseudoLabelSpec:
    """How teacher detections become student targets (the `distill:` recipe keys, resolved)."""

    targets: PseudoTargets = "soft"
    threshold: float = 0.5
    lam: float = 0.0
    scope: CorrectionScope = "all"
    delta: Optional[torch.Tensor] = None    # per-class CCECE Δ [C] in the model's contiguous class order
    mask_threshold: float = 0.5             # pasted mask probability above which a pixel is the object
    threshold_on: ThresholdOn = "raw"       # the score the threshold (and the ignore band) applies to
    ignore_low: Optional[float] = None      # lower edge of the ignore band; None = no ignore regions
    background: BackgroundMode = "hard"     # "teacher": background RoIs weighted by the teacher's background score

    def __post_init__(self) -> None:
        _check_choice("targets", self.targets, PseudoTargets)
        _check_choice("correction scope", self.scope, CorrectionScope)
        _check_choice("threshold_on", self.threshold_on, ThresholdOn)
        _check_choice("background", self.background, BackgroundMode)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"pseudo-label threshold must lie in [0, 1], got {self.threshold}")
        if self.ignore_low is not None and not 0.0 <= self.ignore_low <= self.threshold:
            raise ValueError(f"ignore_low must lie in [0, threshold = {self.threshold}], got {self.ignore_low}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask threshold must lie in (0, 1), got {self.mask_threshold}")

    @property
    def corrects(self) -> bool:
        """Eq. 5 applies (soft targets and a Δ; λ = 0 then leaves the vectors unchanged)."""
        return self.targets == "soft" and self.delta is not None

    @property
    def ignores(self) -> bool:
        """The ignore band is on (a non-empty `[ignore_low, threshold)`)."""
        return self.ignore_low is not None and self.ignore_low < self.threshold

    def score_floor(self) -> float:
        """The lowest raw teacher score that can still become a pseudo-label or an ignore region:
        the teacher's `predict` may drop everything below it (before NMS and the mask head)."""
        if not self.ignores and self.threshold_on == "raw":
            return self.threshold  # predict keeps scores > its threshold, as the filter does
        floor = self.ignore_low if self.ignores else self.threshold
        if self.threshold_on == "corrected":
            floor -= correction_reach(self.lam, self.delta)
        return max(floor - 1e-6, 0.0)  # a margin for the band's `>=` and for rounding in Eq. 5


def correction_reach(lam: float, delta: Optional[torch.Tensor]) -> float:
    """The most Eq. 5 can raise a class probability: λ·max(Δ, 0) (0 without a Δ). The one rule by which
    λ acts outside Eq. 5: with `threshold_on: corrected`, a raw score this far under the threshold can
    still pass it, so the teacher's score floor (`PseudoLabelSpec.score_floor`) is lowered by it."""
    if delta is None:
        return 0.0
    return lam * max(float(delta.max()), 0.0)


def _check_choice(name: str, value: str, choices) -> None:
    """A ValueError unless `value` is one of the recipe schema's choices `choices` (a Literal)."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {', '.join(get_args(choices))}, got {value!r}")


class Corrected(NamedTuple):
    """The output of Eq. 5 for N probability vectors over C classes."""

    vectors: torch.Tensor   # [N, C] `clip(y + λΔ, 0, 1)`: the corrected per-class probabilities
    targets: torch.Tensor   # [N, C] `vectors` normalised to a distribution: the student's class target


def calibration_correction(probs: torch.Tensor, delta: torch.Tensor, lam: float, scope: CorrectionScope = "all",
                           fallback: Optional[torch.Tensor] = None) -> Corrected:
    """Eq. 5, `ỹ = y + λΔ`, on the teacher's foreground probability vectors `probs [N, C]` (docs/method.md).

    `scope="all"` shifts every class component (the literal reading); `"predicted"` only each row's
    predicted class: `fallback[n]` (the detected class: a sigmoid head can detect one box as several
    classes, each detection is corrected on its own class), default the row's arg-max. The result is clipped to [0, 1] (`vectors`), then normalised once over the C classes
    into the target distribution (`targets`): a pseudo-box is foreground, so its target has no
    background mass, whatever the head (a softmax head's background column only rescales the row,
    which this one normalisation cancels). A row with no mass left after clipping becomes one-hot
    of `fallback[n]` (the detected class; default the row's arg-max of `probs`).
    """
    _check_choice("correction scope", scope, CorrectionScope)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got {tuple(probs.shape)}")
    delta = delta.to(device=probs.device, dtype=probs.dtype).reshape(-1)
    if delta.numel() != probs.shape[1]:
        raise ValueError(f"calibration Δ has {delta.numel()} classes, the teacher predicts {probs.shape[1]}")
    shift = lam * delta
    vectors = probs.clone()
    if fallback is None:
        fallback = probs.argmax(dim=1) if probs.shape[0] else torch.zeros(0, dtype=torch.long, device=probs.device)
    if scope == "all":
        vectors += shift
    elif probs.shape[0]:
        rows = torch.arange(probs.shape[0], device=probs.device)
        top = fallback.long()
        vectors[rows, top] += shift[top]
    vectors.clamp_(0.0, 1.0)
    total = vectors.sum(dim=1, keepdim=True)
    targets = vectors / total.clamp_min(torch.finfo(vectors.dtype).tiny)
    empty = total.squeeze(1) <= 0
    if bool(empty.any()):
        hard = torch.nn.functional.one_hot(fallback.long(), probs.shape[1]).to(vectors.dtype)
        targets = torch.where(empty[:, None], hard, targets)
    return Corrected(vectors, targets)


def class_targets(probs: torch.Tensor, labels: torch.Tensor, spec: PseudoLabelSpec) -> torch.Tensor:
    """The student's classification target [N, C] for detections with class vectors `probs` and
    detected classes `labels`: one-hot, or Eq. 5 (with Δ = 0 when there is no calibration)."""
    num_classes = probs.shape[1]
    if spec.targets == "onehot":
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(probs.dtype)
    return _corrected(probs, labels, spec).targets


def _corrected(probs: torch.Tensor, labels: torch.Tensor, spec: PseudoLabelSpec) -> Corrected:
    """Eq. 5 with the spec's Δ (zero when it has none: plain soft targets)."""
    delta = spec.delta if spec.delta is not None else probs.new_zeros(probs.shape[1])
    return calibration_correction(probs, delta, spec.lam, spec.scope, fallback=labels.long())


def _group_sums() -> dict[str, float]:
    return dict.fromkeys(GROUPS, 0.0)


@dataclass
class PseudoLabelStats:
    """What one batch of pseudo-labels looked like (summed; reduce across ranks by summing).

    The correction's effect, measured on the pseudo-labels the student is given (`mass_*`, `top_*`):
    per r/c/f group of *class components*, the target mass of the plain soft target (the teacher's
    normalised probability vector, `mass_before`), and how much Eq. 5 moved into and out of the
    group (`mass_in`, `mass_out`: per box the positive and negative parts of after - before, so that
    after = before + in - out); per r/c/f group of the *detected class*, the summed target of the
    detected class before and after."""

    images: int = 0
    labels: int = 0
    confidence_sum: float = 0.0
    per_group: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    empty_images: int = 0
    ignored: int = 0
    ignored_per_group: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    mass_before: dict[str, float] = field(default_factory=_group_sums)
    mass_in: dict[str, float] = field(default_factory=_group_sums)
    mass_out: dict[str, float] = field(default_factory=_group_sums)
    top_before: dict[str, float] = field(default_factory=_group_sums)
    top_after: dict[str, float] = field(default_factory=_group_sums)

    _COUNTS = ("per_group", "ignored_per_group")
    _SUMS = ("mass_before", "mass_in", "mass_out", "top_before", "top_after")

    def add(self, other: "PseudoLabelStats") -> None:
        self.images += other.images
        self.labels += other.labels
        self.confidence_sum += other.confidence_sum
        self.empty_images += other.empty_images
        self.ignored += other.ignored
        for name in self._COUNTS + self._SUMS:
            mine, theirs = getattr(self, name), getattr(other, name)
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value

    def as_tensor(self) -> torch.Tensor:
        values = [self.images, self.labels, self.confidence_sum, self.empty_images,
                  *(self.per_group.get(g, 0) for g in GROUPS), self.ignored,
                  *(self.ignored_per_group.get(g, 0) for g in GROUPS)]
        for name in self._SUMS:
            values += [getattr(self, name).get(g, 0.0) for g in GROUPS]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "PseudoLabelStats":
        # a checkpoint from before the ignore counts has 7 values, from before the correction sums 11
        v = [float(x) for x in values.tolist()]
        v += [0.0] * (11 + 3 * len(cls._SUMS) - len(v))
        n = [int(round(x)) for x in v[:11]]
        out = cls(images=n[0], labels=n[1], confidence_sum=v[2], empty_images=n[3],
                  per_group=dict(zip(GROUPS, n[4:7])), ignored=n[7], ignored_per_group=dict(zip(GROUPS, n[8:11])))
        for i, name in enumerate(cls._SUMS):
            setattr(out, name, dict(zip(GROUPS, v[11 + 3 * i:14 + 3 * i])))
        return out

    def add_correction(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                       class_groups: torch.Tensor) -> None:
        """Sum the correction's effect over pseudo-labels: `before`/`after` [G, C] targets without and
        with Eq. 5, `labels` [G] the detected classes, `class_groups` [C] each class's index in GROUPS."""
        if not labels.numel():
            return
        change = torch.zeros(before.shape[0], len(GROUPS), dtype=torch.float64, device=before.device)
        mass = torch.zeros_like(change)
        index = class_groups.to(before.device).long().expand_as(before)
        mass.scatter_add_(1, index, before.double())
        change.scatter_add_(1, index, (after - before).double())
        rows = torch.arange(labels.numel(), device=labels.device)
        top_b, top_a = before[rows, labels].double(), after[rows, labels].double()
        label_groups = class_groups.to(labels.device)[labels]
        for k, g in enumerate(GROUPS):
            self.mass_before[g] += float(mass[:, k].sum())
            self.mass_in[g] += float(change[:, k].clamp(min=0).sum())
            self.mass_out[g] += float((-change[:, k]).clamp(min=0).sum())
            here = label_groups == k
            self.top_before[g] += float(top_b[here].sum())
            self.top_after[g] += float(top_a[here].sum())

    def summary(self) -> dict[str, float]:
        """The logged figures: pseudo-labels and ignore regions per image (overall and per r/c/f
        group of the detected class), mean confidence of the pseudo-labels, share of empty images;
        per pseudo-label, the target mass per class group before Eq. 5 and moved in / out by it; per
        detected group, the mean target of the detected class before and after Eq. 5."""
        images = max(self.images, 1)
        labels = max(self.labels, 1)
        out = {
            "pl_per_image": self.labels / images,
            "pl_confidence": self.confidence_sum / self.labels if self.labels else 0.0,
            "pl_empty_images": self.empty_images / images,
            "pl_ignore_per_image": self.ignored / images,
        }
        for group in GROUPS:
            out[f"pl_per_image_{group}"] = self.per_group.get(group, 0) / images
            out[f"pl_ignore_per_image_{group}"] = self.ignored_per_group.get(group, 0) / images
            out[f"pl_mass_{group}_before"] = self.mass_before[group] / labels
            out[f"pl_mass_{group}_in"] = self.mass_in[group] / labels
            out[f"pl_mass_{group}_out"] = self.mass_out[group] / labels
            detected = max(self.per_group.get(group, 0), 1)
            out[f"pl_top_{group}_before"] = self.top_before[group] / detected
            out[f"pl_top_{group}_after"] = self.top_after[group] / detected
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
    `onehot` mode), `ignore_boxes` [K, 4] (the ignore regions; K = 0 with the band off), plus
    `scores` (the teacher's detection scores of the pseudo-labels, for logging only).
    """
    from slsd_cli.model.postprocess import paste_masks

    targets: list[dict] = []
    stats = PseudoLabelStats()
    class_groups = None if groups is None else torch.tensor([GROUPS.index(g) for g in groups], dtype=torch.long)
    for det, (h, w) in zip(detections, image_sizes, strict=True):
        h, w = int(h), int(w)
        canvas_h, canvas_w = (h, w) if mask_shape is None else (int(mask_shape[0]), int(mask_shape[1]))
        num_classes = det["probs"].shape[1]
        raw_boxes = det["boxes"].detach().float()
        boxes = raw_boxes.clone()
        # a box may poke out of the image by rounding: clip the target (masks paste in the raw box)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, float(w))
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, float(h))
        usable = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
        all_labels = det["labels"].detach().long()
        all_probs = det["probs"].detach().float()
        corrected = _corrected(all_probs, all_labels, spec) if spec.targets == "soft" else None
        if spec.threshold_on == "corrected" and corrected is not None:
            rows = torch.arange(all_labels.numel(), device=all_labels.device)
            score = corrected.vectors[rows, all_labels]  # Eq. 5-corrected probability of the detected class
        else:
            score = det["scores"].detach().float()
        keep = (score > spec.threshold) & usable
        ignore = (score >= spec.ignore_low) & usable & ~keep if spec.ignores else torch.zeros_like(keep)
        labels = all_labels[keep]
        device = boxes.device
        masks = torch.zeros((int(keep.sum()), canvas_h, canvas_w), dtype=torch.uint8, device=device)
        if labels.numel():
            pasted = paste_masks(det["mask_probs"][keep].detach().float(), raw_boxes[keep], h, w)
            masks[:, :h, :w] = (pasted > spec.mask_threshold).to(torch.uint8)
        if corrected is None:
            soft = class_targets(all_probs[keep], labels, spec)
        else:
            soft = corrected.targets[keep]
        scores = det["scores"][keep].detach().float()
        targets.append({
            "boxes": boxes[keep],
            "labels": labels,
            "masks": masks,
            "class_targets": soft.reshape(-1, num_classes),
            "ignore_boxes": boxes[ignore],
            "scores": scores,
        })
        stats.images += 1
        stats.labels += int(labels.numel())
        stats.confidence_sum += float(scores.sum())
        stats.empty_images += int(labels.numel() == 0)
        stats.ignored += int(ignore.sum())
        if class_groups is not None and corrected is not None:
            plain = all_probs[keep] / all_probs[keep].sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            stats.add_correction(plain, soft, labels, class_groups)
        if groups is not None:
            for label in labels.tolist():
                stats.per_group[groups[label]] = stats.per_group.get(groups[label], 0) + 1
            for label in all_labels[ignore].tolist():
                stats.ignored_per_group[groups[label]] = stats.ignored_per_group.get(groups[label], 0) + 1
    return targets, stats
