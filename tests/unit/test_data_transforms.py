"""Transforms: box/mask consistency after flip and LSJ, weak/strong geometry, test resize."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors

from slsd_cli.data import transforms as T
from slsd_cli.data.batching import collate, collate_pairs

from tests.helpers.tiny_data import make_sample


def _plain(t):
    return t.as_subclass(torch.Tensor)


def assert_consistent(out: dict, size: int | None = None) -> None:
    image, boxes, masks = out["image"], _plain(out["boxes"]), _plain(out["masks"])
    h, w = image.shape[-2:]
    assert image.dtype == torch.uint8 and masks.dtype == torch.uint8
    assert masks.shape[1:] == (h, w)
    assert boxes.shape[0] == masks.shape[0] == out["labels"].shape[0]
    assert tuple(out["boxes"].canvas_size) == (h, w)
    if size is not None:
        assert h <= size and w <= size
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
                and (boxes[:, 3] <= h).all())
    if masks.shape[0]:
        assert bool(masks.flatten(1).any(dim=1).all()), "an emptied instance was kept"
        diff = (T.mask_boxes(masks) - boxes).abs().max().item()
        assert diff <= 1.0, f"mask box and transformed box differ by {diff:.2f} px"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(12, 72), w=st.integers(12, 72), n=st.integers(0, 5),
       size=st.integers(16, 64))
def test_lsj_masks_match_boxes(seed, h, w, n, size):
    sample = make_sample(seed, h, w, n)
    torch.manual_seed(seed)
    out = T.lsj_transform(size)(sample)
    assert_consistent(out, size)
    assert out["labels"].dtype == torch.long
    assert out["image_id"] == sample["image_id"] and out["orig_size"] == (h, w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(12, 72), w=st.integers(12, 72), n=st.integers(1, 5),
       size=st.integers(16, 64))
def test_lsj_geometry_moves_boxes_with_masks(seed, h, w, n, size):
    """Boxes transformed by the geometry alone (no recomputation except where the crop cuts) still
    match the transformed masks: rectangles keep their extent under nearest resampling at any scale."""
    sample = make_sample(seed, h, w, n, rect_only=True)
    torch.manual_seed(seed)
    out = T.lsj_transform(size, recompute_boxes=False)(sample)
    assert_consistent(out, size)


def test_flip_is_exact():
    sample = make_sample(3, 40, 60, 4)
    out = T.lsj_transform(60, scale_range=(1.0, 1.0), flip_prob=1.0)(sample)  # fits exactly: no resize
    assert out["image"].shape[-2:] == (40, 60) and out["scale"] == 1.0
    assert torch.equal(_plain(out["image"]), _plain(sample["image"]).flip(-1))
    assert torch.equal(_plain(out["masks"]), _plain(sample["masks"]).flip(-1))
    expected = _plain(sample["boxes"])[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([60.0, 0, 60, 0])
    assert torch.equal(_plain(out["boxes"]), expected)
    assert_consistent(out)


def test_lsj_crop_drops_emptied_instances_and_recomputes_cut_boxes():
    sample = make_sample(0, 64, 64, 0)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 0:10, 0:10] = 1      # top-left corner: gone after a crop of the bottom-right
    masks[1, 20:64, 20:64] = 1    # spans the crop edge
    masks[1, 20:30, 20:30] = 0    # an L shape: its cut box shrinks to the remaining part
    sample.update(masks=tv_tensors.Mask(masks), labels=torch.tensor([0, 1]),
                  boxes=tv_tensors.BoundingBoxes(T.mask_boxes(masks), format="XYXY", canvas_size=(64, 64)))
    # size 32 at scale 2 on a 64x64 image: resized to 64x64, then a random 32x32 crop
    torch.manual_seed(0)
    seen_drop = False
    for _ in range(20):
        out = T.lsj_transform(32, scale_range=(2.0, 2.0), flip_prob=0.0)(sample)
        assert out["image"].shape[-2:] == (32, 32)
        assert_consistent(out, 32)
        seen_drop |= out["labels"].tolist() == [1]
    assert seen_drop
    padded = T.lsj_transform(32, scale_range=(0.25, 0.25), pad=True)(sample)  # 16x16, padded to 32x32
    assert padded["image"].shape[-2:] == (32, 32) and padded["masks"].shape[-2:] == (32, 32)
    assert _plain(padded["image"])[:, 16:].sum() == 0 and _plain(padded["image"])[:, :, 16:].sum() == 0
    assert_consistent(padded, 32)


def test_lsj_reproducible_from_global_rng():
    sample = make_sample(5, 50, 70, 3)
    transform = T.lsj_transform(48)
    torch.manual_seed(123)
    a = [transform(sample) for _ in range(3)]
    torch.manual_seed(123)
    b = [transform(sample) for _ in range(3)]
    for x, y in zip(a, b):
        assert torch.equal(_plain(x["image"]), _plain(y["image"]))
        assert torch.equal(_plain(x["boxes"]), _plain(y["boxes"]))
        assert x["scale"] == y["scale"]
    assert len({tuple(x["image"].shape) for x in a}) > 1 or not torch.equal(_plain(a[0]["image"]), _plain(a[1]["image"]))


def test_test_transform_longest_edge_and_scale():
    sample = make_sample(1, 30, 60, 3)
    out = T.test_transform(120)(sample)
    assert out["image"].shape[-2:] == (60, 120)
    assert out["scale"] == pytest.approx(2.0)
    assert len(out["labels"]) == 3
    assert torch.allclose(_plain(out["boxes"]), _plain(sample["boxes"]) * 2)
    assert_consistent(out)
    back = _plain(out["boxes"]) / out["scale"]  # predictions map back to the file with the scale
    assert torch.allclose(back, _plain(sample["boxes"]))


@pytest.mark.parametrize("seed", range(6))
def test_weak_strong_share_geometry(seed):
    sample = make_sample(seed, 48, 64, 4)
    torch.manual_seed(seed)
    weak, strong = T.WeakStrongTransform(56)(sample)
    assert_consistent(weak, 56)
    assert torch.equal(_plain(weak["boxes"]), _plain(strong["boxes"]))
    assert torch.equal(_plain(weak["masks"]), _plain(strong["masks"]))
    assert torch.equal(weak["labels"], strong["labels"])
    assert weak["scale"] == strong["scale"] and weak["image_id"] == strong["image_id"]
    assert strong["image"].shape == weak["image"].shape and strong["image"].dtype == torch.uint8


def test_strong_view_is_only_photometric():
    sample = make_sample(9, 40, 40, 2)
    # no jitter/grey/blur/erasing: the strong view is the weak view pixel for pixel
    identity = T.WeakStrongTransform(40, color_jitter_prob=0, grayscale_prob=0, blur_prob=0, erasing=())
    torch.manual_seed(0)
    weak, strong = identity(sample)
    assert torch.equal(_plain(weak["image"]), _plain(strong["image"]))
    # every photometric op on: pixels change, geometry does not
    always = T.WeakStrongTransform(40, color_jitter_prob=1, grayscale_prob=1, blur_prob=1,
                                   erasing=((1.0, (0.1, 0.2), (0.5, 2.0)),))
    torch.manual_seed(0)
    weak2, strong2 = always(sample)
    assert torch.equal(_plain(weak2["image"]), _plain(weak["image"]))  # same RNG draws for the weak view
    assert not torch.equal(_plain(weak2["image"]), _plain(strong2["image"]))
    assert torch.equal(_plain(weak2["masks"]), _plain(strong2["masks"]))


def test_collate_pads_and_keeps_targets():
    samples = [make_sample(s, h, w, n) for s, (h, w, n) in enumerate([(30, 50, 2), (45, 20, 0), (33, 33, 3)])]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(30, 50), (45, 20), (33, 33)]
    assert torch.equal(batch.images[0, :, :30, :50], _plain(samples[0]["image"]).float())
    assert batch.images[0, :, 30:, :].abs().sum() == 0 and batch.images[1, :, :, 20:].abs().sum() == 0
    assert [t["boxes"].shape[0] for t in batch.targets] == [2, 0, 3]
    assert batch.targets[2]["masks"].shape == (3, 33, 33) and batch.targets[2]["masks"].dtype == torch.uint8
    assert batch.targets[0]["labels"].dtype == torch.long and type(batch.targets[0]["boxes"]) is torch.Tensor
    assert batch.image_ids == [0, 1, 2] and batch.scales == [1.0, 1.0, 1.0]
    moved = batch.to("cpu")
    assert moved.images.data_ptr() == batch.images.data_ptr() and len(moved) == 3
    assert collate(samples, size_divisibility=1).images.shape[-2:] == (45, 50)
    assert collate(samples, pad_to=100).images.shape[-2:] == (128, 128)
    weak_batch, strong_batch = collate_pairs([T.WeakStrongTransform(32)(s) for s in samples])
    assert weak_batch.images.shape == strong_batch.images.shape


@pytest.mark.parametrize("flip,out_size,crop", [(False, (90, 120), (10, 20, 64, 64)), (True, (30, 41), None),
                                                (True, (200, 150), (100, 3, 64, 100))])
def test_mask_resampling_equals_torchvision_nearest_exact(flip, out_size, crop):
    sample = make_sample(4, 60, 80, 3)
    out = T.apply_geometry(sample, out_size, flip=flip, crop=crop)
    masks = sample["masks"]
    if flip:
        masks = T.F.horizontal_flip(masks)
    expected = T.F.resize(masks, list(out_size), interpolation=T.v2.InterpolationMode.NEAREST_EXACT)
    if crop is not None:
        top, left, h, w = crop
        expected = expected[:, top:top + h, left:left + w]
    assert torch.equal(_plain(out["masks"]), _plain(expected))


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_separable_blur_matches_torchvision(sigma):
    image = make_sample(2, 50, 70, 0)["image"]
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = T.F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    assert (T.gaussian_blur(image, sigma).int() - _plain(expected).int()).abs().max() <= 1
