"""Region proposal network: anchors, a shared conv head, IoU matching + balanced sampling for the
losses, and proposals (per-level top-k, decode, clip, per-level NMS, per-image top-k).

Losses (as detectron2's RPN): objectness BCE over the sampled anchors and L1 box regression over
the sampled positives, both summed and divided by `batch_size_per_image * num_images`.
An image's `loss_weight` multiplies its anchors' terms. A negative anchor overlapping one of the
image's `ignore_boxes` at IoU >= the positive threshold is ignored (not sampled), like an anchor
between the two thresholds (docs/method.md, the ignore band).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from slsd_cli.model.box_coder import BoxCoder, clip_boxes, nonempty
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.model.proposal_matching import in_ignore_regions, match, sample


class AnchorGenerator(nn.Module):
    """One anchor size per level, `ratios` aspect ratios (h/w), centred on each feature cell's corner
    (offset 0, as detectron2)."""

    def __init__(self, sizes: list[int], ratios: list[float], strides: list[int]):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor sizes for {len(strides)} pyramid levels")
        self.strides = strides
        cells = []
        for size in sizes:
            area = float(size) ** 2
            rows = []
            for r in ratios:
                w = math.sqrt(area / r)
                h = w * r
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
            cells.append(torch.tensor(rows, dtype=torch.float32))
        self.cells = cells
        self.num_anchors = len(ratios)
        self._cache: dict[tuple, list[Tensor]] = {}

    def forward(self, shapes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors [h*w*A, 4] per level for feature maps of the given sizes."""
        key = (tuple(shapes), str(device))
        if key not in self._cache:
            out = []
            for (h, w), stride, cell in zip(shapes, self.strides, self.cells):
                ys = torch.arange(h, dtype=torch.float32, device=device) * stride
                xs = torch.arange(w, dtype=torch.float32, device=device) * stride
                yy, xx = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
                out.append((shifts + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = out
        return self._cache[key]


class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int, num_convs: int):
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(num_convs)
                                     for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())])
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """-> per level: logits [B, h*w*A], deltas [B, h*w*A, 4]."""
        logits, deltas = [], []
        for f in features:
            t = self.convs(f)
            b, _, h, w = t.shape
            logits.append(self.objectness(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.deltas(t).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return logits, deltas


class RPN(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int, strides: list[int]):
        super().__init__()
        self.cfg = cfg
        self.anchors = AnchorGenerator(cfg.anchor_sizes, cfg.anchor_ratios, strides)
        self.head = RPNHead(channels, self.anchors.num_anchors, cfg.rpn_convs)
        self.coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, features: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """-> (proposals [n_i, 4] per image, detached; losses (training only))."""
        logits, deltas = self.head(features)
        anchors = self.anchors([tuple(f.shape[-2:]) for f in features], features[0].device)
        proposals = self._proposals(anchors, logits, deltas, image_sizes)
        losses = {}
        if targets is not None:
            losses = self._losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets)
        return proposals, losses

    @torch.no_grad()
    def _proposals(self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor],
                   image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        cfg = self.cfg
        pre = cfg.rpn_pre_nms_topk_train if self.training else cfg.rpn_pre_nms_topk_test
        post = cfg.rpn_post_nms_topk_train if self.training else cfg.rpn_post_nms_topk_test
        num_images = logits[0].shape[0]
        boxes_all, scores_all, levels_all = [], [], []
        for lvl, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre, lg.shape[1])
            scores, idx = lg.detach().float().topk(k, dim=1)
            sel_deltas = torch.gather(dl.detach().float(), 1, idx.unsqueeze(-1).expand(-1, -1, 4))
            sel_anchors = anc[idx.reshape(-1)]
            boxes = self.coder.decode(sel_deltas.reshape(-1, 4), sel_anchors).view(num_images, k, 4)
            boxes_all.append(boxes)
            scores_all.append(scores)
            levels_all.append(torch.full((k,), lvl, dtype=torch.long, device=boxes.device))
        boxes = torch.cat(boxes_all, 1)
        scores = torch.cat(scores_all, 1)
        levels = torch.cat(levels_all)
        out = []
        for i, (h, w) in enumerate(image_sizes):
            b, s, lv = boxes[i], scores[i], levels
            ok = torch.isfinite(b).all(1) & torch.isfinite(s)
            b, s, lv = b[ok], s[ok], lv[ok]
            b = clip_boxes(b, h, w)
            keep = nonempty(b)
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, cfg.rpn_nms)[:post]
            out.append(b[keep])
        return out

    def _losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        cfg = self.cfg
        n = cfg.rpn_batch_size_per_image
        cls_terms, box_terms = [], []
        for i, t in enumerate(targets):
            gt = t["boxes"]
            weight = float(t.get("loss_weight", 1.0))
            with torch.no_grad():
                idx, labels = match(box_iou(gt, anchors), cfg.rpn_iou_thresholds[0], cfg.rpn_iou_thresholds[1],
                                    allow_low_quality=True)
                ignored = in_ignore_regions(anchors, t.get("ignore_boxes"), cfg.rpn_iou_thresholds[1])
                if ignored is not None:
                    labels[(labels == 0) & ignored] = -1
                pos, neg = sample(labels, n, cfg.rpn_positive_fraction)
            chosen = torch.cat([pos, neg])
            target = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits)
            cls = F.binary_cross_entropy_with_logits(logits[i, chosen].float(), target.float(), reduction="sum")
            cls_terms.append(cls * weight)
            if len(pos):
                with torch.no_grad():
                    box_target = self.coder.encode(anchors[pos], gt[idx[pos]])
                box_terms.append(F.l1_loss(deltas[i, pos].float(), box_target, reduction="sum") * weight)
            else:
                box_terms.append(deltas[i, :0].float().sum())
        norm = float(n * len(targets))
        return {"rpn_cls": torch.stack(cls_terms).sum() / norm, "rpn_box": torch.stack(box_terms).sum() / norm}
