"""Tiny in-test datasets: random images with ellipse/rectangle instances whose boxes are the tight
boxes of their masks (so box-mask consistency can be checked to the pixel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.io import write_png

from tests.helpers.paths import COCO_39769  # noqa: F401  (re-exported: the photo fixture)


def shape_mask(rng: np.random.Generator, h: int, w: int, min_radius: float = 2.0, rect_only: bool = False) -> np.ndarray:
    """One random ellipse or rectangle (at least 2 * min_radius px across, possibly cut by the
    image border) inside an h x w image."""
    yy, xx = np.mgrid[0:h, 0:w]
    ry, rx = rng.uniform(min_radius, max(min_radius + 0.5, h / 3)), rng.uniform(min_radius, max(min_radius + 0.5, w / 3))
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    if rng.random() < 0.5 and not rect_only:
        mask = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1
    else:
        mask = (np.abs(yy + 0.5 - cy) <= ry) & (np.abs(xx + 0.5 - cx) <= rx)
    if not mask.any():  # centre fell where nothing rasterised: use one safe blob
        mask[h // 4: h // 2 + 1, w // 4: w // 2 + 1] = True
    return mask.astype(np.uint8)


def tight_box_xyxy(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def make_sample(seed: int, h: int, w: int, n: int, rect_only: bool = False) -> dict:
    """An in-memory sample (the dataset's layout) with n instances and tight boxes."""
    rng = np.random.default_rng(seed)
    masks = np.stack([shape_mask(rng, h, w, rect_only=rect_only) for _ in range(n)]) if n else np.zeros((0, h, w), np.uint8)
    boxes = torch.tensor([tight_box_xyxy(m) for m in masks], dtype=torch.float32).reshape(-1, 4)
    image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        "labels": torch.arange(n, dtype=torch.long) % 3,
        "image_id": seed,
        "orig_size": (h, w),
        "scale": 1.0,
    }


def write_dataset(root: Path, sizes: list[tuple[int, int]], instances: list[int], seed: int = 0,
                  categories: tuple[int, ...] = (1, 2, 3), lvis_fields: bool = True,
                  category_of=None) -> Path:
    """Write PNGs and an LVIS-style json (RLE masks, tight boxes) under `root`; return the json path.
    `category_of(image_index, instance_index)` picks each instance's category (default round-robin)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, ((h, w), n) in enumerate(zip(sizes, instances)):
        image_id = 100 + i
        pixels = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        name = f"img_{image_id}.png"
        write_png(pixels, str(root / name))
        record = {"id": image_id, "file_name": name, "width": w, "height": h}
        if lvis_fields:
            record.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        images.append(record)
        for k in range(n):
            mask = shape_mask(rng, h, w)
            x0, y0, x1, y1 = tight_box_xyxy(mask)
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            cid = category_of(i, k) if category_of else categories[(i + k) % len(categories)]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle,
                         "area": float(mask.sum()), "iscrowd": 0})
    data = {"info": {"description": "slsd test"}, "images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in categories]}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def results_from_ground_truth(annotations: Path) -> list[dict]:
    """Perfect detections: every ground-truth instance of a dataset json as a results record
    (score 0.9, its box, its mask as compressed RLE)."""
    from slsd_cli.data.lvis import segmentation_to_rle

    data = json.loads(annotations.read_text())
    images = {img["id"]: img for img in data["images"]}
    out = []
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        rle = segmentation_to_rle(ann["segmentation"], image["height"], image["width"])
        rle = {"size": list(rle["size"]), "counts": rle["counts"] if isinstance(rle["counts"], str)
               else rle["counts"].decode("ascii")}
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                    "score": 0.9, "segmentation": rle})
    return out
