"""Eq. 5 end to end on built detections: a rare class whose scores sit below its precision comes out
under-confident (Δ̂ > 0 from `slsd calibrate`'s default estimator) and Eq. 5 raises its target under
both readings; the measured decomposition of the correction (mass per group, detected-class target);
the premise check's intervals and verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slsd_cli.data.lvis import load_annotations
from slsd_cli.demo.premise import delta_intervals, premise_verdict
from slsd_cli.labels.calibration import compute_calibration
from slsd_cli.labels.pseudo_labels import (GROUPS, PseudoLabelSpec, PseudoLabelStats, calibration_correction,
                                           pseudo_label_targets)
from slsd_cli.stats import Interval

W = H = 64
# class 0 rare, 1 common, 2 frequent
CATEGORIES = [{"id": 1, "name": "rare", "frequency": "r"}, {"id": 2, "name": "common", "frequency": "c"},
              {"id": 3, "name": "frequent", "frequency": "f"}]


def _box(i: int) -> list[float]:
    return [4.0 + 6 * (i % 8), 4.0 + 6 * (i // 8 % 8), 20.0, 20.0]


def _built(tmp_path, images: int = 12):
    """Every image holds one object of each class. The rare class is detected exactly on its objects
    with score 0.3 (precision 1: under-confident); the frequent class is detected on its objects with
    score 0.9 and twice more on empty spots (precision 1/3: over-confident); the common class at 0.5
    with half of its detections wrong."""
    imgs, anns, dets = [], [], []
    for i in range(images):
        imgs.append({"id": i + 1, "width": W, "height": H, "file_name": f"{i}.png", "neg_category_ids": [],
                     "not_exhaustive_category_ids": []})
        for c, (x, y) in zip((1, 2, 3), ((2.0, 2.0), (40.0, 2.0), (2.0, 40.0))):
            box = [x, y, 20.0, 20.0]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": box, "area": 400.0,
                         "segmentation": [[x, y, x + 20, y, x + 20, y + 20, x, y + 20]]})
        dets.append({"image_id": i + 1, "category_id": 1, "bbox": [2.0, 2.0, 20.0, 20.0], "score": 0.3})
        dets.append({"image_id": i + 1, "category_id": 3, "bbox": [2.0, 40.0, 20.0, 20.0], "score": 0.9})
        dets += [{"image_id": i + 1, "category_id": 3, "bbox": [40.0, 40.0, 10.0 + k, 10.0], "score": 0.9}
                 for k in (0, 8)]
        dets.append({"image_id": i + 1, "category_id": 2,
                     "bbox": [40.0, 2.0, 20.0, 20.0] if i % 2 else [30.0, 40.0, 8.0, 8.0], "score": 0.5})
    ann_path = tmp_path / "calib.json"
    ann_path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATEGORIES}))
    det_path = tmp_path / "detections.json"
    det_path.write_text(json.dumps(dets))
    return ann_path, det_path, dets


def test_under_confident_rare_class_is_raised_under_both_scopes(tmp_path):
    ann_path, _, dets = _built(tmp_path)
    calibration = compute_calibration(dets, load_annotations(ann_path))
    delta = torch.tensor([calibration["per_class"][str(c["id"])]["delta"] for c in CATEGORIES])
    assert delta[0] > 0.5  # rare: precision 1 at score 0.3 (under-confident), whatever the shrinkage
    assert delta[2] < -0.3  # frequent: precision 1/3 at score 0.9 (over-confident)
    # a rare box the teacher scores 0.3, with some mass on the other classes
    probs = torch.tensor([[0.3, 0.1, 0.2]])
    plain = probs / probs.sum()
    for scope in ("all", "predicted"):
        out = calibration_correction(probs, delta, lam=2.0, scope=scope, fallback=torch.tensor([0]))
        assert out.vectors[0, 0] > probs[0, 0]
        assert out.targets[0, 0] > plain[0, 0], scope
        assert out.targets.sum().item() == pytest.approx(1.0)


def test_predicted_scope_corrects_the_detected_class():
    """A sigmoid head can detect one box as a class other than its arg-max: `predicted` shifts that class."""
    probs = torch.tensor([[0.6, 0.4, 0.0]])
    delta = torch.tensor([0.0, 0.2, -0.1])
    out = calibration_correction(probs, delta, lam=1.0, scope="predicted", fallback=torch.tensor([1]))
    assert torch.allclose(out.vectors, torch.tensor([[0.6, 0.6, 0.0]]))
    arg_max = calibration_correction(probs, delta, lam=1.0, scope="predicted")
    assert torch.allclose(arg_max.vectors, probs)  # the arg-max (class 0) has Δ = 0


def _detections(probs: torch.Tensor, labels: list[int]) -> dict:
    n = probs.shape[0]
    boxes = torch.tensor([[4.0 + 10 * i, 4.0, 24.0 + 10 * i, 24.0] for i in range(n)])
    return {"boxes": boxes, "scores": probs[torch.arange(n), torch.tensor(labels)], "labels": torch.tensor(labels),
            "probs": probs, "mask_probs": torch.ones(n, 28, 28)}


def test_correction_effect_adds_up_to_the_targets():
    probs = torch.tensor([[0.7, 0.1, 0.1], [0.1, 0.2, 0.6], [0.05, 0.8, 0.3]])
    delta = torch.tensor([0.1, -0.05, -0.2])
    groups = ["r", "c", "f"]
    for scope in ("all", "predicted"):
        spec = PseudoLabelSpec(targets="soft", threshold=0.5, lam=2.0, scope=scope, delta=delta)
        targets, stats = pseudo_label_targets([_detections(probs, [0, 2, 1])], [(64, 64)], spec, groups=groups)
        soft = targets[0]["class_targets"]
        plain = probs / probs.sum(dim=1, keepdim=True)
        summary = stats.summary()
        for k, g in enumerate(GROUPS):
            after = summary[f"pl_mass_{g}_before"] + summary[f"pl_mass_{g}_in"] - summary[f"pl_mass_{g}_out"]
            assert summary[f"pl_mass_{g}_before"] == pytest.approx(float(plain[:, k].mean()), abs=1e-6)
            assert after == pytest.approx(float(soft[:, k].mean()), abs=1e-6)
            box = [0, 2, 1].index(k)  # the one box detected as class k
            assert summary[f"pl_top_{g}_before"] == pytest.approx(float(plain[box, k]), abs=1e-6)
            assert summary[f"pl_top_{g}_after"] == pytest.approx(float(soft[box, k]), abs=1e-6)
        assert summary["pl_top_r_after"] > summary["pl_top_r_before"]  # Δ_r > 0 raises the rare box
        assert summary["pl_top_f_after"] < summary["pl_top_f_before"]
        back = PseudoLabelStats.from_tensor(stats.as_tensor())
        assert back.summary() == pytest.approx(summary)
    old = PseudoLabelStats.from_tensor(stats.as_tensor()[:11])  # a checkpoint from before the correction sums
    assert old.labels == 3 and old.mass_before == dict.fromkeys(GROUPS, 0.0)


def test_plain_soft_targets_move_no_mass():
    probs = torch.tensor([[0.7, 0.1, 0.1]])
    spec = PseudoLabelSpec(targets="soft", threshold=0.5, lam=0.0, delta=torch.tensor([0.1, 0.1, -0.3]))
    _, stats = pseudo_label_targets([_detections(probs, [0])], [(64, 64)], spec, groups=["r", "c", "f"])
    summary = stats.summary()
    assert all(summary[f"pl_mass_{g}_in"] == summary[f"pl_mass_{g}_out"] == 0.0 for g in GROUPS)
    assert summary["pl_top_r_before"] == pytest.approx(summary["pl_top_r_after"])


def test_premise_intervals_and_verdict(tmp_path):
    ann_path, det_path, _ = _built(tmp_path, images=10)
    intervals = delta_intervals(ann_path, det_path, replicates=20, seed=0)
    assert intervals["r"].mean > 0.5 and intervals["f"].mean < -0.3
    assert intervals["r"].low <= intervals["r"].mean <= intervals["r"].high
    assert premise_verdict(intervals).startswith("The paper's premise holds here")
    flipped = {"r": Interval(-0.02, -0.03, -0.01, 20), "c": intervals["c"], "f": Interval(0.01, -0.01, 0.03, 20)}
    text = premise_verdict(flipped)
    assert text.startswith("The paper's premise does not hold here") and "rare classes are not" in text
    tendency = {"r": Interval(0.02, -0.01, 0.05, 20), "c": intervals["c"], "f": Interval(-0.01, -0.03, 0.01, 20)}
    assert "only as a tendency" in premise_verdict(tendency)
