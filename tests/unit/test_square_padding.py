"""Square-padded ViT inference (issue 14 §1): a ViT detector always sees the square canvas it was
trained on, so a non-square image's features and detections do not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from slsd_cli.model import build_detector, tiny_cnn_config, tiny_eva_config
from slsd_cli.inference.predictor import Predictor

CATEGORIES = [{"id": 3, "name": "a", "image_count": 5}, {"id": 7, "name": "b", "image_count": 2}]
WIDE = (80, 128)   # (h, w) non-square, longest edge = image_size
TALL = (128, 96)   # another shape for the batch


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


def _batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad to the batch's largest size, rounded to 32 (as `collate` does)."""
    h = -(-max(i.shape[1] for i in images) // 32) * 32
    w = -(-max(i.shape[2] for i in images) // 32) * 32
    out = torch.zeros(len(images), 3, h, w)
    for k, img in enumerate(images):
        out[k, :, :img.shape[1], :img.shape[2]] = img
    return out, [(int(i.shape[1]), int(i.shape[2])) for i in images]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    cfg = tiny_eva_config(drop_path=0.0, test_score_threshold=0.0, max_detections=40)
    model = build_detector(cfg, CATEGORIES).eval()
    return Predictor(model, [c["id"] for c in CATEGORIES], amp="fp32")


def _max_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for da, db in zip(a, b, strict=True):
        assert torch.equal(da["labels"], db["labels"])
        for key in ("boxes", "scores", "probs", "mask_probs"):
            assert da[key].shape == db[key].shape
            if da[key].numel():
                worst = max(worst, float((da[key] - db[key]).abs().max()))
    return worst


def test_vit_canvas_is_the_trained_square_and_cnn_keeps_divisibility():
    eva = build_detector(tiny_eva_config(), CATEGORIES).backbone
    assert eva.canvas(*WIDE) == (128, 128)
    assert eva.canvas(64, 32) == (128, 128)
    assert eva.canvas(64, 32, min_side=160) == (160, 160)
    assert eva.canvas(130, 40) == (160, 160)  # larger than trained: still square
    cnn = build_detector(tiny_cnn_config(), CATEGORIES).backbone
    assert cnn.canvas(*WIDE) == (96, 128)


def test_detections_alone_equal_batched_with_another_shape(predictor):
    wide, tall = _image(*WIDE, seed=1), _image(*TALL, seed=2)
    alone = predictor.predict(*_batch([wide]))
    assert len(alone[0]["scores"]) > 0
    batched = predictor.predict(*_batch([tall, wide]))[1:]
    diff = _max_diff(alone, batched)
    # by hand on the square canvas: the image at the top-left of a 128 x 128 zero image
    canvas = torch.zeros(1, 3, 128, 128)
    canvas[0, :, :WIDE[0], :WIDE[1]] = wide
    by_hand = predictor.predict(canvas, [WIDE])
    diff_hand = _max_diff(alone, by_hand)
    print(f"max abs difference: alone vs batched {diff:.3g}, alone vs square canvas by hand {diff_hand:.3g}")
    assert diff <= 1e-5 and diff_hand <= 1e-5


def test_features_equal_the_image_placed_on_the_square_canvas_by_hand(predictor):
    model = predictor.model
    wide = _image(*WIDE, seed=3)
    feats, stride, extents = predictor.features(*_batch([wide]))
    assert stride == 16 and feats.shape[-2:] == (8, 8) and extents == [(5, 8)]
    normed = (wide.unsqueeze(0) - model.pixel_mean) / model.pixel_std
    canvas = torch.zeros(1, 3, 128, 128)
    canvas[:, :, :WIDE[0], :WIDE[1]] = normed
    with torch.no_grad():
        expected = model.backbone.trunk(canvas)
        # what inference did before the fix: the ViT on the non-square 96 x 128 grid
        old = model.backbone.trunk(torch.nn.functional.pad(normed, (0, 0, 0, 96 - WIDE[0])))
    assert torch.allclose(feats, expected, atol=1e-5, rtol=0)
    assert float((old[..., :5, :] - expected[..., :5, :]).abs().max()) > 1e-2  # the bug this guards against


def test_detections_of_a_cnn_do_not_pad_to_a_square():
    torch.manual_seed(0)
    cfg = tiny_cnn_config(test_score_threshold=0.0)
    model = build_detector(cfg, CATEGORIES).eval()
    x = model.preprocess(_image(*WIDE, seed=4).unsqueeze(0), [WIDE])
    assert tuple(x.shape[-2:]) == (96, 128)
    eva = build_detector(tiny_eva_config(), CATEGORIES).eval()
    assert tuple(eva.preprocess(_image(*WIDE, seed=4).unsqueeze(0), [WIDE]).shape[-2:]) == (128, 128)
