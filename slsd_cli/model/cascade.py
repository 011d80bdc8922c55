"""Cascade R-CNN box heads (Cai & Vasconcelos), as in the ViTDet/EVA-02 LVIS detectors.

Three stages; stage k matches its input boxes to the ground truth at IoU `cascade_ious[k]`, pools
7x7 RoI features (gradient scaled by 1/num_stages), runs a 4conv(LN)+1fc head and predicts C+1
class logits and one class-agnostic box delta (weights `cascade_box_weights[k]`). Training: stage 0
takes the RPN proposals plus the ground-truth boxes and samples `rois_per_image` RoIs with at most
`positive_fraction` positives; stage k+1 takes stage k's regressed (detached, clipped) boxes.
Inference: the stages' class probabilities are averaged, boxes come from the last stage.

Ignore regions (a target's optional `ignore_boxes [K, 4]`; docs/method.md): in every stage, a
background RoI whose best IoU with an ignore region is >= that stage's foreground IoU gets zero
classification weight (background RoIs have no box or mask loss). Sampling and every other RoI's
term are exactly as without the regions; the normaliser (the number of RoIs) is unchanged.

Soft background (a target's optional `background_scorer`, a function boxes [n, 4] -> the teacher's
background probability [n]; docs/method.md): the image's stage-0 RoIs are scored once, and in every
stage each background RoI's classification term is weighted by its score, normalised to mean 1 over
the image's background RoIs of that stage (Soft Teacher's reliability weighting). Foreground terms
are untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from slsd_cli.model.box_coder import BoxCoder, clip_boxes
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.model.losses import (box_regression_loss, federated_classes, gather_class_targets, labeled_classes,
                                   sigmoid_classification_loss, softmax_classification_loss)
from slsd_cli.model.proposal_matching import in_ignore_regions, match, sample
from slsd_cli.model.poolers import MultiLevelRoIAlign


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    return _ScaleGradient.apply(x, scale)


class BoxHead(nn.Module):
    """`num_convs` 3x3 convs (LayerNorm, ReLU) then one fc (ReLU): [n, C, S, S] -> [n, fc_dim]."""

    def __init__(self, in_channels: int, pool: int, num_convs: int, conv_dim: int, fc_dim: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        layers, c = [], in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, conv_dim, 3, padding=1, bias=False), LayerNorm2d(conv_dim), nn.ReLU()]
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * pool * pool, fc_dim)
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_uniform_(self.fc.weight, a=1)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))


class CascadeStage(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int):
        super().__init__()
        self.head = BoxHead(in_channels, cfg.box_pool_size, cfg.box_head_convs, cfg.box_head_conv_dim,
                            cfg.box_head_fc_dim)
        self.cls_score = nn.Linear(cfg.box_head_fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(cfg.box_head_fc_dim, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        if cfg.classifier == "sigmoid":  # start at a 1% foreground prior (as Detic's federated-loss heads)
            nn.init.constant_(self.cls_score.bias, -math.log(99.0))
        else:
            nn.init.zeros_(self.cls_score.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.head(x)
        return self.cls_score(h), self.bbox_pred(h)


class CascadeHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, channels: int, strides: list[int],
                 class_weights: Tensor):
        super().__init__()
        if len(cfg.cascade_ious) != len(cfg.cascade_box_weights):
            raise ValueError("cascade_ious and cascade_box_weights need one entry per stage")
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_stages = len(cfg.cascade_ious)
        self.pooler = MultiLevelRoIAlign(strides, cfg.box_pool_size, cfg.roi_sampling_ratio)
        self.stages = nn.ModuleList([CascadeStage(cfg, channels, num_classes) for _ in range(self.num_stages)])
        self.coders = [BoxCoder(w) for w in cfg.cascade_box_weights]
        self.register_buffer("class_weights", class_weights.float(), persistent=False)

    # ------------------------------------------------------------------ helpers
    def probabilities(self, logits: Tensor) -> Tensor:
        """[n, C+1] logits -> [n, C] class probabilities (sigmoid, or softmax without background)."""
        if self.cfg.classifier == "sigmoid":
            return torch.sigmoid(logits[:, :self.num_classes].float())
        return F.softmax(logits.float(), dim=1)[:, :self.num_classes]

    def _match(self, boxes: list[Tensor], targets: list[dict], iou: float) -> tuple[list[Tensor], list[Tensor]]:
        matched, foreground = [], []
        for b, t in zip(boxes, targets):
            idx, labels = match(box_iou(t["boxes"], b), iou, iou)
            matched.append(idx)
            foreground.append(labels == 1)
        return matched, foreground

    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]) -> list[dict]:
        """Stage-0 RoIs: proposals + ground truth, matched at cascade_ious[0], balanced sample."""
        cfg = self.cfg
        out = []
        for props, t in zip(proposals, targets):
            boxes = torch.cat([props, t["boxes"].to(props.dtype)], dim=0)
            idx, labels = match(box_iou(t["boxes"], boxes), cfg.cascade_ious[0], cfg.cascade_ious[0])
            pos, neg = sample(labels, cfg.rois_per_image, cfg.positive_fraction)
            chosen = torch.cat([pos, neg])
            out.append({"boxes": boxes[chosen], "matched": idx[chosen], "foreground": labels[chosen] == 1})
        return out

    # ------------------------------------------------------------------ training
    def forward_train(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict],
                      image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], list[dict]]:
        """-> (losses cls_stage{k}, box_stage{k}; the stage-0 sampled RoIs per image, for the mask head)."""
        sampled = self.sample_proposals(proposals, targets)
        boxes = [s["boxes"] for s in sampled]
        matched = [s["matched"] for s in sampled]
        foreground = [s["foreground"] for s in sampled]
        weights = [torch.full((len(b),), float(t["loss_weight"]), device=b.device) for b, t in zip(boxes, targets)]
        roi_weights = torch.cat(weights)
        if bool((roi_weights == 1).all()):
            roi_weights = None
        with torch.no_grad():  # the teacher's background probability of each stage-0 RoI (soft background)
            reliability = [None if t.get("background_scorer") is None else t["background_scorer"](b).to(b.dtype)
                           for b, t in zip(boxes, targets)]
        losses = {}
        for k, (stage, coder) in enumerate(zip(self.stages, self.coders)):
            if k > 0:
                with torch.no_grad():
                    matched, foreground = self._match(boxes, targets, self.cfg.cascade_ious[k])
            feats = scale_gradient(self.pooler(features, boxes), 1.0 / self.num_stages)
            logits, deltas = stage(feats)
            fg = torch.cat(foreground)
            cls_weights = self._classification_weights(boxes, targets, foreground, roi_weights, reliability,
                                                       self.cfg.cascade_ious[k])
            with torch.no_grad():
                soft = torch.cat([gather_class_targets(t["class_targets"], m, f)
                                  for t, m, f in zip(targets, matched, foreground)])
                target_deltas = torch.zeros_like(deltas, dtype=torch.float32)
                fg_idx = torch.nonzero(fg).squeeze(1)
                if fg_idx.numel():
                    rois = torch.cat(boxes)[fg_idx]
                    gt = torch.cat([t["boxes"][m] if len(t["boxes"]) else t["boxes"].new_zeros((len(m), 4))
                                    for t, m in zip(targets, matched)])[fg_idx]
                    target_deltas[fg_idx] = coder.encode(rois, gt)
            if self.cfg.classifier == "sigmoid":
                fed = None
                if self.cfg.use_federated:
                    present = None  # federated_set "targets": every class a (smoothed) target reaches
                    if self.cfg.federated_set == "labels":
                        present = labeled_classes([t["labels"] for t in targets], matched, foreground,
                                                  soft.shape[1])
                    fed = federated_classes(soft, self.class_weights, self.cfg.federated_num_classes,
                                            present=present)
                losses[f"cls_stage{k}"] = sigmoid_classification_loss(logits, soft, cls_weights, fed)
            else:
                losses[f"cls_stage{k}"] = softmax_classification_loss(logits, soft, fg, cls_weights)
            losses[f"box_stage{k}"] = box_regression_loss(deltas, target_deltas, fg, roi_weights)
            if k + 1 < self.num_stages:
                with torch.no_grad():
                    new = coder.decode(deltas.detach(), torch.cat(boxes))
                    boxes = [clip_boxes(b, h, w) for b, (h, w) in zip(new.split([len(b) for b in boxes]), image_sizes)]
        return losses, sampled

    @torch.no_grad()
    def _classification_weights(self, boxes: list[Tensor], targets: list[dict], foreground: list[Tensor],
                                roi_weights: Tensor | None, reliability: list[Tensor | None],
                                iou: float) -> Tensor | None:
        """The classification weights [N] of a stage: `roi_weights`, times the soft-background weight
        of each background RoI (its `reliability` over the mean of the image's background RoIs), and
        0 for the background RoIs in an ignore region (IoU >= `iou`). `roi_weights` itself (the exact
        plain path) when no image has ignore regions or a background scorer."""
        ignored = [in_ignore_regions(b, t.get("ignore_boxes"), iou) for b, t in zip(boxes, targets)]
        if all(m is None for m in ignored) and all(r is None for r in reliability):
            return roi_weights
        factors = []
        for f, m, r in zip(foreground, ignored, reliability):
            factor = torch.ones(f.shape[0], device=f.device)
            background = ~f
            if r is not None and bool(background.any()):
                mean = (r * background).sum() / background.sum()
                factor = torch.where(background, r / mean.clamp_min(torch.finfo(r.dtype).tiny), factor)
            if m is not None:
                factor = torch.where(m & background, torch.zeros_like(factor), factor)
            factors.append(factor)
        factor = torch.cat(factors)
        return factor if roi_weights is None else roi_weights * factor

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_test(self, features: list[Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """-> (last-stage boxes [n_i, 4], stage-averaged probabilities [n_i, C]) per image."""
        counts = [len(p) for p in proposals]
        boxes = proposals
        probs = None
        for stage, coder in zip(self.stages, self.coders):
            logits, deltas = stage(self.pooler(features, boxes))
            p = self.probabilities(logits)
            probs = p if probs is None else probs + p
            new = coder.decode(deltas, torch.cat(boxes).float())
            boxes = [clip_boxes(b, h, w) for b, (h, w) in zip(new.split(counts), image_sizes)]
        probs = probs / self.num_stages
        return boxes, list(probs.split(counts))
