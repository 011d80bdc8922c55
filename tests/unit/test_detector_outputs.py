"""What the detector's heads hand on, checked against values worked out by hand:

- cascade stage k decodes (and, in training, encodes its targets) with `cascade_box_weights[k]`,
  the order released detectors are converted in;
- the class whose logit is raised is the class `predict` reports, and `to_results` maps it to
  `category_ids[i]` (no offset between the C class columns, the background column and the ids);
- a score threshold above 0 keeps exactly the detections scoring above it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from slsd_cli.model import build_detector, tiny_cnn_config, to_results
from slsd_cli.model import cascade as cascade_module

SIZE = 64
CATEGORY_IDS = [10, 20, 30]  # not contiguous: an index / id mix-up shows
PROPOSAL = [10.0, 12.0, 40.0, 30.0]
DELTA = [1.0, -2.0, 0.5, 1.0]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(classifier: str = "sigmoid", **overrides):
    torch.manual_seed(0)
    cfg = tiny_cnn_config(image_size=SIZE, rois_per_image=32, rpn_post_nms_topk_test=20, **overrides)
    cfg = dataclasses.replace(cfg, classifier=classifier)
    categories = [{"id": c, "name": f"c{c}", "image_count": 5} for c in CATEGORY_IDS]
    return build_detector(cfg, categories).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 255


def _decode(delta: list[float], box: list[float], weights: list[float]) -> list[float]:
    """The R-CNN box transform written out."""
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + w / 2 + delta[0] / wx * w, box[1] + h / 2 + delta[1] / wy * h
    w, h = w * math.exp(delta[2] / ww), h * math.exp(delta[3] / wh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _encode(box: list[float], target: list[float], weights: list[float]) -> list[float]:
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    tw, th = target[2] - target[0], target[3] - target[1]
    return [wx * ((target[0] + tw / 2) - (box[0] + w / 2)) / w, wy * ((target[1] + th / 2) - (box[1] + h / 2)) / h,
            ww * math.log(tw / w), wh * math.log(th / h)]


def test_stage_k_decodes_with_its_own_box_weights(images):
    model = _model()
    heads = model.roi_heads
    weights = model.cfg.cascade_box_weights
    assert len({tuple(w) for w in weights}) == len(weights) == 3  # distinct, so an order mix-up shows
    with torch.no_grad():
        features = model.backbone(model.preprocess(images[:1], [(SIZE, SIZE)]))[:4]
        for k in range(len(heads.stages)):
            for j, stage in enumerate(heads.stages):  # only stage k moves the box
                stage.bbox_pred.weight.zero_()
                stage.bbox_pred.bias.copy_(torch.tensor(DELTA if j == k else [0.0] * 4))
            boxes, _ = heads.forward_test(features, [torch.tensor([PROPOSAL])], [(SIZE, SIZE)])
            expected = torch.tensor([_decode(DELTA, PROPOSAL, weights[k])])
            torch.testing.assert_close(boxes[0], expected, atol=1e-4, rtol=0, msg=f"stage {k}")


def test_stage_k_trains_on_targets_encoded_with_its_box_weights(images, monkeypatch):
    model = _model().train()
    heads = model.roi_heads
    gt = [6.0, 8.0, 38.0, 40.0]
    target = {"boxes": torch.tensor([gt]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, SIZE, SIZE, dtype=torch.uint8)}
    seen, pooled = [], []
    real_loss, real_pool = cascade_module.box_regression_loss, heads.pooler.forward

    def box_loss(deltas, target_deltas, foreground, roi_weights=None):
        seen.append((deltas.detach().clone(), target_deltas.clone(), foreground.clone()))
        return real_loss(deltas, target_deltas, foreground, roi_weights)

    def pool(features, boxes):
        pooled.append(torch.cat(boxes).clone())
        return real_pool(features, boxes)

    monkeypatch.setattr(cascade_module, "box_regression_loss", box_loss)
    monkeypatch.setattr(heads.pooler, "forward", pool)
    targets = model._check_targets([target], [(SIZE, SIZE)], images.device)
    proposals = torch.tensor([[7.0, 9.0, 37.0, 41.0], [4.0, 6.0, 36.0, 36.0], [30.0, 30.0, 60.0, 60.0]])
    torch.manual_seed(1)
    with torch.no_grad():
        features = model.backbone(model.preprocess(images[:1], [(SIZE, SIZE)]))[:4]
        heads.forward_train(features, [proposals], targets, [(SIZE, SIZE)])
    weights = model.cfg.cascade_box_weights
    assert len(seen) == len(pooled) == 3
    for k, (deltas, target_deltas, foreground) in enumerate(seen):
        rois = pooled[k]
        assert int(foreground.sum()) >= 2, k  # the ground truth itself and its close proposals
        for r in torch.nonzero(foreground).squeeze(1).tolist():
            expected = torch.tensor(_encode(rois[r].tolist(), gt, weights[k]))
            torch.testing.assert_close(target_deltas[r], expected, atol=1e-4, rtol=1e-4, msg=f"stage {k}")
        if k + 1 < len(seen):  # the next stage's RoIs: this stage's deltas decoded with its weights
            expected = torch.tensor([_decode(d, b, weights[k]) for d, b in zip(deltas.tolist(), rois.tolist())])
            torch.testing.assert_close(pooled[k + 1], expected.clamp(0, SIZE), atol=1e-3, rtol=0)


@pytest.mark.parametrize("classifier", ["sigmoid", "softmax"])
def test_the_raised_class_is_the_predicted_category(images, classifier):
    model = _model(classifier, test_score_threshold=0.05, max_detections=20)
    num_classes = len(CATEGORY_IDS)
    for i in range(num_classes):
        with torch.no_grad():
            for stage in model.roi_heads.stages:
                stage.cls_score.bias.fill_(-8.0 if classifier == "sigmoid" else 0.0)
                stage.cls_score.bias[i] = 8.0
        dets = model.predict(images[:1], [(SIZE, SIZE)])
        for image_id, det in enumerate(dets):
            assert len(det["labels"]) > 0
            assert det["labels"].tolist() == [i] * len(det["labels"])
            assert bool((det["probs"].argmax(1) == i).all())
            results = to_results(det, image_id, CATEGORY_IDS, 1.0, (SIZE, SIZE))
            assert {r["category_id"] for r in results} == {CATEGORY_IDS[i]}


def test_a_score_threshold_keeps_exactly_the_scores_above_it(images):
    model = _model(test_score_threshold=0.0, max_detections=100)
    with torch.no_grad():  # class scores near 0.5, 0.27 and 0.05: a threshold of 0.3 keeps class 0 only
        for stage in model.roi_heads.stages:
            stage.cls_score.bias[:3] = torch.tensor([0.0, -1.0, -3.0])
    sizes = [(SIZE, SIZE)] * 2
    everything = model.predict(images, sizes)
    below = sum(int((d["scores"] <= 0.3).sum()) for d in everything)
    above = sum(int((d["scores"] > 0.3).sum()) for d in everything)
    assert below > 0 and above > 0  # the threshold has something to remove and something to keep
    cut = model.predict(images, sizes, score_threshold=0.3)
    configured = dataclasses.replace(model.cfg, test_score_threshold=0.3)
    model.cfg = configured
    model.roi_heads.cfg = configured
    from_config = model.predict(images, sizes)
    for dets in (cut, from_config):
        assert sum(len(d["scores"]) for d in dets) > 0
        for d in dets:
            assert bool((d["scores"] > 0.3).all()), d["scores"]
            assert d["labels"].tolist() == [0] * len(d["labels"])
