"""Test-time pre- and post-processing equal to the EVA-02 reference (issue 21.2): detectron2's
`ResizeShortestEdge` sizes (int(x + 0.5) after its two float scalings) and Pillow's bilinear, and
`detector_postprocess`'s per-axis back-scaling, clipping, empty boxes dropped, masks >= 0.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from slsd_cli.data import transforms as T
from slsd_cli.model.model_config import tiny_cnn_config
from slsd_cli.model.postprocess import to_results
from tests.helpers.tiny_data import make_sample


def reference_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape, as its documentation states the rule."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


@pytest.mark.parametrize("h, w, size, expected", [
    (125, 512, 256, (63, 256)),    # 62.5 rows: round() gives 62, the reference 63
    (512, 125, 256, (256, 63)),
    (5, 8, 4, (3, 4)),             # 2.5 -> 3 (round: 2)
    (125, 2048, 1024, (63, 1024)),  # 62.5 -> 63
    (480, 640, 1024, (768, 1024)),
    (1024, 1024, 1024, (1024, 1024)),
])
def test_resize_sizes_follow_the_reference_formula_on_half_cases(h, w, size, expected):
    assert T.shortest_edge_size(h, w, size, size) == expected == reference_size(h, w, size, size)
    sample = make_sample(0, h, w, 0)
    assert tuple(T.test_transform(size)(sample)["image"].shape[-2:]) == expected


def test_resize_sizes_match_the_formula_everywhere():
    rng = np.random.default_rng(0)
    for h, w, short, cap in rng.integers(1, 3000, (2000, 4)):
        cap = max(cap, short)
        assert T.shortest_edge_size(int(h), int(w), int(short), int(cap)) == reference_size(h, w, short, cap)


def test_test_resize_interpolates_with_pillow_bilinear():
    sample = make_sample(1, 96, 150, 2)
    out = T.test_transform(64)(sample)
    h, w = T.shortest_edge_size(96, 150, 64, 64)
    pil = Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).resize((w, h), Image.Resampling.BILINEAR)
    assert torch.equal(out["image"].as_subclass(torch.Tensor), torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    assert len(out["labels"]) == 2  # instances travel with the image


def _det(boxes, mask_value: float = 0.9, scores=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    return {"boxes": boxes, "scores": torch.tensor(scores or [0.9 - 0.1 * i for i in range(n)]),
            "labels": torch.zeros(n, dtype=torch.long), "probs": torch.ones(n, 1),
            "mask_probs": torch.full((n, 28, 28), mask_value)}


def test_boxes_map_back_per_axis_on_a_wide_image():
    # 2048 x 125 shown at 1024: the model input is 1024 x 63 (62.5 rounded up), so x scales by 2
    # and y by 125 / 63; one averaged factor would put y off by about 1.6 % (x by 24 px at the right)
    orig, size = (125, 2048), T.shortest_edge_size(125, 2048, 1024, 1024)
    assert size == (63, 1024)
    [rec] = to_results(_det([[100.0, 10.0, 900.0, 60.0]]), 1, [7], None, orig, input_size=size)
    fy = np.float32(125 / 63)
    assert rec["bbox"] == [200.0, float(np.float32(10.0) * fy), 1600.0,
                           float(np.float32(np.float32(60.0) * fy) - np.float32(np.float32(10.0) * fy))]
    mask = mask_utils.decode(rec["segmentation"])
    rows, cols = np.nonzero(mask)
    # the mask is pasted into the same per-axis box (bilinear with zero padding thins its edges)
    assert 200 <= cols.min() <= 205 and 1795 <= cols.max() + 1 <= 1800
    assert 19 <= rows.min() <= 22 and 117 <= rows.max() + 1 <= 120


def test_masks_binarise_at_half_and_empty_boxes_are_dropped_before_the_top_k():
    det = _det([[0.0, 0.0, 10.0, 10.0], [30.0, 5.0, 30.0, 9.0], [2.0, 2.0, 8.0, 8.0]], mask_value=0.5,
               scores=[0.9, 0.8, 0.7])
    out = to_results(det, 1, [7], None, (20, 40), input_size=(20, 40), max_dets=2)
    # the zero-width box is gone and the third detection takes its place in the top 2
    assert [r["score"] for r in out] == pytest.approx([0.9, 0.7])
    assert all(mask_utils.area(r["segmentation"]) > 0 for r in out)  # probability 0.5 is inside (>=)
    assert mask_utils.area(out[0]["segmentation"]) >= 95  # (> 0.5 would keep none of these pixels)
    clipped = to_results(_det([[-5.0, -5.0, 50.0, 30.0]]), 1, [7], None, (20, 40), input_size=(20, 40))
    assert clipped[0]["bbox"] == [0.0, 0.0, 40.0, 20.0]  # clipped to the image, masks pasted there


class FixedDetector(nn.Module):
    """Stands in for a detector: one known box in model-input pixels, whatever the image."""

    def __init__(self, box):
        super().__init__()
        self.cfg = tiny_cnn_config(image_size=1024)
        self.num_classes = 1
        self.weight = nn.Parameter(torch.zeros(1))
        self.box = box
        self.seen: list[tuple[int, int]] = []

    def predict(self, images, image_sizes, score_threshold=None, canvas=None, options=None):
        self.seen += list(image_sizes)
        return [_det([self.box]) for _ in image_sizes]


def test_eval_path_maps_boxes_per_axis(tmp_path):
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.inference.sharded import predict_to_results

    Image.new("RGB", (2048, 125), (90, 120, 30)).save(tmp_path / "wide.png")
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "wide.png", "width": 2048, "height": 125}],
        "categories": [{"id": 7, "name": "thing"}], "annotations": []}))
    model = FixedDetector([100.0, 10.0, 900.0, 60.0])
    out = predict_to_results(model, load_annotations(tmp_path / "a.json", require_annotations=False), tmp_path,
                             tmp_path / "dets.json")
    assert model.seen == [(63, 1024)]
    [rec] = json.loads(out.read_text())
    x, y, w, h = rec["bbox"]
    assert (x, w) == (200.0, 1600.0) and y == pytest.approx(10 * 125 / 63, rel=1e-6)
    assert y + h == pytest.approx(60 * 125 / 63, rel=1e-6)
