"""Training and test transforms for instance samples (torchvision.transforms.v2).

A sample is the dict `InstanceDataset` yields: `image` (tv_tensors.Image uint8 [3,H,W]), `boxes`
(tv_tensors.BoundingBoxes XYXY [G,4]), `masks` (tv_tensors.Mask uint8 [G,H,W]), `labels` [G] and
bookkeeping (`image_id`, `orig_size`, `scale`). Every transform returns a new dict of the same shape;
the geometry (flip, resize, crop) moves image, boxes and masks together, and `scale` accumulates the
resize factor (the mean of the two axes'; predictions are mapped back to the file per axis, from the
resized image's size: `model.postprocess.to_results`). The test resize is the reference's
(`ResizeShortestEdge`: detectron2's sizes, Pillow's bilinear).

Geometry is one affine map per sample (optional flip, isotropic scale, translation by the crop):
the image goes through `v2.functional.resize`/`crop` (bilinear, antialiased), boxes through the v2
box kernels, and masks are resampled once with nearest-exact sampling directly at the cropped output
(bit-identical to `v2.functional.resize(..., NEAREST_EXACT)` followed by the crop, but without
materialising the full resized mask stack: at LSJ scale 2, 300 instances of a 1024-pixel image
would otherwise cost ~1.2 GB per sample).

All randomness comes from torch's global RNG, so a caller that seeds torch (or DataLoader's worker
seeding) gets the same augmentations.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Sample = dict
# (probability, area fraction range, aspect-ratio range) of each random-erasing pass: the three
# erasers of Unbiased Teacher / SoftTeacher-style strong augmentation, filled with random noise.
DEFAULT_ERASING: tuple[tuple[float, tuple[float, float], tuple[float, float]], ...] = (
    (0.7, (0.05, 0.2), (0.3, 3.3)),
    (0.5, (0.02, 0.2), (0.1, 6.0)),
    (0.3, (0.02, 0.2), (0.05, 8.0)),
)
# Keys that hold one entry per instance and must be filtered together when instances are dropped.
INSTANCE_KEYS = ("boxes", "masks", "labels")


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * _rand()


def _randint(high_exclusive: int) -> int:
    return int(torch.randint(0, high_exclusive, ())) if high_exclusive > 1 else 0


def _nearest_exact_index(out_positions: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output position for nearest-exact resampling (pixel centres aligned)."""
    src = torch.floor((out_positions.to(torch.float64) + 0.5) * (in_size / out_size)).long()
    return src.clamp_(0, in_size - 1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes [G,4] float of binary masks [G,H,W]: a pixel (x, y) spans [x, x+1) x [y, y+1).
    Empty masks give an all-zero box."""
    g, h, w = masks.shape
    if g == 0:
        return torch.zeros(0, 4)
    cols, rows = masks.any(dim=1).bool(), masks.any(dim=2).bool()  # [G,W], [G,H]
    xs, ys = torch.arange(w), torch.arange(h)
    boxes = torch.stack([torch.where(cols, xs, w).amin(dim=1), torch.where(rows, ys, h).amin(dim=1),
                         torch.where(cols, xs, -1).amax(dim=1) + 1, torch.where(rows, ys, -1).amax(dim=1) + 1],
                        dim=1).float()
    boxes[~cols.any(dim=1)] = 0
    return boxes


def pil_bilinear_resize(image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, h, w] by Pillow's bilinear resize, the reference's test-time
    interpolation (detectron2's `ResizeTransform` on a uint8 image; antialiased when shrinking)."""
    from PIL import Image

    array = np.ascontiguousarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy())
    resized = Image.fromarray(array).resize((out_size[1], out_size[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1)))


def apply_geometry(sample: Sample, out_size: tuple[int, int], flip: bool = False,
                   crop: tuple[int, int, int, int] | None = None, drop_empty: bool = False,
                   recompute_boxes: bool = False, pil_image: bool = False) -> Sample:
    """Flip (optional), resize to `out_size` (h, w), then crop `(top, left, height, width)` of the
    resized image. Boxes are transformed with the same map; those the crop cuts (or all, with
    `recompute_boxes`) are recomputed as the tight boxes of their transformed masks. With
    `drop_empty`, instances whose mask is empty afterwards are dropped. The image is resized by
    torchvision's antialiased bilinear, or with `pil_image` (a uint8 image) by Pillow's bilinear."""
    image = sample["image"]
    in_h, in_w = image.shape[-2:]
    out_h, out_w = out_size
    top, left, ch, cw = crop if crop is not None else (0, 0, out_h, out_w)

    if flip:
        image = F.horizontal_flip(image)
    if pil_image and image.dtype == torch.uint8:
        image = pil_bilinear_resize(image, (out_h, out_w))
    else:
        image = F.resize(image, [out_h, out_w], antialias=True)
    if (top, left, ch, cw) != (0, 0, out_h, out_w):
        image = F.crop(image, top, left, ch, cw)

    masks = sample["masks"]
    rows = _nearest_exact_index(torch.arange(top, top + ch), in_h, out_h)
    cols = _nearest_exact_index(torch.arange(left, left + cw), in_w, out_w)
    if flip:
        cols = in_w - 1 - cols
    # numpy's take: 5-15x faster than torch.index_select along the last dim of a uint8 stack here
    masks = masks.as_subclass(torch.Tensor).numpy()
    masks = torch.from_numpy(np.take(np.take(masks, rows.numpy(), axis=1), cols.numpy(), axis=2))

    boxes = sample["boxes"]
    if flip:
        boxes = F.horizontal_flip(boxes)
    boxes = F.resize(boxes, [out_h, out_w])
    raw = boxes.as_subclass(torch.Tensor)
    cut = (raw[:, 0] < left) | (raw[:, 1] < top) | (raw[:, 2] > left + cw) | (raw[:, 3] > top + ch)
    raw = raw - torch.tensor([left, top, left, top], dtype=raw.dtype)
    raw = torch.stack([raw[:, 0].clamp(0, cw), raw[:, 1].clamp(0, ch), raw[:, 2].clamp(0, cw),
                       raw[:, 3].clamp(0, ch)], dim=1)
    if recompute_boxes:
        raw = mask_boxes(masks).to(raw.dtype)  # an empty mask gets the empty box (0, 0, 0, 0)
    elif cut.any():
        raw[cut] = mask_boxes(masks[cut]).to(raw.dtype)

    out = {**sample, "image": tv_tensors.Image(image),
           "boxes": tv_tensors.BoundingBoxes(raw, format="XYXY", canvas_size=(ch, cw)),
           "masks": tv_tensors.Mask(masks),
           "scale": float(sample.get("scale", 1.0)) * (out_h / in_h + out_w / in_w) / 2}
    if drop_empty:
        keep = (raw[:, 2] > raw[:, 0]) & (raw[:, 3] > raw[:, 1])
        if not recompute_boxes:
            keep &= masks.flatten(1).any(dim=1).bool()
        if not bool(keep.all()):
            out = filter_instances(out, keep)
    return out


def filter_instances(sample: Sample, keep: torch.Tensor) -> Sample:
    """Keep the instances where `keep` is True (boxes, masks and labels together)."""
    out = dict(sample)
    for key in INSTANCE_KEYS:
        value = sample[key]
        kept = value[keep]
        if isinstance(value, tv_tensors.BoundingBoxes):
            kept = tv_tensors.wrap(kept, like=value)
        elif isinstance(value, tv_tensors.Mask):
            kept = tv_tensors.Mask(kept)
        out[key] = kept
    return out


class LargeScaleJitter:
    """Large-scale jitter (ViTDet/detectron2 LSJ): horizontal flip, resize so the image fits a square
    of side `size * s` with s ~ U(scale_range), random crop to at most `size` x `size` (no padding:
    `collate` pads, or with `pad=True` the image is zero-padded here to exactly size x size — then
    the padding counts as image in `Batch.image_sizes`).
    Instances emptied by the crop or the resize are dropped.

    With `recompute_boxes` (default, as ViTDet's LSJ mapper does) every box becomes the tight box of
    its transformed mask, so boxes describe exactly the masks the model is trained on: nearest
    resampling can thin out a shape's tips or thin parts (at scale 0.1 a 4-pixel-wide part is under
    one pixel), leaving the mask several pixels inside the geometrically transformed box. Without it
    boxes follow the geometry (only boxes the crop cuts are recomputed)."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                 pad: bool = False, recompute_boxes: bool = True):
        if size <= 0 or not 0 < scale_range[0] <= scale_range[1] or not 0 <= flip_prob <= 1:
            raise ValueError(f"bad LSJ parameters size={size} scale_range={scale_range} flip_prob={flip_prob}")
        self.size = int(size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.pad = pad
        self.recompute_boxes = recompute_boxes

    def __call__(self, sample: Sample) -> Sample:
        flip = _rand() < self.flip_prob
        h, w = sample["image"].shape[-2:]
        s = _uniform(*self.scale_range)
        factor = min(self.size * s / h, self.size * s / w)
        out_h, out_w = max(1, round(h * factor)), max(1, round(w * factor))
        ch, cw = min(self.size, out_h), min(self.size, out_w)
        top, left = _randint(out_h - ch + 1), _randint(out_w - cw + 1)
        out = apply_geometry(sample, (out_h, out_w), flip=flip, crop=(top, left, ch, cw), drop_empty=True,
                             recompute_boxes=self.recompute_boxes)
        if self.pad and (ch, cw) != (self.size, self.size):
            out = pad_to(out, self.size, self.size)
        return out

    def __repr__(self) -> str:
        return f"LargeScaleJitter(size={self.size}, scale_range={self.scale_range}, flip_prob={self.flip_prob})"


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """(h, w) of detectron2's `ResizeShortestEdge` (the EVA-02 / ViTDet test resize), computed as
    it does: the short edge scaled to `short_edge`, then both sides scaled down so the long edge is
    at most `max_size`, in floats, each rounded with int(x + 0.5) (not round(): 62.5 -> 63)."""
    size = float(short_edge)
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class ResizeShortestEdge:
    """Deterministic test resize as the reference's: the shortest edge becomes `size`, capped so the
    longest is at most `max_size` (default `size`: the longest edge becomes `size`), sizes rounded
    as detectron2 does (`shortest_edge_size`), the image resized by Pillow's bilinear (as the
    reference reads a uint8 image); padding is left to `collate`. `scale` records the mean of the
    two axes' factors; predictions are mapped back per axis from the input size (`to_results`)."""

    def __init__(self, size: int, max_size: int | None = None):
        if size <= 0 or (max_size is not None and max_size <= 0):
            raise ValueError(f"sizes must be positive, got {size}, {max_size}")
        self.size = int(size)
        self.max_size = int(max_size if max_size is not None else size)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        out_size = shortest_edge_size(int(h), int(w), self.size, self.max_size)
        return apply_geometry(sample, out_size, pil_image=True)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(size={self.size}, max_size={self.max_size})"


def pad_to(sample: Sample, height: int, width: int) -> Sample:
    """Zero-pad image and masks at the bottom/right to (height, width); boxes are unchanged."""
    h, w = sample["image"].shape[-2:]
    padding = [0, 0, width - w, height - h]
    boxes = sample["boxes"]
    return {**sample,
            "image": F.pad(sample["image"], padding, fill=0),
            "masks": F.pad(sample["masks"], padding, fill=0),
            "boxes": tv_tensors.BoundingBoxes(boxes.as_subclass(torch.Tensor), format="XYXY",
                                              canvas_size=(height, width))}


def lsj_transform(size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                  pad: bool = False, recompute_boxes: bool = True) -> Callable[[Sample], Sample]:
    """Training transform: flip + large-scale jitter + crop to `size` (see `LargeScaleJitter`)."""
    return LargeScaleJitter(size, scale_range, flip_prob, pad=pad, recompute_boxes=recompute_boxes)


def test_transform(size: int) -> Callable[[Sample], Sample]:
    """Test transform: the reference's shortest-edge resize capped at `size` (so the longest edge
    becomes `size`, rounded as detectron2 rounds); records `scale`."""
    return ResizeShortestEdge(size, size)


test_transform.__test__ = False  # not a pytest test, even when imported into a test module


class StrongPhotometric:
    """The strong view's pixel-only augmentation on a uint8 image: colour jitter, grayscale, Gaussian
    blur and random erasing (random-noise fill). Geometry is untouched."""

    def __init__(self, color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), color_jitter_prob: float = 0.8,
                 grayscale_prob: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_prob: float = 0.5,
                 erasing: Sequence[tuple[float, tuple[float, float], tuple[float, float]]] = DEFAULT_ERASING):
        brightness, contrast, saturation, hue = color_jitter
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.color_jitter_prob = color_jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_sigma = blur_sigma
        self.blur_prob = blur_prob
        self.erasing = tuple(erasing)

    def __call__(self, image: torch.Tensor) -> tv_tensors.Image:
        image = tv_tensors.Image(image)
        if _rand() < self.color_jitter_prob:
            image = self.jitter(image)
        if _rand() < self.grayscale_prob:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        if _rand() < self.blur_prob:
            image = gaussian_blur(image, _uniform(*self.blur_sigma))
        for prob, area, ratio in self.erasing:
            if _rand() < prob:
                image = random_erase(image, area, ratio)
        return tv_tensors.Image(image)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a [C,H,W] image with a (2 ceil(3 sigma) + 1)-tap kernel and reflect padding:
    the filter of `v2.functional.gaussian_blur` (its 2-D kernel is the outer product of these taps),
    applied as two 1-D passes of shifted sums — ~3x faster on CPU at 1024 x 1024, sigma 2, where
    torch's depthwise conv2d is slow for both 2-D and 1-D kernels."""
    c, h, w = image.shape[-3:]
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)  # reflect padding needs pad < side
    if radius < 1:
        return image
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    padded = torch.nn.functional.pad(image.as_subclass(torch.Tensor).to(torch.float32).reshape(1, c, h, w),
                                     [radius, radius, radius, radius], mode="reflect")[0]
    rows = padded[:, :, 0:w] * taps[0]
    for k in range(1, len(taps)):
        rows.add_(padded[:, :, k:k + w], alpha=taps[k])
    out = rows[:, 0:h] * taps[0]
    for k in range(1, len(taps)):
        out.add_(rows[:, k:k + h], alpha=taps[k])
    if image.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def random_erase(image: torch.Tensor, area: tuple[float, float], ratio: tuple[float, float],
                 attempts: int = 10) -> torch.Tensor:
    """Replace one random rectangle (area fraction in `area`, aspect h/w log-uniform in `ratio`) by
    uniform random noise; unchanged if no rectangle fits in `attempts` draws."""
    c, h, w = image.shape[-3:]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = h * w * _uniform(*area)
        aspect = math.exp(_uniform(log_lo, log_hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            i, j = _randint(h - eh + 1), _randint(w - ew + 1)
            noise = torch.randint(0, 256, (c, eh, ew), dtype=torch.uint8)
            out = image.as_subclass(torch.Tensor).clone()
            out[..., i:i + eh, j:j + ew] = noise.to(out.dtype)
            return out
    return image


class WeakStrongTransform:
    """The semi-supervised pair: `weak` = flip + LSJ; `strong` = the weak view (same image geometry,
    same boxes and masks, shared tensors) with `StrongPhotometric` applied to its pixels.
    `__call__(sample) -> (weak, strong)`."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                 color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), color_jitter_prob: float = 0.8,
                 grayscale_prob: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_prob: float = 0.5,
                 erasing: Sequence[tuple[float, tuple[float, float], tuple[float, float]]] = DEFAULT_ERASING,
                 weak: Callable[[Sample], Sample] | None = None):
        self.weak = weak if weak is not None else lsj_transform(size, scale_range, flip_prob)
        self.strong = StrongPhotometric(color_jitter, color_jitter_prob, grayscale_prob, blur_sigma, blur_prob,
                                        erasing)

    def __call__(self, sample: Sample) -> tuple[Sample, Sample]:
        weak = self.weak(sample)
        strong = {**weak, "image": self.strong(weak["image"])}
        return weak, strong
