"""The embedded benchmark: a small LVIS-format long-tail instance-segmentation dataset (docs/design.md §4).

No machine here can download LVIS, so `slsd synth` draws one with the same problem shape:

* **Structured classes.** A class is a (shape, colour, texture) triple from 8 shapes x 8 hues x 4
  textures (256 possible classes). `classes` of them are chosen with the seed, so most classes have
  siblings that differ in one attribute only (an orange striped star and a red striped star; a
  circle and a hexagon of the same colour): class similarity is real, and `classes.json` says what
  it is (`similarity`: the fraction of shared attributes).
* **The LVIS long tail.** Class i gets the training image count of the LVIS v1 curve (the sorted
  image counts of its 1,203 classes, LVIS v1's published category info) at quantile
  (i + 1/2) / classes. Counts <= 100 are kept as they are, so the rare (<= 10 images) and common
  (11-100) groups keep their LVIS definition and share of classes; the frequent part of the curve
  (101 .. 1,977 images) is squeezed log-linearly into 101 .. 0.4 x train_images (lower when images
  would otherwise hold more than 5.5 classes on average), so the frequent group exists whenever
  there are enough images (>= 255; `min_train_images`). The counts are exact: each class appears in
  exactly its number of training images (so r/c/f in `train.json` are the intended groups). An
  image holds at most 8 classes and 10 objects; a class has 1 instance in an image, sometimes 2 or 3.
* **Default sizes** (`default_sizes`): 500 train / 100 val / 300 pool images for 40 classes
  (11 rare, 16 common, 13 frequent; about 3,400 training instances), scaled with the class count.
* **Exact masks.** Each object is rasterised once into a binary mask; its pixels are painted from
  that mask, later objects occlude earlier ones, and the annotation is the RLE of the pixels that
  stay visible (every object keeps >= 60 % of its area). Bounding boxes are the masks' tight boxes.
* **Backgrounds** are smooth low-frequency colour fields with grain, grey clutter (lines and
  blobs, never a hue of a class) and per-pixel noise over the whole image. Object sizes vary about
  5x; their colours jitter in hue, saturation and value.
* **Splits.** `train.json` (the labeled set), `val.json` (every class has >= 5 images, hence >= 5
  instances; otherwise proportional to the training counts, as LVIS val is), `pool.json` (an
  unlabeled pool: images, an empty annotation list) with its hidden ground truth in `pool_gt.json`. The pool draws its
  classes from a much flatter distribution (weight ~ training image count ** 0.25) and 10 % of its
  images are background only, so it holds many more rare-class instances than the labeled set.
* **A calibration split**, `calib.json`: labeled images disjoint from train, val and the pool, drawn
  by val's rule (>= 5 images of every class, otherwise proportional to the training counts; as many
  images as val unless `calib_images` says otherwise), for `slsd calibrate` (Eq. 4): a held-out
  split cut from train.json holds no image of most rare classes, and their Delta is then only minus
  their mean score. Its memberships and pixels come from random streams of their own, so adding it
  left every other output byte for byte as it was.
* **Exhaustive labels.** Every object is annotated, so every class absent from an image is a
  verified negative: `neg_category_ids` lists them all and `not_exhaustive_category_ids` is empty
  (train, val and pool_gt; `pool.json` knows nothing, both lists are empty there).
* **Categories** in every file carry the *training* counts and frequency groups (as LVIS val does).

Layout of OUT_DIR (pass `--images OUT_DIR/images` to the other commands)::

    train.json val.json pool.json pool_gt.json classes.json calib.json
    images/train_000000.png ... images/val_000000.png ... images/pool_000000.png ... images/calib_000000.png ...

`file_name` in every json is the bare file name, relative to `OUT_DIR/images`. Image ids and
annotation ids are unique across all splits (train, then val, then pool, then calib). Same seed and
options, same bytes (PNG written by Pillow without metadata, json with a fixed key order).
"""

from __future__ import annotations

import colorsys
import io
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from slsd_cli.data.lvis import FREQUENCY_GROUPS, dataset_dict, frequency_group
from slsd_cli.errors import InputError
from slsd_cli.io import FileSet, atomic_write_json, check_output, make_dirs, output_errors, remove_leftovers

FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")
COLOURS = {  # name -> hue in degrees; neighbours on the wheel look alike (orange/yellow, blue/purple)
    "red": 0, "orange": 30, "yellow": 55, "green": 120, "cyan": 180, "blue": 225, "purple": 275,
    "magenta": 315,
}
TEXTURES = ("solid", "striped", "dotted", "checkered")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)

# Quantiles 0, 0.005, ..., 1 of the LVIS v1 training image counts per class (1,203 classes), i.e.
# numpy.quantile(sorted(c["image_count"] for c in lvis_v1_train_cat_info), numpy.linspace(0, 1, 201)).
# Embedded so the package does not need the LVIS file at run time.
LVIS_V1_IMAGE_COUNT_QUANTILES = (
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0,
    2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0,
    6.0, 6.0, 6.0, 7.0, 7.0, 7.0, 7.0, 7.0, 8.0, 8.0, 8.0, 8.5, 9.0, 9.0, 9.5, 10.0, 10.0, 10.0,
    10.6, 11.0, 11.0, 11.0, 12.0, 12.0, 12.0, 13.0, 13.0, 14.0, 14.0, 14.0, 15.0, 16.0, 16.0, 16.0,
    17.0, 17.7, 18.0, 18.0, 19.0, 19.0, 21.0, 21.8, 22.0, 23.0, 24.0, 24.8, 25.0, 26.0, 26.9, 28.0,
    28.0, 28.0, 29.0, 29.0, 30.9, 31.0, 32.0, 33.0, 34.0, 35.0, 36.0, 36.0, 37.0, 40.0, 40.0, 41.0,
    42.0, 44.0, 45.0, 46.0, 47.0, 48.0, 49.0, 50.0, 50.1, 52.0, 54.1, 56.2, 59.2, 61.2, 63.0, 65.0,
    66.2, 69.0, 70.0, 71.2, 73.2, 76.0, 79.3, 81.0, 85.3, 90.0, 91.3, 95.0, 99.0, 101.0, 103.3,
    106.4, 113.0, 115.0, 120.4, 125.4, 130.4, 134.0, 138.4, 143.0, 153.4, 162.1, 182.8, 191.5, 199.5,
    212.0, 221.0, 227.5, 236.0, 246.1, 252.2, 270.0, 293.6, 307.6, 330.9, 341.6, 358.2, 384.1, 427.3,
    474.9, 501.3, 527.6, 572.6, 617.1, 646.7, 673.0, 725.4, 754.1, 813.2, 856.9, 942.5, 1009.5,
    1036.8, 1121.9, 1167.0, 1289.0, 1400.6, 1445.1, 1506.0, 1567.0, 1633.1, 1686.8, 1766.7, 1801.6,
    1842.4, 1859.9, 1876.5, 1884.9, 1894.6, 1900.9, 1906.9, 1914.9, 1923.0, 1927.0, 1934.0, 1945.0,
    1977.0,
)
LVIS_MAX_IMAGE_COUNT = 1977.0
FREQUENT_MIN = 101  # the smallest frequent-class image count
FREQUENT_TOP_SHARE = 0.4  # the most frequent class appears in this share of the training images

MAX_CLASSES_PER_IMAGE = 8  # distinct classes in one image
TRAIN_DENSITY = 5.5  # at most this many classes per training image on average
VAL_DENSITY = 6.0  # the same for val (>= 5 images per class adds to the proportional share)
MAX_OBJECTS_PER_IMAGE = 10
MIN_VISIBLE_FRACTION = 0.6
MIN_OBJECT_AREA = 12  # pixels
POOL_FLATTEN = 0.25  # pool class weight = train image count ** POOL_FLATTEN
POOL_EMPTY_SHARE = 0.1
POOL_MEAN_CLASSES = 3.5
EXTRA_INSTANCE_PROBS = (0.2, 0.05)  # P(a second instance of a class in an image), P(a third)
MIN_IMAGE_SIZE = 32

CALIB_FILE = "calib.json"  # not calibration.json: that name is `slsd calibrate`'s output
OUTPUT_FILES = ("train.json", "val.json", "pool.json", "pool_gt.json", "classes.json", CALIB_FILE)
IMAGES_DIR = "images"


@dataclass(frozen=True)
class SynthClass:
    id: int
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.texture}_{self.shape}"

    @property
    def hue(self) -> float:
        return float(COLOURS[self.colour])


# ---------------------------------------------------------------- the long tail


def lvis_curve(classes: int) -> np.ndarray:
    """LVIS v1 image counts at quantiles (i + 1/2) / classes, ascending (interpolated in log space)."""
    grid = np.linspace(0.0, 1.0, len(LVIS_V1_IMAGE_COUNT_QUANTILES))
    positions = (np.arange(classes) + 0.5) / classes
    return np.exp(np.interp(positions, grid, np.log(np.asarray(LVIS_V1_IMAGE_COUNT_QUANTILES))))


def _curve_counts(curve: np.ndarray, top: float) -> np.ndarray:
    squeezed = np.exp(np.log(FREQUENT_MIN) + (np.log(np.maximum(curve, FREQUENT_MIN)) - np.log(FREQUENT_MIN))
                      / (np.log(LVIS_MAX_IMAGE_COUNT) - np.log(FREQUENT_MIN)) * (np.log(top) - np.log(FREQUENT_MIN)))
    counts = np.where(curve <= 100, np.round(curve), np.round(squeezed))
    return np.clip(counts, 1, None).astype(np.int64)


def min_train_images(classes: int) -> int:
    """The fewest training images that hold the LVIS curve of `classes` classes (frequent classes
    need > 100 images; images hold at most TRAIN_DENSITY classes on average)."""
    flat = _curve_counts(lvis_curve(classes), FREQUENT_MIN + 1).sum()
    return max(math.ceil((FREQUENT_MIN + 1) / FREQUENT_TOP_SHARE), math.ceil(flat / TRAIN_DENSITY))


def train_image_counts(classes: int, train_images: int) -> np.ndarray:
    """Training image count per class on the LVIS curve, ascending (see the module docstring).

    Counts <= 100 are the curve's; the frequent part is squeezed into 101 .. top, top = 0.4 x
    train_images, lowered (by bisection) when the images would otherwise hold more than
    TRAIN_DENSITY classes on average."""
    need = min_train_images(classes)
    if train_images < need:
        raise InputError(f"--train-images {train_images} is too few for {classes} classes on the LVIS long tail "
                         f"(frequent classes need > 100 images); use at least {need}")
    curve = lvis_curve(classes)
    lo, hi = float(FREQUENT_MIN + 1), FREQUENT_TOP_SHARE * train_images
    if _curve_counts(curve, hi).sum() <= TRAIN_DENSITY * train_images:
        return _curve_counts(curve, hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _curve_counts(curve, mid).sum() <= TRAIN_DENSITY * train_images:
            lo = mid
        else:
            hi = mid
    return _curve_counts(curve, lo)


def val_image_counts(train_counts: np.ndarray, train_images: int, val_images: int) -> np.ndarray:
    """At least 5 val images per class, otherwise proportional to the training counts."""
    return np.maximum(5, np.round(train_counts * val_images / train_images)).astype(np.int64)


def min_val_images(train_counts: np.ndarray, train_images: int) -> int:
    """The fewest val images holding >= 5 images per class at <= VAL_DENSITY classes per image."""
    size = 5
    while val_image_counts(train_counts, train_images, size).sum() > VAL_DENSITY * size:
        size += 1
    return size


def default_sizes(classes: int) -> tuple[int, int, int]:
    """(train, val, pool) image counts used when not given: 500 / 100 / 300 for 40 classes, scaled
    with the number of classes (and raised to what the long tail needs)."""
    scale = max(1.0, classes / 40)
    train = max(int(round(500 * scale, -1)), min_train_images(classes))
    counts = train_image_counts(classes, train)
    val = max(int(round(100 * scale, -1)), min_val_images(counts, train))
    return train, val, int(round(300 * scale, -1))


# ---------------------------------------------------------------- classes


def choose_classes(classes: int, seed: int) -> list[SynthClass]:
    """`classes` distinct (shape, colour, texture) triples, chosen with the seed, in grid order."""
    grid = [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]
    rng = np.random.default_rng([seed, 1])
    picked = np.sort(rng.choice(len(grid), size=classes, replace=False))
    return [SynthClass(id=i + 1, shape=grid[k][0], colour=grid[k][1], texture=grid[k][2])
            for i, k in enumerate(picked)]


def attribute_similarity(classes: list[SynthClass]) -> list[list[float]]:
    """Fraction of shared attributes (shape, colour, texture) between two classes."""
    return [[round(((a.shape == b.shape) + (a.colour == b.colour) + (a.texture == b.texture)) / 3, 6)
             for b in classes] for a in classes]


# ---------------------------------------------------------------- which classes go in which image


def _assign_exact(counts: np.ndarray, num_images: int, rng: np.random.Generator, split: str) -> list[list[int]]:
    """Put class k in exactly counts[k] distinct images, balancing the number of classes per image.

    Classes are placed most frequent first; each picks its images at random, weighted towards the
    least-loaded ones (Gumbel top-k on -load). Images left empty then take a class from the most
    loaded image, which keeps every count exact."""
    load = np.zeros(num_images, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(num_images)]
    for k in np.argsort(-counts, kind="stable"):
        n = int(counts[k])
        open_images = np.flatnonzero(load < MAX_CLASSES_PER_IMAGE)
        if n > open_images.size:
            raise InputError(f"too many objects for {num_images} {split} images; pass more --{split}-images")
        keys = -load[open_images].astype(np.float64) + rng.gumbel(size=open_images.size)
        chosen = open_images[np.argsort(-keys, kind="stable")[:n]]
        load[chosen] += 1
        for image in chosen:
            members[image].append(int(k))
    for image in np.flatnonzero(load == 0):
        donor = int(np.argmax(load))
        if load[donor] < 2:
            break  # fewer class slots than images: the rest stay background-only images
        k = members[donor].pop(int(rng.integers(len(members[donor]))))
        members[image].append(k)
        load[donor] -= 1
        load[image] += 1
    return members


def _assign_pool(weights: np.ndarray, num_images: int, rng: np.random.Generator) -> list[list[int]]:
    p = weights / weights.sum()
    empty = set(rng.choice(num_images, size=int(round(POOL_EMPTY_SHARE * num_images)), replace=False).tolist())
    members = []
    max_k = min(MAX_CLASSES_PER_IMAGE, len(weights))
    for image in range(num_images):
        if image in empty:
            members.append([])
            continue
        k = 1 + int(rng.binomial(max_k - 1, (min(POOL_MEAN_CLASSES, max_k) - 1) / max(max_k - 1, 1)))
        members.append(sorted(rng.choice(len(weights), size=k, replace=False, p=p).tolist()))
    return members


def _instances(members: list[int], rng: np.random.Generator) -> list[int]:
    """Class index of every object in an image: 1 instance per class, sometimes 2 or 3."""
    objects = []
    for k in members:
        n = 1 + int(rng.random() < EXTRA_INSTANCE_PROBS[0]) + int(rng.random() < EXTRA_INSTANCE_PROBS[1])
        objects.extend([k] * n)
    while len(objects) > MAX_OBJECTS_PER_IMAGE:  # drop duplicates, never a class
        counts = Counter(objects)
        k = max(counts, key=lambda c: (counts[c], c))
        objects.remove(k)
    return [objects[i] for i in rng.permutation(len(objects))]


# ---------------------------------------------------------------- drawing


def _unit_circle(n: int = 40, radius: float = 1.0, dx: float = 0.0) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([dx + radius * np.cos(a), radius * np.sin(a)], axis=1)


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    a = np.pi / 2 + np.linspace(0, 2 * np.pi, 2 * points, endpoint=False)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    w, l = arm, 1.0
    return np.array([(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l), (-w, w),
                     (-l, w), (-l, -w), (-w, -w)], dtype=np.float64)


# shape -> (filled polygons, holes) in unit coordinates
SHAPE_POLYGONS: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
    "circle": ([_unit_circle()], []),
    "square": ([np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])], []),
    "triangle": ([_regular(3)], []),
    "star": ([_star()], []),
    "ring": ([_unit_circle()], [_unit_circle(radius=0.55)]),
    "cross": ([_cross()], []),
    "hexagon": ([_regular(6, radius=0.95)], []),
    "crescent": ([_unit_circle()], [_unit_circle(radius=0.85, dx=0.5)]),
}


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, aspect: float,
                angle: float) -> np.ndarray:
    """Binary mask (bool [size, size]) of one shape: unit polygons scaled, rotated, translated."""
    cos, sin = math.cos(angle), math.sin(angle)
    scale = np.array([radius * aspect, radius / aspect])

    def place(poly: np.ndarray) -> list[tuple[float, float]]:
        p = poly * scale
        x = p[:, 0] * cos - p[:, 1] * sin + cx
        y = p[:, 0] * sin + p[:, 1] * cos + cy
        return list(zip(x.tolist(), y.tolist()))

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    fills, holes = SHAPE_POLYGONS[shape]
    for poly in fills:
        draw.polygon(place(poly), fill=1)
    for poly in holes:
        draw.polygon(place(poly), fill=0)
    return np.asarray(canvas, dtype=bool)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360.0, s, v), dtype=np.float32)


def _texture(texture: str, ys: np.ndarray, xs: np.ndarray, base: np.ndarray, period: float, angle: float,
             rng: np.random.Generator) -> np.ndarray:
    """Colours [n, 3] of the pixels at (ys, xs) for one object's texture."""
    n = ys.size
    out = np.broadcast_to(base, (n, 3)).copy()
    u = xs * math.cos(angle) + ys * math.sin(angle)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    dark = base * 0.4
    if texture == "solid":
        shade = 1.0 + 0.12 * (u - u.mean()) / max(period * 4, 1.0)  # a soft gradient
        out *= np.clip(shade, 0.8, 1.2)[:, None]
    elif texture == "striped":
        out[(u % period) < period / 2] = dark
    elif texture == "checkered":
        out[(np.floor(u / period) + np.floor(v / period)) % 2 == 1] = dark
    elif texture == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        dot = np.array([0.95, 0.95, 0.95], dtype=np.float32) if rng.random() < 0.5 else dark
        out[du * du + dv * dv < (0.3 * period) ** 2] = dot
    return np.clip(out, 0.0, 1.0)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float [size, size, 3] in [0, 1]: smooth muted colour field + grain + grey clutter."""
    grey = rng.uniform(0.3, 0.7)
    low = grey + rng.uniform(-0.18, 0.18, size=(4, 4, 1)) + rng.uniform(-0.07, 0.07, size=(4, 4, 3))
    low8 = (np.clip(low, 0, 1) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(low8, "RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(2):
        freq = rng.uniform(0.05, 0.5)
        theta = rng.uniform(0, np.pi)
        field += rng.uniform(0.015, 0.05) * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta))
                                                   + rng.uniform(0, 2 * np.pi))[..., None]
    clutter = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(clutter)
    levels = {}
    for i in range(int(rng.integers(0, 6))):
        level = i + 1
        levels[level] = rng.uniform(0.15, 0.85)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, size, 4).tolist()
            draw.line([(x0, y0), (x1, y1)], fill=level, width=int(rng.integers(1, 3)))
        else:
            cx, cy = rng.uniform(0, size, 2).tolist()
            r = rng.uniform(0.02, 0.08) * size
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=level)
    labels = np.asarray(clutter)
    for level, value in levels.items():
        field[labels == level] = value
    return np.clip(field, 0.0, 1.0)


@dataclass
class _Object:
    cls: int  # contiguous class index
    full_area: int
    visible_area: int


def render_image(size: int, object_classes: list[int], classes: list[SynthClass],
                 rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image. Returns uint8 [size, size, 3] and (class index, visible bool mask) per object."""
    canvas = _background(size, rng)
    owner = np.full((size, size), -1, dtype=np.int64)
    placed: list[_Object] = []
    n = max(len(object_classes), 1)
    d_lo = max(8.0, 0.1 * size)
    d_hi = max(d_lo * 1.2, size * min(0.45, 0.95 / math.sqrt(n)))
    for k in object_classes:
        cls = classes[k]
        diameter = math.exp(rng.uniform(math.log(d_lo), math.log(d_hi)))
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        angle = rng.uniform(0, 2 * np.pi)
        for attempt in range(60):
            if attempt and attempt % 10 == 0:
                diameter = max(d_lo * 0.6, diameter * 0.8)
            radius = diameter / 2
            margin = 0.7 * radius
            cx = rng.uniform(margin, size - margin) if size > 2 * margin else size / 2
            cy = rng.uniform(margin, size - margin) if size > 2 * margin else size / 2
            mask = _shape_mask(cls.shape, size, cx, cy, radius, aspect, angle)
            area = int(mask.sum())
            if area < MIN_OBJECT_AREA:
                diameter *= 1.15
                continue
            lost = np.bincount(owner[mask][owner[mask] >= 0], minlength=len(placed))
            if all(o.visible_area - int(lost[j]) >= MIN_VISIBLE_FRACTION * o.full_area for j, o in enumerate(placed)):
                break
        else:
            raise RuntimeError(f"could not place a {cls.name} in a {size}x{size} image with "
                               f"{len(object_classes)} objects")
        for j, o in enumerate(placed):
            o.visible_area -= int(lost[j])
        ys, xs = np.nonzero(mask)
        colour = _hsv(cls.hue + rng.uniform(-8, 8), rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95))
        period = max(3.0, diameter / rng.uniform(4.0, 6.0))
        canvas[ys, xs] = _texture(cls.texture, ys.astype(np.float32), xs.astype(np.float32), colour, period,
                                  rng.uniform(0, np.pi), rng)
        owner[mask] = len(placed)
        placed.append(_Object(cls=k, full_area=area, visible_area=area))
    canvas += rng.normal(0.0, rng.uniform(0.015, 0.045), size=canvas.shape).astype(np.float32)
    pixels = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
    return pixels, [(o.cls, owner == j) for j, o in enumerate(placed)]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ---------------------------------------------------------------- the whole dataset


def _check_args(classes: int, train_images: int, val_images: int, pool_images: int, image_size: int,
                calib_images: int) -> None:
    if not 3 <= classes <= MAX_CLASSES:
        raise InputError(f"--classes must be between 3 (one per r/c/f group) and {MAX_CLASSES} "
                         f"({len(SHAPES)} shapes x {len(COLOURS)} colours x {len(TEXTURES)} textures), got {classes}")
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if pool_images < 1:
        raise InputError(f"--pool-images must be at least 1, got {pool_images}")
    counts = train_image_counts(classes, train_images)
    need = min_val_images(counts, train_images)
    for option, value in (("--val-images", val_images), ("--calib-images", calib_images)):
        if value < need:
            raise InputError(f"{option} {value} is too few for {classes} classes with >= 5 images each; "
                             f"use at least {need}")


def _split_records(split: str, memberships: list[list[int]], classes: list[SynthClass], size: int,
                   seed: int, first_image_id: int, first_ann_id: int, images_dir: Path,
                   split_code: int, exhaustive: bool, tick) -> tuple[list[dict], list[dict]]:
    """Render and write one split's images; return its image records and annotations."""
    all_ids = [c.id for c in classes]
    images, annotations = [], []
    ann_id = first_ann_id
    for index, members in enumerate(memberships):
        rng = np.random.default_rng([seed, split_code, index])
        objects = _instances(members, rng)
        pixels, masks = render_image(size, objects, classes, rng)
        image_id = first_image_id + index
        file_name = f"{split}_{index:06d}.png"
        (images_dir / file_name).write_bytes(png_bytes(pixels))
        present = sorted({classes[k].id for k in members})
        images.append({
            "id": image_id, "file_name": file_name, "width": size, "height": size,
            "neg_category_ids": [c for c in all_ids if c not in present] if exhaustive else [],
            "not_exhaustive_category_ids": [],
        })
        for k, mask in masks:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": classes[k].id,
                                "bbox": bbox, "area": float(mask.sum()),
                                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                                "iscrowd": 0})
            ann_id += 1
        tick()
    return images, annotations


def _group_shares(annotations: list[dict], group_of: dict[int, str]) -> dict[str, int]:
    counts = Counter(group_of[a["category_id"]] for a in annotations)
    return {g: int(counts.get(g, 0)) for g in FREQUENCY_GROUPS}


def generate(out_dir: str | Path, classes: int = 40, train_images: int | None = None, val_images: int | None = None,
             pool_images: int | None = None, image_size: int = 128, seed: int = 0, force: bool = False,
             progress=None, calib_images: int | None = None) -> dict:
    """Write the synthetic long-tail benchmark to `out_dir` (layout in the module docstring).

    Sizes left as None take `default_sizes(classes)` (500 / 100 / 300 images for 40 classes);
    `calib_images` None takes val's size. Existing outputs (the six json files or `images/`) need
    `force=True`; other files in `out_dir` are left alone. `images/` and the json files are one set (`io.FileSet`): staged beside
    them and renamed into place together, so a failure or a kill never leaves part of them.
    `progress` is an optional rich Progress. Returns a summary dict.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    auto_train, auto_val, auto_pool = default_sizes(classes) if 3 <= classes <= MAX_CLASSES else (0, 0, 0)
    train_images = auto_train if train_images is None else int(train_images)
    val_images = auto_val if val_images is None else int(val_images)
    pool_images = auto_pool if pool_images is None else int(pool_images)
    calib_images = val_images if calib_images is None else int(calib_images)
    _check_args(classes, train_images, val_images, pool_images, image_size, calib_images)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output exists and is not a directory", path=out_dir)
    for name in (*OUTPUT_FILES, IMAGES_DIR):
        check_output(out_dir / name, force)

    class_list = choose_classes(classes, seed)
    rng = np.random.default_rng([seed, 2])
    ascending = train_image_counts(classes, train_images)
    train_counts = ascending[rng.permutation(classes)]  # which class gets which place on the curve
    val_counts = val_image_counts(train_counts, train_images, val_images)
    train_members = _assign_exact(train_counts, train_images, rng, "train")
    val_members = _assign_exact(val_counts, val_images, rng, "val")
    pool_members = _assign_pool(train_counts.astype(np.float64) ** POOL_FLATTEN, pool_images, rng)
    # the calibration split draws from its own stream, after the others: they stay as they were
    calib_counts = val_image_counts(train_counts, train_images, calib_images)
    calib_members = _assign_exact(calib_counts, calib_images, np.random.default_rng([seed, 3]), "calib")

    info = {"description": "slsd synthetic long-tail instance segmentation benchmark", "version": FORMAT_VERSION,
            "seed": seed, "classes": classes, "image_size": image_size, "train_images": train_images,
            "val_images": val_images, "pool_images": pool_images}
    total = train_images + val_images + pool_images + calib_images
    task = progress.add_task("synth", total=total, status="") if progress is not None else None

    def tick() -> None:
        if progress is not None:
            progress.advance(task)

    remove_leftovers(out_dir, ".images.*.tmp", ".images.old.*")  # staging of older versions, if killed
    images_dir = out_dir / IMAGES_DIR
    # images/ and the six json files appear together or not at all (staged, then renamed into place)
    outputs = FileSet([images_dir, *(out_dir / name for name in OUTPUT_FILES)], force)
    staging = make_dirs(outputs.stage(images_dir))
    with outputs, output_errors(images_dir, staging):  # disk full, read-only: the one-line error
        first_val_id = 1 + train_images
        first_pool_id = first_val_id + val_images
        train_imgs, train_anns = _split_records("train", train_members, class_list, image_size, seed, 1, 1,
                                                staging, 10, True, tick)
        val_imgs, val_anns = _split_records("val", val_members, class_list, image_size, seed, first_val_id,
                                            1 + len(train_anns), staging, 11, True, tick)
        pool_imgs, pool_anns = _split_records("pool", pool_members, class_list, image_size, seed, first_pool_id,
                                              1 + len(train_anns) + len(val_anns), staging, 12, True, tick)
        calib_imgs, calib_anns = _split_records("calib", calib_members, class_list, image_size, seed,
                                                first_pool_id + pool_images,
                                                1 + len(train_anns) + len(val_anns) + len(pool_anns), staging, 13,
                                                True, tick)
        docs = _documents(info, class_list, train_counts, val_counts, calib_images,
                          {"train": (train_imgs, train_anns), "val": (val_imgs, val_anns),
                           "pool": (pool_imgs, pool_anns), "calib": (calib_imgs, calib_anns)})
        group_of = {c["id"]: c["frequency"] for c in docs["train.json"]["categories"]}
        for name in OUTPUT_FILES:
            atomic_write_json(outputs.stage(out_dir / name), docs[name])

    splits = {"train": (train_imgs, train_anns), "val": (val_imgs, val_anns), "pool_gt": (pool_imgs, pool_anns),
              "calib": (calib_imgs, calib_anns)}
    return {"out_dir": str(out_dir), "images_dir": str(images_dir), "seed": seed, "image_size": image_size,
            "classes": classes, **_split_summary(splits, group_of),
            "seconds": round(time.perf_counter() - started, 3)}


def _documents(info: dict, class_list: list, train_counts: np.ndarray, val_counts: np.ndarray, calib_images: int,
               records: dict[str, tuple[list, list]]) -> dict[str, dict]:
    """The six json documents of the benchmark from each split's (images, annotations)."""
    (train_imgs, train_anns), (val_imgs, val_anns) = records["train"], records["val"]
    (pool_imgs, pool_anns), (calib_imgs, calib_anns) = records["pool"], records["calib"]
    base_categories = [{"id": c.id, "name": c.name, "synonyms": [c.name],
                        "def": f"a {c.colour} {c.texture} {c.shape}", "shape": c.shape, "colour": c.colour,
                        "texture": c.texture} for c in class_list]
    train = dataset_dict(train_imgs, train_anns, base_categories, {**info, "split": "train"})
    categories = train["categories"]
    for cat in categories:  # the intended group must be the realised one (exact counts)
        assert cat["frequency"] == frequency_group(int(train_counts[cat["id"] - 1])), cat
    val = {"info": {**info, "split": "val"}, "images": val_imgs, "annotations": val_anns, "categories": categories}
    pool_gt = {"info": {**info, "split": "pool_gt"}, "images": pool_imgs, "annotations": pool_anns,
               "categories": categories}
    pool = {"info": {**info, "split": "pool"},
            "images": [{**img, "neg_category_ids": [], "not_exhaustive_category_ids": []} for img in pool_imgs],
            "annotations": [], "categories": categories}
    calib = {"info": {**info, "split": "calib", "calib_images": calib_images}, "images": calib_imgs,
             "annotations": calib_anns, "categories": categories}
    group_of = {c["id"]: c["frequency"] for c in categories}
    classes_doc = {
        "info": info,
        "attributes": {"shape": list(SHAPES), "colour": dict(COLOURS), "texture": list(TEXTURES)},
        "similarity_definition": "fraction of shared attributes (shape, colour, texture)",
        "classes": [{"id": c.id, "name": c.name, "shape": c.shape, "colour": c.colour, "hue_degrees": c.hue,
                     "texture": c.texture, "frequency": group_of[c.id],
                     "train_image_count": int(train_counts[c.id - 1]), "val_image_count": int(val_counts[c.id - 1])}
                    for c in class_list],
        "similarity": attribute_similarity(class_list),
    }
    return {"classes.json": classes_doc, "train.json": train, "val.json": val, "pool.json": pool,
            "pool_gt.json": pool_gt, CALIB_FILE: calib}


def _split_summary(splits: dict[str, tuple[list, list]], group_of: dict[int, str]) -> dict:
    """The summary's class groups and per-split counts."""
    groups = Counter(group_of.values())
    return {
        "groups": {g: int(groups.get(g, 0)) for g in FREQUENCY_GROUPS},
        "splits": {name: {"images": len(imgs), "instances": len(anns),
                          "empty_images": len(imgs) - len({a["image_id"] for a in anns}),
                          "instances_by_group": _group_shares(anns, group_of)}
                   for name, (imgs, anns) in splits.items()},
    }
