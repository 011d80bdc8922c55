"""Box <-> regression-delta transform (the R-CNN parameterisation, xyxy boxes, widths = x2 - x1).

`encode(boxes, targets)` gives deltas (dx, dy, dw, dh) scaled by `weights`; `decode(deltas, boxes)`
inverts it, clamping dw/dh at log(1000/16) so a wild prediction cannot overflow exp().
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: tuple[float, float, float, float] | list[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """Deltas [N, 4] that turn `boxes` [N, 4] into `targets` [N, 4]."""
        boxes = boxes.float()
        targets = targets.float()
        wx, wy, ww, wh = self.weights
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * w
        cy = boxes[:, 1] + 0.5 * h
        tw = targets[:, 2] - targets[:, 0]
        th = targets[:, 3] - targets[:, 1]
        tcx = targets[:, 0] + 0.5 * tw
        tcy = targets[:, 1] + 0.5 * th
        return torch.stack([
            wx * (tcx - cx) / w,
            wy * (tcy - cy) / h,
            ww * torch.log(tw / w),
            wh * torch.log(th / h),
        ], dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply deltas [N, 4] to boxes [N, 4] -> boxes [N, 4] (float32)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * w
        cy = boxes[:, 1] + 0.5 * h
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3] / wh).clamp(max=self.scale_clamp)
        pcx = dx * w + cx
        pcy = dy * h + cy
        pw = torch.exp(dw) * w
        ph = torch.exp(dh) * h
        return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip xyxy boxes to an image of the given size."""
    x = boxes[:, 0::2].clamp(0, width)
    y = boxes[:, 1::2].clamp(0, height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def nonempty(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
