"""Multi-level RoIAlign: each box is pooled from the pyramid level that suits its size.

Level k = floor(4 + log2(sqrt(area) / 224)), clamped to the available levels (the FPN paper's rule,
as torchvision's MultiScaleRoIAlign and detectron2's ROIPooler). We know each level's stride, so
we call torchvision.ops.roi_align per level directly (aligned=True, as detectron2's ROIAlignV2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


class MultiLevelRoIAlign(nn.Module):
    def __init__(self, strides: list[int], output_size: int, sampling_ratio: int = 0,
                 canonical_size: float = 224.0, canonical_level: int = 4):
        super().__init__()
        self.strides = list(strides)
        self.levels = [int(round(math.log2(s))) for s in strides]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level

    def level_of(self, boxes: Tensor) -> Tensor:
        """Index into `strides` of the level each box [N, 4] is pooled from."""
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
        level = torch.floor(self.canonical_level + torch.log2(area.sqrt() / self.canonical_size + 1e-8))
        level = level.clamp(self.levels[0], self.levels[-1]).long()
        return level - self.levels[0]

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """features: one map [B, C, h, w] per stride; boxes: per image [n_i, 4] -> [sum n_i, C, S, S]."""
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=torch.float32, device=b.device),
                                     b.float()], dim=1) for i, b in enumerate(boxes)], dim=0)
        if len(features) == 1:
            return roi_align(features[0].float(), rois, self.output_size, 1.0 / self.strides[0],
                             self.sampling_ratio, aligned=True).to(features[0].dtype)
        level = self.level_of(rois[:, 1:])
        c = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], c, self.output_size, self.output_size))
        for k, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(level == k).squeeze(1)
            if idx.numel() == 0:
                continue
            # boxes stay float32 (bf16 would round a 1000-px coordinate by ~4 px)
            pooled = roi_align(feat.float(), rois[idx], self.output_size, 1.0 / stride,
                               self.sampling_ratio, aligned=True)
            out = out.index_copy(0, idx, pooled.to(out.dtype))
        return out
