"""Eq. 5 reaches the student through `slsd distill`: one in-process iteration on a tiny synthetic
set, with a calibration whose Δ is large for two classes. The class targets the student's forward
receives for the unlabeled images must be `clip(p + λΔ) / sum` of the teacher's probability vectors
(the vectors its `predict` returned in that iteration), not the λ = 0 targets `p / sum`. A second
run checks that the corrected threshold, the ignore band and the soft background reach the student."""

from __future__ import annotations

import json

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.model.detector import CascadeMaskRCNN
from tests.helpers.teacher import confident_teacher

FAST = ["data.image_size=64", "model.image_size=64", "model.max_detections=3", "model.rpn_post_nms_topk_train=64",
        "model.rpn_post_nms_topk_test=64", "model.rois_per_image=32", "model.fpn_channels=32",
        "model.box_head_fc_dim=128", "model.mask_head_channels=32", "train.iterations=1",
        "train.batch_per_process=2", "train.micro_batch=2", "train.warmup_iters=0", "train.log_every=1"]
DELTA = [-0.3, 0.4, 0.0]  # class 0 over-confident, class 1 under-confident
THRESHOLD = 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_eq5")
    # a confident teacher: class 0 everywhere, class 1 second
    ids = confident_teacher(root / "teacher", tiny_synth / "train.json", FAST, {0: 3.0, 1: -1.0})
    calibration = root / "calibration.json"
    calibration.write_text(json.dumps({"per_class": {str(i): {"delta": d} for i, d in zip(ids, DELTA)}}))
    return {"root": root, "teacher": root / "teacher", "pool": tiny_synth / "pool.json", "calibration": calibration}


def _one_iteration(setup, monkeypatch, lam: float, name: str, *extra: str) -> tuple[list[dict], list[dict]]:
    """(the teacher's detections on the unlabeled images, the unlabeled images' student targets)."""
    predictions, forwards = [], []
    real_predict, real_forward = CascadeMaskRCNN.predict, CascadeMaskRCNN.forward

    def predict(self, *args, **kwargs):
        out = real_predict(self, *args, **kwargs)
        predictions.append(out)
        return out

    def forward(self, images, image_sizes, targets=None):
        forwards.append(targets)
        return real_forward(self, images, image_sizes, targets)

    monkeypatch.setattr(CascadeMaskRCNN, "predict", predict)
    monkeypatch.setattr(CascadeMaskRCNN, "forward", forward)
    args = ["distill", "synthetic_tiny_distill", *FAST, *extra, f"distill.threshold={THRESHOLD}", "--teacher",
            str(setup["teacher"]), "--unlabeled", str(setup["pool"]), "--calibration", str(setup["calibration"]),
            "--lambda", str(lam), "--out-dir", str(setup["root"] / name)]
    assert main(args) == 0
    monkeypatch.undo()
    assert len(predictions) == 1 and len(forwards) == 1  # one teacher pass, one student forward
    unlabeled = forwards[0][2:]  # 2 labeled images, then the 2 unlabeled ones
    assert len(unlabeled) == 2 and len(predictions[0]) == 2
    return predictions[0], unlabeled


def _kept(det: dict, size: int = 64) -> torch.Tensor:
    boxes = det["boxes"].clamp(0, size)
    return (det["scores"] > THRESHOLD) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)


def test_the_student_is_taught_eq5_of_the_teachers_probabilities(setup, monkeypatch):
    lam = 0.5
    detections, targets = _one_iteration(setup, monkeypatch, lam, "lam")
    delta = torch.tensor(DELTA)
    taught = 0
    for det, target in zip(detections, targets):
        probs = det["probs"][_kept(det)].float()
        corrected = (probs + lam * delta).clamp(0, 1)
        torch.testing.assert_close(target["class_targets"], corrected / corrected.sum(1, keepdim=True))
        # ... which is not what λ = 0 (the plain soft targets) teaches: Δ moved mass from the
        # over-confident class 0 to class 1
        plain = probs / probs.sum(1, keepdim=True)
        if len(probs):
            assert (target["class_targets"][:, 1] - plain[:, 1] > 0.1).all()
            assert (target["class_targets"][:, 0] < plain[:, 0]).all()
        taught += len(probs)
    assert taught >= 2  # the teacher's confident boxes did reach the student


def test_corrected_threshold_ignore_band_and_soft_background_reach_the_student(setup, monkeypatch):
    lam = 2.0  # the over-confident class-0 boxes (0.95 - 0.6) fall from pseudo-labels into the ignore band
    detections, targets = _one_iteration(setup, monkeypatch, lam, "options", "distill.threshold_on=corrected",
                                         "distill.ignore_low=0.02", "distill.background=teacher",
                                         "model.max_detections=12")
    metrics = [json.loads(line) for line in (setup["root"] / "options" / "metrics.jsonl").read_text().splitlines()]
    assert all(v == v for v in metrics[-1]["losses"].values())  # finite (no NaN)
    delta = torch.tensor(DELTA)
    regions = 0
    for det, target in zip(detections, targets):
        corrected = (det["probs"] + lam * delta).clamp(0, 1)
        score = corrected[torch.arange(len(det["labels"])), det["labels"]]
        boxes = det["boxes"].clamp(0, 64)
        usable = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        keep = (score > THRESHOLD) & usable
        band = (score >= 0.02) & ~keep & usable
        torch.testing.assert_close(target["boxes"], boxes[keep])
        torch.testing.assert_close(target["ignore_boxes"], boxes[band])
        regions += int(band.sum())
        assert callable(target["background_scorer"])
        assert target["background_scorer"](boxes).shape == (len(boxes),)
    assert regions >= 1 and metrics[-1]["pl_ignore_per_image"] == regions / 2
