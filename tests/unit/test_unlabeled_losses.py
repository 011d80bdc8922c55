"""What an unlabeled image's targets add to the detector's losses (docs/method.md):

- ignore regions (`ignore_boxes`, the ignore band): the cascade gives zero classification weight to
  exactly the background RoIs overlapping them, in every stage, and leaves everything else
  bit-identical; the RPN does not sample negative anchors inside them;
- soft background (`background_scorer`): only the background RoIs' classification weights change,
  to the teacher's background probability normalised to mean 1 over the image's background RoIs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.ops import box_iou

from slsd_cli.model import cascade as cascade_module
from slsd_cli.model import rpn as rpn_module
from slsd_cli.model.detector import CascadeMaskRCNN, build_model
from slsd_cli.model.proposal_matching import in_ignore_regions
from slsd_cli.model.model_config import tiny_cnn_config

GT = torch.tensor([[4.0, 4.0, 28.0, 30.0]])
IGNORE = torch.tensor([[34.0, 30.0, 60.0, 58.0]])


def _target(ignore: bool) -> dict:
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 4:30, 4:28] = 1
    t = {"boxes": GT.clone(), "labels": torch.tensor([1]), "masks": masks,
         "class_targets": torch.tensor([[0.1, 0.8, 0.1]]), "loss_weight": 0.5}
    if ignore:
        t["ignore_boxes"] = IGNORE.clone()
    return t


def _proposals() -> torch.Tensor:
    """Jittered copies of the ground truth and of the ignore region, and boxes elsewhere."""
    g = torch.Generator().manual_seed(0)
    out = []
    for box in (GT[0], IGNORE[0], torch.tensor([2.0, 36.0, 30.0, 62.0]), torch.tensor([36.0, 2.0, 62.0, 26.0])):
        out.append(box + torch.randn(12, 4, generator=g) * 2.5)
    boxes = torch.cat(out)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2)
    return boxes.clamp(0, 64)


def _run_heads(model: CascadeMaskRCNN, ignore: bool, monkeypatch, scorer=None) -> dict:
    """forward_train of the cascade on fixed proposals; records each stage's RoIs and the arguments of
    its classification and box losses."""
    calls = {"rois": [], "cls": [], "box": []}
    pooler = model.roi_heads.pooler
    real_pool = pooler.forward

    def pool(features, boxes):
        calls["rois"].append(torch.cat(boxes).clone())
        return real_pool(features, boxes)

    loss_name = "sigmoid_classification_loss" if model.cfg.classifier == "sigmoid" else "softmax_classification_loss"
    real_cls, real_box = getattr(cascade_module, loss_name), cascade_module.box_regression_loss

    def cls(*args):
        calls["cls"].append(args)
        return real_cls(*args)

    def box(*args):
        calls["box"].append(args)
        return real_box(*args)

    monkeypatch.setattr(pooler, "forward", pool)
    monkeypatch.setattr(cascade_module, loss_name, cls)
    monkeypatch.setattr(cascade_module, "box_regression_loss", box)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    target = _target(ignore)
    if scorer is not None:
        target["background_scorer"] = scorer
    targets = model._check_targets([target], [(64, 64)], images.device)
    torch.manual_seed(3)  # the same RoI sample in both runs
    with torch.no_grad():
        features = model.backbone(model.preprocess(images, [(64, 64)]))
        losses, _ = model.roi_heads.forward_train(features[:4], [_proposals()], targets, [(64, 64)])
    monkeypatch.undo()
    calls["losses"] = losses
    return calls


def _model(classifier: str) -> CascadeMaskRCNN:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cnn_config(image_size=64, rois_per_image=32), classifier=classifier,
                              use_federated=False)
    return build_model(cfg, num_classes=3).train()


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


@pytest.mark.parametrize("classifier", ["sigmoid", "softmax"])
def test_ignore_regions_zero_exactly_the_overlapping_background_rois(classifier, one_thread, monkeypatch):
    model = _model(classifier)
    cfg = model.cfg
    plain = _run_heads(model, False, monkeypatch)
    ignored = _run_heads(model, True, monkeypatch)
    stages = len(cfg.cascade_ious)
    assert len(plain["cls"]) == len(ignored["cls"]) == stages
    for k in range(stages):
        rois = plain["rois"][k]
        assert torch.equal(rois, ignored["rois"][k])  # same RoIs, same regressed boxes
        p_args, i_args = plain["cls"][k], ignored["cls"][k]
        weight_at = 2 if classifier == "sigmoid" else 3
        # logits, targets (and the foreground mask) are bit-identical ...
        for j, (a, b) in enumerate(zip(p_args, i_args)):
            if j != weight_at:
                assert _same(a, b), (k, j)
        # ... and only the weights of background RoIs in the ignore region dropped to 0
        fg = box_iou(GT, rois).max(0).values >= cfg.cascade_ious[k]
        inside = box_iou(IGNORE, rois).max(0).values >= cfg.cascade_ious[k]
        expected = torch.where(inside & ~fg, 0.0, 0.5)
        assert torch.equal(p_args[weight_at], torch.full_like(expected, 0.5))
        assert torch.equal(i_args[weight_at], expected)
        if k == 0:
            assert int((inside & ~fg).sum()) >= 3 and int((~inside).sum()) >= 3  # the case tests something
        # the box loss (foreground only) is untouched
        for a, b in zip(plain["box"][k], ignored["box"][k]):
            assert _same(a, b)
        assert torch.equal(plain["losses"][f"box_stage{k}"], ignored["losses"][f"box_stage{k}"])
        assert ignored["losses"][f"cls_stage{k}"] < plain["losses"][f"cls_stage{k}"]


def test_no_ignore_boxes_is_the_exact_old_path(one_thread):
    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(image_size=64, rois_per_image=16), num_classes=3).train()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    results = []
    for target in (_target(False), {**_target(False), "ignore_boxes": torch.zeros(0, 4)}):
        torch.manual_seed(5)
        results.append(model(images, [(64, 64)], [target]))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_rpn_does_not_sample_negative_anchors_in_ignore_regions(one_thread, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(image_size=64), num_classes=3).train()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    seen = []
    real_sample = rpn_module.sample

    def sample(labels, num, fraction):
        seen.append(labels.clone())
        return real_sample(labels, num, fraction)

    features = model.backbone(model.preprocess(images, [(64, 64)]))
    anchors = torch.cat(model.rpn.anchors([tuple(f.shape[-2:]) for f in features], images.device))
    # the ignore region: an anchor inside the image, away from the ground truth
    candidates = (anchors[:, :2] >= 32).all(1) & (anchors[:, 2:] <= 64).all(1) & (anchors[:, 2] - anchors[:, 0] > 20)
    region = anchors[candidates][:1]
    assert len(region) == 1 and float(box_iou(region, GT).max()) == 0.0
    monkeypatch.setattr(rpn_module, "sample", sample)
    for ignore in (False, True):
        torch.manual_seed(5)
        model(images, [(64, 64)], [{**_target(False), "ignore_boxes": region} if ignore else _target(False)])
    plain, ignored = seen
    inside = in_ignore_regions(anchors, region, model.cfg.rpn_iou_thresholds[1])
    dropped = (plain == 0) & inside
    assert int(dropped.sum()) >= 1
    assert (ignored[dropped] == -1).all()
    assert torch.equal(ignored[~dropped], plain[~dropped])


def _reliability(boxes: torch.Tensor) -> torch.Tensor:
    """A stand-in teacher: background probability rising with the box's x centre."""
    return ((boxes[:, 0] + boxes[:, 2]) / 128).clamp(0.05, 1.0)


@pytest.mark.parametrize("classifier", ["sigmoid", "softmax"])
def test_soft_background_reweights_only_background_rois(classifier, one_thread, monkeypatch):
    model = _model(classifier)
    cfg = model.cfg
    plain = _run_heads(model, False, monkeypatch)
    soft = _run_heads(model, False, monkeypatch, scorer=_reliability)
    weight_at = 2 if classifier == "sigmoid" else 3
    stage0_rois = plain["rois"][0]
    r = _reliability(stage0_rois)  # scored once, on the stage-0 RoIs
    for k in range(len(cfg.cascade_ious)):
        rois = plain["rois"][k]
        assert torch.equal(rois, soft["rois"][k])
        for j, (a, b) in enumerate(zip(plain["cls"][k], soft["cls"][k])):
            if j != weight_at:
                assert _same(a, b), (k, j)
        fg = box_iou(GT, rois).max(0).values >= cfg.cascade_ious[k]
        weights = soft["cls"][k][weight_at]
        assert torch.equal(weights[fg], torch.full((int(fg.sum()),), 0.5))  # foreground terms untouched
        expected = 0.5 * r[~fg] / r[~fg].mean()
        torch.testing.assert_close(weights[~fg], expected)
        assert float(weights[~fg].std()) > 0.05  # they really differ from RoI to RoI
        assert torch.equal(plain["losses"][f"box_stage{k}"], soft["losses"][f"box_stage{k}"])


@pytest.mark.parametrize("classifier", ["sigmoid", "softmax"])
def test_background_scorers_score_boxes_as_the_cascade_does(classifier, one_thread):
    """With the class logits made constant per stage (weights 0, a bias per stage), the background
    score is known by hand: the stages' class probabilities averaged, then 1 - max over the classes
    (sigmoid: "no class present") or 1 - sum (softmax: the background column)."""
    import math

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cnn_config(image_size=64), classifier=classifier)
    model = build_model(cfg, num_classes=3).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    boxes = _proposals()[:10]
    # with the random weights: a score per box, that follows the box and depends on the image
    scorers = model.background_scorers(images, [(64, 64), (64, 64)])
    assert model.training  # the mode is restored
    score = scorers[1](boxes)
    assert score.shape == (10,) and bool(((score >= 0) & (score <= 1)).all()) and float(score.std()) > 0
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scorers[1](boxes[perm]), score[perm])
    assert not torch.allclose(scorers[0](boxes), score)
    assert scorers[0](boxes[:0]).shape == (0,)
    # constant logits: the score by hand
    biases = [[2.0, -1.0, 0.0, 0.3], [-1.0, 1.0, 0.5, 0.3], [0.0, 0.0, -2.0, -0.5]]
    with torch.no_grad():
        for stage, bias in zip(model.roi_heads.stages, biases):
            stage.cls_score.weight.zero_()
            stage.cls_score.bias.copy_(torch.tensor(bias))
    if classifier == "sigmoid":
        per_stage = [[1 / (1 + math.exp(-b)) for b in bias[:3]] for bias in biases]
    else:
        per_stage = [[math.exp(b) / sum(math.exp(x) for x in bias) for b in bias[:3]] for bias in biases]
    mean = [sum(p[c] for p in per_stage) / 3 for c in range(3)]
    expected = 1 - (max(mean) if classifier == "sigmoid" else sum(mean))
    constant = model.background_scorers(images, [(64, 64), (64, 64)])[0](boxes)
    torch.testing.assert_close(constant, torch.full((10,), expected), atol=1e-6, rtol=0)
