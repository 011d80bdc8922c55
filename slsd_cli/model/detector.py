"""Cascade Mask R-CNN: backbone + pyramid, RPN, cascade box heads, mask head.

Public interface
- `build_model(cfg, num_classes, class_image_counts=None)` builds the parts (`build_backbone`, RPN,
  cascade heads, mask head) and hands them to `CascadeMaskRCNN(cfg, backbone, rpn, roi_heads,
  mask_pooler, mask_head)`; counts give the federated-loss class weights image_count **
  federated_power (uniform when None).
- `forward(images, image_sizes, targets)` (training): images float [B, 3, H, W] RGB 0..255, a padded
  batch (normalisation and zeroing of the padding happen inside); image_sizes the valid (h, w) of
  each image; targets[i] = {"boxes" [G,4] xyxy px, "labels" [G] long in 0..C-1, "masks" [G,h,w]
  uint8/bool (image-sized or batch-padded), optional "class_targets" [G,C] soft targets (default
  one-hot), optional "loss_weight" float, optional "ignore_boxes" [K,4] xyxy px: regions whose
  overlapping proposals and anchors get no background loss (docs/method.md, the ignore band),
  optional "background_scorer": boxes [n,4] -> [n] background probabilities weighting the background
  RoIs' classification terms (soft background; see `background_scorers`)}. Returns the named scalar
  losses rpn_cls, rpn_box, cls_stage{k}, box_stage{k} (k = 0, 1, 2) and mask; their sum is the total
  loss. G = 0 is allowed.
- `predict(images, image_sizes, score_threshold=None, canvas=None)` -> per image {"boxes" [N,4] xyxy
  input px, "scores" [N], "labels" [N], "probs" [N,C] stage-averaged class probabilities (sigmoid, or the C foreground columns of
  the softmax; background = 1 - sum), "mask_probs" [N,28,28] for the predicted class}. Runs in
  eval mode whatever the module's mode, and restores it. `score_threshold` replaces the config's
  `test_score_threshold` for this call (candidates under it never reach NMS and the mask head).
- `background_scorers(images, image_sizes)` -> per image, a function boxes [n,4] -> the network's
  background probability [n] of each box (a teacher scoring a student's RoIs; docs/method.md).
- `backbone_feature_map(images, image_sizes=None, canvas=None)` -> ([B, D, h, w], stride): the plain
  backbone map (ViT tokens / CNN stride-32 stage) for class prototypes, over the padded canvas.
- Padding (`preprocess`): a ViT backbone always sees its square training canvas (side >= `canvas`,
  default `image_size`; ViTDet's square padding), a CNN the size-divisible box (`Backbone.canvas`,
  `Backbone.square_canvas`), so an image's detections do not depend on the other images of its batch.
- `layer_ids()` -> ({param name: layer id}, num_layers) for layer-wise lr decay
  (`engine.optim.param_groups`: lr scale = layer_decay ** (num_layers + 1 - id)); heads and
  pyramid have id num_layers + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slsd_cli.errors import InputError
from slsd_cli.model.backbone import Backbone, build_backbone
from slsd_cli.model.cascade import CascadeHeads
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.model.losses import mask_loss
from slsd_cli.model.mask_head import MaskHead, mask_targets, select_class
from slsd_cli.model.poolers import MultiLevelRoIAlign
from slsd_cli.model.rpn import RPN


def build_model(cfg: ModelConfig, num_classes: int, class_image_counts: list[int] | None = None
                ) -> "CascadeMaskRCNN":
    """Build the parts `cfg` describes (backbone with its starting weights, RPN, cascade box heads,
    mask head; in this order, so a seed gives the same tensors) and hand them to the detector."""
    if num_classes < 1:
        raise InputError("a detector needs at least one class", record="model")
    if class_image_counts is None:
        weights = torch.ones(num_classes)
    else:
        if len(class_image_counts) != num_classes:
            raise InputError(f"{len(class_image_counts)} class image counts for {num_classes} classes",
                             record="model")
        weights = torch.tensor([float(c) for c in class_image_counts]).clamp(min=0) ** cfg.federated_power
    backbone = build_backbone(cfg)
    strides, channels = backbone.strides, backbone.out_channels
    rpn = RPN(cfg, channels, strides)
    roi_heads = CascadeHeads(cfg, num_classes, channels, strides[:4], weights)
    mask_pooler = MultiLevelRoIAlign(strides[:4], cfg.mask_pool_size, cfg.roi_sampling_ratio)
    mask_head = MaskHead(channels, cfg.mask_head_convs, cfg.mask_head_channels, num_classes)
    return CascadeMaskRCNN(cfg, backbone, rpn, roi_heads, mask_pooler, mask_head)


class CascadeMaskRCNN(nn.Module):
    """The detector over parts built elsewhere (`build_model`), as torchvision's `GeneralizedRCNN`;
    `cfg` gives its input normalisation and test-time settings."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone, rpn: RPN, roi_heads: CascadeHeads,
                 mask_pooler: MultiLevelRoIAlign, mask_head: MaskHead):
        super().__init__()
        self.cfg = cfg
        self.num_classes = roi_heads.num_classes
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head

    # ------------------------------------------------------------------ input
    def preprocess(self, images: Tensor, image_sizes: list[tuple[int, int]] | None,
                   canvas: int | None = None) -> Tensor:
        """Normalise, zero the padding (as detectron2 pads after normalising), pad to the backbone's
        canvas (a ViT: the square of side >= `canvas`, default image_size; a CNN: size divisibility)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images must be a [B, 3, H, W] batch, got shape {tuple(images.shape)}", record="model")
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if image_sizes is not None:
            if len(image_sizes) != x.shape[0]:
                raise InputError(f"{len(image_sizes)} image sizes for a batch of {x.shape[0]}", record="model")
            h_max, w_max = x.shape[-2:]
            if any(h > h_max or w > w_max for h, w in image_sizes):
                raise InputError(f"image sizes {image_sizes} exceed the batch {h_max}x{w_max}", record="model")
            if any(h < h_max or w < w_max for h, w in image_sizes):
                hs = torch.tensor([h for h, _ in image_sizes], device=x.device).view(-1, 1, 1, 1)
                ws = torch.tensor([w for _, w in image_sizes], device=x.device).view(-1, 1, 1, 1)
                rows = torch.arange(h_max, device=x.device).view(1, 1, -1, 1)
                cols = torch.arange(w_max, device=x.device).view(1, 1, 1, -1)
                x = x * ((rows < hs) & (cols < ws)).to(x.dtype)
        height, width = self.backbone.canvas(x.shape[-2], x.shape[-1], canvas)
        ph, pw = height - x.shape[-2], width - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return x

    def _check_targets(self, targets: list[dict], image_sizes: list[tuple[int, int]], device) -> list[dict]:
        out = []
        c = self.num_classes
        for i, t in enumerate(targets):
            where = f"targets[{i}]"
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise InputError(f"missing {key!r}", record=where)
            boxes = t["boxes"].to(device=device, dtype=torch.float32)
            labels = t["labels"].to(device=device, dtype=torch.long)
            masks = t["masks"].to(device)
            g = labels.shape[0]
            if boxes.shape != (g, 4) or labels.dim() != 1:
                raise InputError(f"boxes {tuple(boxes.shape)} and labels {tuple(labels.shape)} disagree", record=where)
            if masks.dim() != 3 or masks.shape[0] != g:
                raise InputError(f"masks must be [G, H, W] with G = {g}, got {tuple(masks.shape)}", record=where)
            if g:
                if int(labels.min()) < 0 or int(labels.max()) >= c:
                    raise InputError(f"labels must lie in 0..{c - 1}", record=where)
                if not bool(torch.isfinite(boxes).all()):
                    raise InputError("non-finite box", record=where)
                bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
                if bool(bad.any()):
                    j = int(torch.nonzero(bad)[0])
                    raise InputError(f"degenerate box {boxes[j].tolist()}", record=f"{where}.boxes[{j}]")
            if t.get("class_targets") is not None:
                soft = t["class_targets"].to(device=device, dtype=torch.float32)
                if soft.shape != (g, c):
                    raise InputError(f"class_targets must be [{g}, {c}], got {tuple(soft.shape)}", record=where)
                if not bool(torch.isfinite(soft).all()) or (g and (float(soft.min()) < 0 or float(soft.max()) > 1)):
                    raise InputError("class_targets must be finite and in [0, 1]", record=where)
            else:
                soft = F.one_hot(labels, c).float()
            weight = t.get("loss_weight", 1.0)
            weight = float(weight.item() if isinstance(weight, Tensor) else weight)
            ignore = t.get("ignore_boxes")
            ignore = boxes.new_zeros((0, 4)) if ignore is None else ignore.to(device=device, dtype=torch.float32)
            if ignore.dim() != 2 or ignore.shape[1] != 4 or not bool(torch.isfinite(ignore).all()):
                raise InputError(f"ignore_boxes must be finite [K, 4], got {tuple(ignore.shape)}", record=where)
            out.append({"boxes": boxes, "labels": labels, "masks": masks, "class_targets": soft,
                        "loss_weight": weight, "ignore_boxes": ignore,
                        "background_scorer": t.get("background_scorer")})
        return out

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None) -> dict[str, Tensor]:
        if targets is None:
            raise InputError("forward() computes training losses and needs targets; use predict() for "
                             "detections", record="model")
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        x = self.preprocess(images, image_sizes)
        if len(targets) != x.shape[0]:
            raise InputError(f"{len(targets)} targets for a batch of {x.shape[0]}", record="model")
        targets = self._check_targets(targets, image_sizes, x.device)
        features = self.backbone(x)
        proposals, losses = self.rpn(features, image_sizes, targets)
        box_losses, sampled = self.roi_heads.forward_train(features[:4], proposals, targets, image_sizes)
        losses.update(box_losses)
        losses["mask"] = self._mask_loss(features[:4], sampled, targets)
        return losses

    def _mask_loss(self, features: list[Tensor], sampled: list[dict], targets: list[dict]) -> Tensor:
        boxes, logits_targets, labels, weights = [], [], [], []
        for s, t in zip(sampled, targets):
            fg = s["foreground"]
            b, m = s["boxes"][fg], s["matched"][fg]
            boxes.append(b)
            if len(b):
                logits_targets.append(mask_targets(t["masks"], b, m, 2 * self.cfg.mask_pool_size))
                labels.append(t["labels"][m])
            weights.append(torch.full((len(b),), t["loss_weight"], device=b.device))
        num = sum(len(b) for b in boxes)
        if num == 0:
            # no foreground RoI: a zero loss that still touches the mask head's parameters
            return sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        logits = self.mask_head(self.mask_pooler(features, boxes))
        roi_weights = torch.cat(weights)
        return mask_loss(select_class(logits, torch.cat(labels)), torch.cat(logits_targets),
                         None if bool((roi_weights == 1).all()) else roi_weights)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], score_threshold: float | None = None,
                canvas: int | None = None, options: ModelConfig | None = None) -> list[dict]:
        """`options`: a config whose test keys (NMS or soft-NMS, maskness, max_detections, score
        threshold) replace this model's for this call (`Predictor`'s per-run settings)."""
        was_training = self.training
        self.eval()
        try:
            options = self.cfg if options is None else options
            threshold = options.test_score_threshold if score_threshold is None else float(score_threshold)
            return self._predict(images, [(int(h), int(w)) for h, w in image_sizes], threshold, canvas, options)
        finally:
            self.train(was_training)

    def _predict(self, images: Tensor, image_sizes: list[tuple[int, int]], score_threshold: float,
                 canvas: int | None, options: ModelConfig) -> list[dict]:
        from slsd_cli.model.nms import rescore_by_maskness, select_detections

        x = self.preprocess(images, image_sizes, canvas)
        features = self.backbone(x)
        proposals, _ = self.rpn(features, image_sizes)
        boxes, probs = self.roi_heads.forward_test(features[:4], proposals, image_sizes)
        results = [select_detections(b, p, score_threshold, options.test_nms, options.max_detections,
                                     options.test_soft_nms, options.test_soft_nms_iou, options.test_soft_nms_sigma)
                   for b, p in zip(boxes, probs)]
        mask_probs = self._mask_probs(features[:4], results, x)
        for r, mp in zip(results, mask_probs.split([len(r["boxes"]) for r in results])):
            r["mask_probs"] = mp
        if options.test_maskness is not None:
            results = [rescore_by_maskness(r, options.test_maskness) for r in results]
        return results

    def _mask_probs(self, features: list[Tensor], results: list[dict], x: Tensor, chunk: int = 512) -> Tensor:
        """Mask probabilities [N, M, M] of the detections on their predicted class, `chunk` RoIs at a
        time (soft-NMS can keep thousands; the class-specific logits are [n, C, M, M])."""
        m = 2 * self.cfg.mask_pool_size
        boxes = torch.cat([torch.cat([torch.full_like(r["boxes"][:, :1], i), r["boxes"]], dim=1)
                           for i, r in enumerate(results)])
        labels = torch.cat([r["labels"] for r in results])
        out = [x.new_zeros((0, m, m), dtype=torch.float32)]
        for start in range(0, len(labels), chunk):
            rois = boxes[start:start + chunk]
            per_image = [rois[rois[:, 0] == i, 1:] for i in range(len(results))]
            logits = self.mask_head(self.mask_pooler(features, per_image))
            out.append(torch.sigmoid(select_class(logits, labels[start:start + chunk]).float()))
        return torch.cat(out)

    @torch.no_grad()
    def background_scorers(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list:
        """Per image, a function `boxes [n, 4]` (input px) -> background probability `[n]` of each box
        as this network scores it: the cascade run on the boxes as proposals, stage-averaged class
        probabilities as in `predict`, background = 1 - sum (softmax) or 1 - max (sigmoid) over the
        classes. The backbone runs once here (eval mode); each call runs only the box heads."""
        was_training = self.training
        self.eval()
        try:
            sizes = [(int(h), int(w)) for h, w in image_sizes]
            features = self.backbone(self.preprocess(images, sizes))[:4]
        finally:
            self.train(was_training)

        def scorer(i: int):
            @torch.no_grad()
            def score(boxes: Tensor) -> Tensor:
                if boxes.shape[0] == 0:
                    return boxes.new_zeros(0)
                _, probs = self.roi_heads.forward_test([f[i:i + 1] for f in features], [boxes.detach().float()],
                                                       [sizes[i]])
                p = probs[0]
                fg = p.sum(dim=1) if self.cfg.classifier == "softmax" else p.max(dim=1).values
                return (1.0 - fg).clamp(0.0, 1.0)
            return score

        return [scorer(i) for i in range(len(sizes))]

    # ------------------------------------------------------------------ prototypes and optimiser
    def backbone_feature_map(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None,
                             canvas: int | None = None) -> tuple[Tensor, int]:
        """Plain backbone features [B, D, h, w] of 0..255 RGB images over the padded canvas (see
        `preprocess`), and their stride in input pixels."""
        return self.backbone.feature_map(self.preprocess(images, image_sizes, canvas))

    def layer_ids(self) -> tuple[dict[str, int], int]:
        backbone_ids, num_layers = self.backbone.layer_ids()
        ids = {}
        for name, _ in self.named_parameters():
            if name.startswith("backbone."):
                ids[name] = backbone_ids[name[len("backbone."):]]
            else:
                ids[name] = num_layers + 1
        return ids, num_layers
