"""An image's `loss_weight` w scales each of its losses by exactly w (distillation gives every
pseudo-labeled image `distill.unsup_weight`): rpn_cls, rpn_box, cls and box of every cascade stage,
and mask. w = 0.25 is a power of two, so w times each term is exact in floating point and the
comparison is bit for bit; the RoI sample is the same in both runs (same seed), so only the
weight differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slsd_cli.model import CascadeMaskRCNN, build_detector, tiny_cnn_config
from tests.helpers.shapes import draw_shapes

SIZE = 64
W = 0.25

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes():
    return draw_shapes(n=2, size=SIZE, seed=3, min_side=16, max_side=28)


def _losses(model: CascadeMaskRCNN, shapes, weight: float | None) -> dict[str, torch.Tensor]:
    images, targets = shapes
    given = [dict(t) if weight is None else {**t, "loss_weight": weight} for t in targets]
    torch.manual_seed(7)  # the same anchor / RoI samples and federated classes in every call
    with torch.no_grad():
        return model(images, [(SIZE, SIZE)] * len(images), given)


@pytest.mark.parametrize("classifier, federated", [("sigmoid", True), ("softmax", False)])
def test_loss_weight_scales_every_loss_exactly(shapes, classifier, federated):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cnn_config(image_size=SIZE, rois_per_image=32), classifier=classifier,
                              use_federated=federated, federated_num_classes=2)
    categories = [{"id": 10 + i, "name": f"c{i}", "image_count": n} for i, n in enumerate((3, 5, 7))]
    model = build_detector(cfg, categories).train()
    default = _losses(model, shapes, None)
    one = _losses(model, shapes, 1.0)
    weighted = _losses(model, shapes, W)
    stages = len(cfg.cascade_ious)
    names = {"rpn_cls", "rpn_box", "mask"} | {f"{k}_stage{s}" for k in ("cls", "box") for s in range(stages)}
    assert set(weighted) == names
    for name in sorted(names):
        assert torch.equal(one[name], default[name]), name  # no weight means weight 1
        assert float(one[name]) > 0, name                    # a zero loss would scale by anything
        assert torch.equal(weighted[name], W * one[name]), (name, float(weighted[name]), float(one[name]))
