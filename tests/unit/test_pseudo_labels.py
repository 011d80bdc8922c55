"""Pseudo-labels (labels.pseudo_labels): target modes, Eq. 5 (`calibration_correction`), filtering
on the raw or the corrected score, the ignore band, and alignment of a pseudo-label's box and mask
with the object in the weak and the strong view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import roi_align

from slsd_cli.data.transforms import WeakStrongTransform
from slsd_cli.labels.pseudo_labels import (PseudoLabelSpec, calibration_correction, class_targets,
                                           pseudo_label_targets)


def _probs(n: int = 6, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c), generator=g) * 0.9 + 0.05


def _delta(c: int = 5) -> torch.Tensor:
    return torch.tensor([-0.2, 0.1, -0.05, 0.3, 0.0])[:c]


# ------------------------------------------------------------------------------ target modes, Eq. 5


def test_onehot_mode_gives_hard_labels():
    probs = _probs()
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    spec = PseudoLabelSpec(targets="onehot", delta=_delta(), lam=2.0)  # Δ must not matter
    t = class_targets(probs, labels, spec)
    assert t.shape == probs.shape
    assert set(t.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(t.argmax(1), labels)
    assert torch.equal(t.sum(1), torch.ones(6))


def test_soft_mode_is_the_normalised_probability_vector():
    probs = _probs()
    labels = probs.argmax(1)
    t = class_targets(probs, labels, PseudoLabelSpec(targets="soft"))
    torch.testing.assert_close(t, probs / probs.sum(1, keepdim=True))
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    assert (t > 0).all() and (t < 1).all()  # soft, not hard


def test_lambda_zero_equals_plain_soft_targets():
    probs = _probs()
    labels = probs.argmax(1)
    plain = class_targets(probs, labels, PseudoLabelSpec(targets="soft"))
    for scope in ("all", "predicted"):
        spec = PseudoLabelSpec(targets="soft", delta=_delta(), lam=0.0, scope=scope)
        assert spec.corrects  # goes through Eq. 5, with λ = 0
        assert torch.equal(calibration_correction(probs, _delta(), 0.0, scope).vectors, probs)
        assert torch.equal(class_targets(probs, labels, spec), plain)
    # and λ > 0 does change them
    spec = PseudoLabelSpec(targets="soft", delta=_delta(), lam=2.0)
    assert not torch.allclose(class_targets(probs, labels, spec), plain)


def test_eq5_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.05], [0.1, 0.3, 0.6]])
    delta = torch.tensor([-0.2, 0.1, 0.3])
    out = calibration_correction(probs, delta, 2.0)
    torch.testing.assert_close(out.vectors, torch.tensor([[0.3, 0.4, 0.65], [0.0, 0.5, 1.0]]))  # clipped
    torch.testing.assert_close(out.targets, out.vectors / out.vectors.sum(1, keepdim=True))
    pred = calibration_correction(probs, delta, 1.0, scope="predicted").vectors
    torch.testing.assert_close(pred, torch.tensor([[0.5, 0.2, 0.05], [0.1, 0.3, 0.9]]))
    assert torch.equal(probs, torch.tensor([[0.7, 0.2, 0.05], [0.1, 0.3, 0.6]]))  # input untouched
    with pytest.raises(ValueError, match="scope"):
        calibration_correction(probs, delta, 1.0, scope="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Δ has 2 classes"):
        calibration_correction(probs, delta[:2], 1.0)


def test_eq5_all_scope_adds_lambda_delta_and_clips():
    probs = _probs()
    spec = PseudoLabelSpec(targets="soft", delta=_delta(), lam=2.0, scope="all")
    expected = (probs + 2.0 * _delta()).clamp(0, 1)
    torch.testing.assert_close(calibration_correction(probs, _delta(), 2.0).vectors, expected)
    t = class_targets(probs, probs.argmax(1), spec)
    torch.testing.assert_close(t, expected / expected.sum(1, keepdim=True))


def test_predicted_scope_changes_only_the_top_class_component():
    probs = _probs(n=8)
    top = probs.argmax(1)
    out = calibration_correction(probs, _delta(), 0.5, scope="predicted").vectors
    changed = out != probs
    rows = torch.arange(8)
    # every other component is bit-identical
    others = torch.ones_like(changed)
    others[rows, top] = False
    assert not changed[others].any()
    expected_top = (probs[rows, top] + 0.5 * _delta()[top]).clamp(0, 1)
    torch.testing.assert_close(out[rows, top], expected_top)
    assert changed[rows, top][_delta()[top] != 0].all()  # ... and the top one moved where Δ != 0


def test_one_normalisation_equals_renormalising_with_the_background_column_first():
    """A softmax head's background column only rescales a row: renormalising the [C + 1] vector and
    then its C foreground part gives the single normalisation's target."""
    probs = _probs() / _probs().sum(1, keepdim=True) * 0.7  # foreground mass 0.7, background 0.3
    full = torch.cat([probs, 1 - probs.sum(1, keepdim=True)], 1)
    shifted = full.clone()
    shifted[:, :5] += _delta()
    shifted = shifted.clamp(0, 1)
    two_step = (shifted / shifted.sum(1, keepdim=True))[:, :5]
    two_step = two_step / two_step.sum(1, keepdim=True)
    torch.testing.assert_close(calibration_correction(probs, _delta(), 1.0).targets, two_step)


def test_all_zero_row_falls_back_to_the_detected_class():
    probs = torch.tensor([[0.1, 0.05, 0.1], [0.2, 0.6, 0.2]])
    out = calibration_correction(probs, torch.tensor([-0.5, -0.5, -0.5]), 1.0, fallback=torch.tensor([2, 1]))
    assert torch.equal(out.vectors[0], torch.zeros(3))
    assert torch.equal(out.targets[0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(out.targets[1], torch.tensor([0.0, 1.0, 0.0]))  # only 0.6 - 0.5 left


# ------------------------------------------------------------------------------ filtering, stats


def _detections(n: int, c: int = 3, h: int = 40, w: int = 50) -> dict:
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 45.0, 38.0], [0.0, 0.0, 60.0, 50.0],
                          [5.0, 5.0, 5.4, 20.0], [30.0, 10.0, 40.0, 20.0]])[:n]
    scores = torch.tensor([0.9, 0.6, 0.55, 0.95, 0.3])[:n]
    labels = torch.tensor([0, 1, 2, 0, 1])[:n]
    probs = torch.full((n, c), 0.05)
    probs[torch.arange(n), labels] = scores
    return {"boxes": boxes, "scores": scores, "labels": labels, "probs": probs,
            "mask_probs": torch.full((n, 28, 28), 0.8)}


def test_threshold_clip_degenerate_and_stats():
    dets = [_detections(5), {k: v[:0] for k, v in _detections(5).items()}]
    spec = PseudoLabelSpec(targets="soft", threshold=0.5)
    targets, stats = pseudo_label_targets(dets, [(40, 50), (40, 50)], spec, groups=["r", "c", "f"])
    t = targets[0]
    # 0.3 is under the threshold; the 0.4-px-wide box is dropped; the third box is clipped to the image
    assert t["labels"].tolist() == [0, 1, 2]
    torch.testing.assert_close(t["boxes"][2], torch.tensor([0.0, 0.0, 50.0, 40.0]))
    assert t["masks"].shape == (3, 40, 50) and t["masks"].dtype == torch.uint8
    # a uniform 0.8 mask fills its box: the binary mask is the box's pixels
    assert int(t["masks"][0].sum()) == 18 * 27 and int(t["masks"][0, 3:30, 2:20].sum()) == 18 * 27
    assert t["class_targets"].shape == (3, 3)
    torch.testing.assert_close(t["class_targets"].sum(1), torch.ones(3))
    # the empty image: G = 0 targets of the right shapes
    e = targets[1]
    assert e["boxes"].shape == (0, 4) and e["masks"].shape == (0, 40, 50) and e["class_targets"].shape == (0, 3)
    s = stats.summary()
    assert s["pl_per_image"] == 1.5 and s["pl_empty_images"] == 0.5
    assert (s["pl_per_image_r"], s["pl_per_image_c"], s["pl_per_image_f"]) == (0.5, 0.5, 0.5)
    assert math.isclose(s["pl_confidence"], (0.9 + 0.6 + 0.55) / 3, rel_tol=1e-6)


def test_masks_are_binarised_at_half():
    det = _detections(1)
    det["mask_probs"] = torch.zeros(1, 28, 28)
    det["mask_probs"][0, :, :14] = 0.49
    det["mask_probs"][0, :, 14:] = 0.51
    targets, _ = pseudo_label_targets([det], [(40, 50)], PseudoLabelSpec(threshold=0.5))
    m = targets[0]["masks"][0]
    assert m[3:30, 2:11].sum() == 0 and m[3:30, 11:20].all()  # left half off, right half on (box x 2..20)


# ------------------------------------------------------------------------------ threshold_on, ignore band


def _rare_and_frequent() -> dict:
    """Box 0: the rare class 0 at raw score 0.4; box 1: the frequent class 1 at 0.6; box 2: class 2
    at 0.2; box 3: class 1 at 0.05."""
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 45.0, 38.0], [20.0, 20.0, 40.0, 36.0],
                          [30.0, 2.0, 48.0, 12.0]])
    labels = torch.tensor([0, 1, 2, 1])
    scores = torch.tensor([0.4, 0.6, 0.2, 0.05])
    probs = torch.full((4, 3), 0.05)
    probs[torch.arange(4), labels] = scores
    return {"boxes": boxes, "scores": scores, "labels": labels, "probs": probs,
            "mask_probs": torch.full((4, 28, 28), 0.8)}


DELTA_RCF = torch.tensor([0.1, -0.1, 0.0])  # rare under-confident, frequent over-confident


@pytest.mark.parametrize("scope", ["all", "predicted"])
def test_corrected_threshold_admits_an_under_confident_rare_box_and_drops_an_over_confident_one(scope):
    spec = dict(targets="soft", threshold=0.5, lam=2.0, delta=DELTA_RCF, scope=scope)
    groups = ["r", "f", "c"]
    raw, raw_stats = pseudo_label_targets([_rare_and_frequent()], [(40, 50)], PseudoLabelSpec(**spec), groups=groups)
    cor, cor_stats = pseudo_label_targets([_rare_and_frequent()], [(40, 50)],
                                          PseudoLabelSpec(**spec, threshold_on="corrected"), groups=groups)
    # raw: only the frequent 0.6 box clears 0.5; corrected: 0.4 + 2 * 0.1 = 0.6 (kept), 0.6 - 0.2 = 0.4 (dropped)
    assert raw[0]["labels"].tolist() == [1]
    assert cor[0]["labels"].tolist() == [0]
    torch.testing.assert_close(cor[0]["boxes"], _rare_and_frequent()["boxes"][:1])
    # the kept box's target is Eq. 5 of its vector, and the label is the corrected vector's arg-max
    expected = calibration_correction(_rare_and_frequent()["probs"][:1], DELTA_RCF, 2.0, scope).targets
    torch.testing.assert_close(cor[0]["class_targets"], expected)
    assert int(cor[0]["class_targets"].argmax()) == 0
    assert raw_stats.summary()["pl_per_image_r"] == 0.0 and cor_stats.summary()["pl_per_image_r"] == 1.0
    assert raw_stats.summary()["pl_per_image_f"] == 1.0 and cor_stats.summary()["pl_per_image_f"] == 0.0


def test_corrected_threshold_with_lambda_zero_equals_raw():
    dets = [_detections(5), _rare_and_frequent()]
    sizes = [(40, 50), (40, 50)]
    for targets in ("soft", "onehot"):
        base = dict(targets=targets, threshold=0.5, lam=0.0, delta=DELTA_RCF, ignore_low=0.1)
        raw, raw_stats = pseudo_label_targets(dets, sizes, PseudoLabelSpec(**base), groups=["r", "c", "f"])
        cor, cor_stats = pseudo_label_targets(dets, sizes, PseudoLabelSpec(**base, threshold_on="corrected"),
                                              groups=["r", "c", "f"])
        for a, b in zip(raw, cor):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
        assert raw_stats.summary() == cor_stats.summary()


def test_ignore_band_marks_detections_between_ignore_low_and_the_threshold():
    det = _rare_and_frequent()
    off, off_stats = pseudo_label_targets([det], [(40, 50)], PseudoLabelSpec(threshold=0.5), groups=["r", "f", "c"])
    assert off[0]["ignore_boxes"].shape == (0, 4) and off_stats.summary()["pl_ignore_per_image"] == 0.0
    on, stats = pseudo_label_targets([det], [(40, 50)], PseudoLabelSpec(threshold=0.5, ignore_low=0.1),
                                     groups=["r", "f", "c"])
    # 0.6 is a pseudo-label; 0.4 (rare) and 0.2 (common) are ignore regions; 0.05 is below the band
    assert on[0]["labels"].tolist() == [1]
    torch.testing.assert_close(on[0]["ignore_boxes"], det["boxes"][[0, 2]])
    s = stats.summary()
    assert (s["pl_ignore_per_image"], s["pl_ignore_per_image_r"], s["pl_ignore_per_image_c"],
            s["pl_ignore_per_image_f"]) == (2.0, 1.0, 1.0, 0.0)
    # the pseudo-labels themselves do not depend on the band
    for key in ("boxes", "labels", "masks", "class_targets", "scores"):
        assert torch.equal(on[0][key], off[0][key])
    # on the corrected score the band moves with Δ: the rare box is a pseudo-label, the frequent one
    # (0.6 - 0.2 = 0.4) an ignore region
    cor, _ = pseudo_label_targets([det], [(40, 50)], PseudoLabelSpec(threshold=0.5, ignore_low=0.1, lam=2.0,
                                                                      delta=DELTA_RCF, threshold_on="corrected"))
    assert cor[0]["labels"].tolist() == [0]
    torch.testing.assert_close(cor[0]["ignore_boxes"], det["boxes"][[1, 2]])


def test_score_floor_lets_predict_keep_every_detection_that_can_matter():
    assert PseudoLabelSpec(threshold=0.5).score_floor() == pytest.approx(0.5, abs=1e-5)
    assert PseudoLabelSpec(threshold=0.5, ignore_low=0.1).score_floor() == pytest.approx(0.1, abs=1e-5)
    spec = PseudoLabelSpec(threshold=0.5, lam=2.0, delta=DELTA_RCF, threshold_on="corrected")
    assert spec.score_floor() == pytest.approx(0.3, abs=1e-5)  # 0.5 - 2 * max(Δ)
    with pytest.raises(ValueError, match="ignore_low"):
        PseudoLabelSpec(threshold=0.5, ignore_low=0.7)


# ------------------------------------------------------------------------------ alignment in both views


def _object_sample(seed: int, size: int = 96) -> dict:
    """A dark textured background with one bright ellipse of known mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(30, 66, 2)
    ry, rx = rng.uniform(12, 22, 2)
    mask = (((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1).astype(np.uint8)
    image = rng.integers(10, 40, (3, size, size)).astype(np.uint8)
    image[:, mask.astype(bool)] = np.array([235, 200, 60], np.uint8)[:, None]
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return {"image": tv_tensors.Image(torch.from_numpy(image)),
            "boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(size, size)),
            "masks": tv_tensors.Mask(torch.from_numpy(mask[None])), "labels": torch.tensor([1]),
            "image_id": seed, "orig_size": (size, size), "scale": 1.0}


def _teacher_from_view(view: dict, num_classes: int = 3) -> dict:
    """A teacher whose detection is the weak view's object: its box, its mask resampled to 28x28 in
    box coordinates (as a mask head predicts), a confident probability vector."""
    boxes = view["boxes"].as_subclass(torch.Tensor).float()
    masks = view["masks"].as_subclass(torch.Tensor).float()[:, None]
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    mask_probs = roi_align(masks, rois, (28, 28), spatial_scale=1.0, sampling_ratio=2, aligned=True)[:, 0]
    probs = torch.full((len(boxes), num_classes), 0.02)
    probs[:, 1] = 0.9
    return {"boxes": boxes, "scores": torch.full((len(boxes),), 0.9), "labels": torch.ones(len(boxes), dtype=torch.long),
            "probs": probs, "mask_probs": mask_probs}


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_pseudo_label_lines_up_with_the_object_in_both_views(seed, flip):
    torch.manual_seed(seed)
    # weak view: LSJ with (flip = 1) or without a flip; strong view: colour jitter always,
    # grayscale / blur as the defaults; no erasing, whose noise patches would make "bright pixels"
    # ambiguous
    transform = WeakStrongTransform(64, scale_range=(0.7, 1.3), flip_prob=flip, color_jitter_prob=1.0, erasing=())
    weak, strong = transform(_object_sample(seed))
    weak_img = weak["image"].as_subclass(torch.Tensor)
    strong_img = strong["image"].as_subclass(torch.Tensor)
    assert weak_img.shape == strong_img.shape
    assert not torch.equal(weak_img, strong_img)  # the strong view really is augmented
    assert weak["masks"].shape[0] == 1, "the object must survive the crop for this test"
    h, w = weak_img.shape[-2:]

    targets, _ = pseudo_label_targets([_teacher_from_view(weak)], [(h, w)], PseudoLabelSpec(threshold=0.5))
    t = targets[0]
    assert len(t["boxes"]) == 1
    pseudo_mask = t["masks"][0]
    gt_mask = strong["masks"].as_subclass(torch.Tensor)[0]
    # the pseudo-mask is the object's mask in the strong view (no warping needed) ...
    assert _iou(pseudo_mask, gt_mask) > 0.9
    torch.testing.assert_close(t["boxes"][0], strong["boxes"].as_subclass(torch.Tensor)[0].float())
    # ... and the object's pixels of the strong image lie under it: split the strong image by
    # brightness (the object is much brighter than the background under any jitter)
    gray = strong_img.float().mean(0)
    bright = gray > (gray.max() + gray.min()) / 2
    inside = float((bright & pseudo_mask.bool()).sum())
    assert inside / float(bright.sum()) > 0.9   # bright pixels are under the mask
    assert inside / float(pseudo_mask.sum()) > 0.9  # the mask covers bright pixels
    ys, xs = torch.nonzero(bright, as_tuple=True)
    bright_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (bright_box - t["boxes"][0]).abs().max() <= 3.0
