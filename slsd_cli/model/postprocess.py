"""Detections -> image-resolution masks -> the LVIS/COCO results format.

`paste_masks` resamples each 28x28 mask probability map into its box on an H x W canvas (bilinear,
only over the box's pixels, zero outside). `to_results` maps one image's detections back to the
original image as the reference's `detector_postprocess` does: boxes scaled per axis (file width /
input width, file height / input height), clipped to the image, those left empty dropped; masks
pasted into the clipped boxes, binarised at >= 0.5 and RLE-encoded with pycocotools (counts as str,
json-ready); [x, y, w, h] computed in float32, as the reference's results writer does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

PASTE_CHUNK = 32  # detections pasted and encoded at a time (bounds memory at N x H x W)


def _paste_one(mask: Tensor, box: Tensor, height: int, width: int) -> tuple[Tensor, int, int] | None:
    x1, y1, x2, y2 = (float(v) for v in box)
    c0, r0 = max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0)
    c1, r1 = min(int(math.ceil(x2)), width), min(int(math.ceil(y2)), height)
    if c1 <= c0 or r1 <= r0 or x2 <= x1 or y2 <= y1:
        return None
    xs = (torch.arange(c0, c1, dtype=torch.float32, device=mask.device) + 0.5 - x1) / (x2 - x1) * 2 - 1
    ys = (torch.arange(r0, r1, dtype=torch.float32, device=mask.device) + 0.5 - y1) / (y2 - y1) * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0)
    patch = F.grid_sample(mask[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return patch[0, 0], r0, c0


def paste_masks(mask_probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """mask_probs [N, M, M] in box coordinates, boxes [N, 4] xyxy -> [N, height, width] float."""
    out = torch.zeros((mask_probs.shape[0], height, width), dtype=torch.float32, device=mask_probs.device)
    for i in range(mask_probs.shape[0]):
        pasted = _paste_one(mask_probs[i], boxes[i], height, width)
        if pasted is not None:
            patch, r0, c0 = pasted
            out[i, r0:r0 + patch.shape[0], c0:c0 + patch.shape[1]] = patch
    return out


def encode_masks(masks: Tensor) -> list[dict]:
    """Binary masks [N, H, W] -> compressed RLEs with str counts."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    rles = mask_utils.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def back_to_image(boxes: Tensor, input_size: tuple[int, int], orig_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boxes [N, 4] xyxy on the model input of (h, w) `input_size` -> (the boxes on the original
    image of (h, w) `orig_size`, scaled per axis and clipped; the mask of those not empty)."""
    scale_x, scale_y = orig_size[1] / input_size[1], orig_size[0] / input_size[0]
    boxes = boxes.clone()
    boxes[:, 0::2] *= scale_x  # a float32 tensor times a Python float, as the reference scales
    boxes[:, 1::2] *= scale_y
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=orig_size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=orig_size[0])
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def to_results(det: dict, image_id: int, category_ids: list[int], scale: float | tuple[float, float] | None,
               orig_size: tuple[int, int], with_probs: bool = False,
               input_size: tuple[int, int] | None = None, max_dets: int | None = None) -> list[dict]:
    """One image's `predict` output -> LVIS/COCO result dicts in original-image coordinates.

    input_size: the (height, width) of the resized image the model saw (`Batch.image_sizes`); boxes
    are scaled per axis to orig_size (height, width). Without it, `scale` (the resize factor
    original -> input, or (sx, sy)) gives the input size. max_dets: keep the top ones by score
    (after the empty boxes are dropped, as the reference's evaluator sees them). with_probs adds
    "probs", the full per-class probability vector (contiguous class order)."""
    height, width = int(orig_size[0]), int(orig_size[1])
    if input_size is None:
        sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
        input_size = (height * float(sy), width * float(sx))
    boxes, nonempty = back_to_image(det["boxes"].detach().float().cpu(), input_size, (height, width))
    keep = torch.nonzero(nonempty).squeeze(1)
    if max_dets is not None and len(keep) > max_dets:
        top = torch.sort(det["scores"].detach().float().cpu()[keep], descending=True, stable=True).indices
        keep = keep[top[:max_dets]]
    boxes = boxes[keep]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det["scores"].detach().float().cpu()[keep].tolist()
    labels = det["labels"].detach().cpu()[keep].tolist()
    mask_probs = det.get("mask_probs")
    mask_probs = mask_probs.detach().float().cpu()[keep] if mask_probs is not None else None
    probs = det["probs"].detach().float().cpu()[keep] if with_probs else None
    results = []
    for start in range(0, len(scores), PASTE_CHUNK):
        stop = min(start + PASTE_CHUNK, len(scores))
        rles = None
        if mask_probs is not None:
            rles = encode_masks(paste_masks(mask_probs[start:stop], boxes[start:stop], height, width) >= 0.5)
        for j in range(start, stop):
            res = {"image_id": int(image_id), "category_id": int(category_ids[labels[j]]),
                   "bbox": xywh[j], "score": float(scores[j])}
            if rles is not None:
                res["segmentation"] = rles[j - start]
            if probs is not None:
                res["probs"] = probs[j].tolist()
            results.append(res)
    return results
