"""Class-specific mask head (Mask R-CNN): 14x14 RoI features -> `mask_head_convs` 3x3 convs
(LayerNorm, ReLU) -> 2x2 deconv (ReLU) -> 1x1 conv to one 28x28 logit map per class.

Training uses the stage-0 foreground RoIs; the target is the matched ground-truth mask cropped and
resized to the RoI by RoIAlign (aligned, then >= 0.5), the loss a per-pixel BCE on the channel of
the ground-truth class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


class MaskHead(nn.Module):
    def __init__(self, in_channels: int, num_convs: int, channels: int, num_classes: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        layers, c = [], in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, channels, 3, padding=1, bias=False), LayerNorm2d(channels), nn.ReLU()]
            c = channels
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, channels, 2, 2)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in list(self.convs) + [self.deconv]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[n, C_in, S, S] -> logits [n, num_classes, 2S, 2S]."""
        return self.predictor(torch.relu(self.deconv(self.convs(x))))


def select_class(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """[n, K, M, M] logits, labels [n] -> [n, M, M] (the channel of each RoI's class)."""
    return mask_logits[torch.arange(len(labels), device=labels.device), labels]


@torch.no_grad()
def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """Binary [n, size, size] targets: gt_masks[matched[i]] cropped to boxes[i] and resized."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    used, inverse = torch.unique(matched, return_inverse=True)
    masks = gt_masks[used].unsqueeze(1).float()
    rois = torch.cat([inverse.to(boxes.dtype).unsqueeze(1), boxes.float()], dim=1)
    return (roi_align(masks, rois, size, 1.0, 0, aligned=True).squeeze(1) >= 0.5).float()
