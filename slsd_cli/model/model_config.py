"""The `model:` section of a recipe.

Defaults are the LVIS EVA-02-L Cascade Mask R-CNN (the public EVA-02 / ViTDet LVIS configs; see
docs/design.md). Every width is configurable so the tiny CPU recipe can use narrow heads; see
`tiny_cnn_config()` (the `model:` section of the packaged `synthetic_tiny` recipe) and
`tiny_eva_config()` for the small settings the tests use. Every numeric key declares its valid range
(`ranged`, checked when a recipe is read).

Backbones
- `eva02_large`, `eva02_base`, `eva02_small`, `eva02_tiny`: our EVA-02 ViT (timm's Eva blocks, our
  windowed forward) + simple feature pyramid. `vit_embed_dim` / `vit_depth` / `vit_num_heads` /
  `global_blocks` override the preset (for tiny random-init test models).
- any other name: a timm CNN that supports `features_only=True` and returns 4 feature maps at
  strides 4, 8, 16, 32 (ResNet, ResNeXt, ConvNeXt, EfficientNet, RegNet, ...; e.g. `resnet18`) + an
  FPN. Plain ViTs without `features_only` are not accepted (use the eva02_* presets).

Weights: `pretrained: true` loads timm's weights for `pretrained_name` (default: the preset's MIM
weights, e.g. `eva02_large_patch14_224.mim_m38m`; needs internet), `weights: PATH` loads a local
safetensors / .pth file (loaded with weights_only=True) and has priority over `pretrained`.
EVA-02 weights with a 14-pixel patch go to our patch 16 as `patch_resize` says: `eva` (default)
as EVA-02 made its released `*_p14to16` MIM files, which its detectors and the paper start from;
`timm` as timm resizes (docs/lvis_reproduction.md gives the difference).
`init_from: RUN` starts the whole detector from a saved one (a teacher run, or `slsd convert`'s
output for the released EVA-02 LVIS detectors); its categories and tensors must match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from slsd_cli.typed_yaml import apply_flags, from_dict, ranged, read_mapping

# The tiny CPU detector is defined once, in the packaged recipe (model/ -> ../recipes/).
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic_tiny.yaml"


@dataclass
class ModelConfig:
    # ---- backbone
    backbone: str = "eva02_large"
    pretrained: bool = False
    pretrained_name: Optional[str] = None     # timm name[.tag] of the weights; None = preset default
    weights: Optional[str] = None             # local weights file for the backbone
    patch_resize: Literal["eva", "timm"] = "eva"  # patch-14 EVA weights -> 16: EVA-02's p14to16, or timm's PI-resize
    init_from: Optional[str] = None           # a detector run (e.g. from `slsd convert`) whose weights start training
    image_size: int = ranged(1024, "[32, 16384]")                   # nominal (square) input size: sets the ViT pos-embed grid
    patch_size: int = ranged(16, "[1, 1024]")
    window_size: int = ranged(16, "[1, 1024]")
    global_blocks: Optional[list[int]] = ranged(None, "[0, inf)") # None = preset (L: 5,11,17,23; 12-deep: 2,5,8,11)
    window_key_mask: bool = True              # mask padded window keys (false: attend to them, as detectron2)
    vit_embed_dim: Optional[int] = ranged(None, "[1, inf)")      # None = preset
    vit_depth: Optional[int] = ranged(None, "[1, inf)")
    vit_num_heads: Optional[int] = ranged(None, "[1, inf)")
    drop_path: float = ranged(0.4, "[0, 1)")
    grad_checkpointing: bool = False          # activation checkpointing of the ViT blocks
    fpn_channels: int = ranged(256, "[1, inf)")
    # ---- RPN
    anchor_sizes: list[int] = ranged(default_factory=lambda: [32, 64, 128, 256, 512], interval="[1, inf)")  # one per level p2..p6
    anchor_ratios: list[float] = ranged(default_factory=lambda: [0.5, 1.0, 2.0], interval="(0, inf)")
    rpn_convs: int = ranged(2, "[0, inf)")
    rpn_iou_thresholds: list[float] = ranged(default_factory=lambda: [0.3, 0.7], interval="[0, 1]")
    rpn_batch_size_per_image: int = ranged(256, "[1, inf)")
    rpn_positive_fraction: float = ranged(0.5, "(0, 1]")
    rpn_pre_nms_topk_train: int = ranged(2000, "[1, inf)")       # per level
    rpn_pre_nms_topk_test: int = ranged(1000, "[1, inf)")        # per level
    rpn_post_nms_topk_train: int = ranged(1000, "[1, inf)")      # per image
    rpn_post_nms_topk_test: int = ranged(1000, "[1, inf)")       # per image
    rpn_nms: float = ranged(0.7, "(0, 1]")
    # ---- RoI heads
    rois_per_image: int = ranged(512, "[1, inf)")
    positive_fraction: float = ranged(0.25, "(0, 1]")
    box_pool_size: int = ranged(7, "[1, 64]")
    mask_pool_size: int = ranged(14, "[1, 128]")
    roi_sampling_ratio: int = ranged(0, "[0, 64]")              # RoIAlign sampling ratio (0 = adaptive, as detectron2)
    box_head_convs: int = ranged(4, "[0, inf)")
    box_head_conv_dim: int = ranged(256, "[1, inf)")
    box_head_fc_dim: int = ranged(1024, "[1, inf)")
    mask_head_convs: int = ranged(4, "[0, inf)")
    mask_head_channels: int = ranged(256, "[1, inf)")
    cascade_ious: list[float] = ranged(default_factory=lambda: [0.5, 0.6, 0.7], interval="(0, 1)")
    cascade_box_weights: list[list[float]] = ranged(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
        interval="(0, inf)")
    # ---- classification loss
    classifier: Literal["sigmoid", "softmax"] = "sigmoid"
    use_federated: bool = True                # sigmoid only
    federated_num_classes: int = ranged(50, "[1, inf)")
    federated_power: float = ranged(0.5, "[0, inf)")
    # which classes always enter the federated loss: "labels" = the classes of the ground truths (or
    # pseudo-labels) matched to foreground RoIs (detectron2 / EVA-02); "targets" = every class with a
    # non-zero target, which under label smoothing is every class: the federated loss is then plain BCE
    federated_set: Literal["labels", "targets"] = "labels"
    # ---- inference
    test_score_threshold: float = ranged(0.02, "[0, 1]")
    test_nms: float = ranged(0.5, "(0, 1]")
    max_detections: int = ranged(300, "[1, inf)")           # per image, after hard NMS (soft-NMS keeps all)
    # class-wise soft-NMS instead of test_nms (model/nms.py; the EVA-02 "sys" evaluation: linear, IoU 0.6)
    test_soft_nms: Literal["none", "linear", "gaussian"] = "none"
    test_soft_nms_iou: float = ranged(0.3, "[0, 1]")        # linear: scores decay by 1 - IoU at IoU >= this
    test_soft_nms_sigma: float = ranged(0.5, "(0, inf)")    # gaussian: scores decay by exp(-IoU^2 / sigma)
    test_maskness: Optional[float] = ranged(None, "[0, 1)") # score x mean mask probability above this (sys: 0.5)
    # ---- input normalisation (RGB 0..255)
    pixel_mean: list[float] = ranged(default_factory=lambda: [123.675, 116.28, 103.53], interval="[0, 255]")
    pixel_std: list[float] = ranged(default_factory=lambda: [58.395, 57.12, 57.375], interval="(0, inf)")

    def check(self) -> None:
        low, high = (self.rpn_iou_thresholds + [None, None])[:2]
        if len(self.rpn_iou_thresholds) != 2 or low > high:
            raise ValueError(f"rpn_iou_thresholds must be [low, high] with low <= high, got {self.rpn_iou_thresholds}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes must hold 5 sizes (one per level p2..p6), got {self.anchor_sizes}")
        if not self.cascade_ious or len(self.cascade_box_weights) != len(self.cascade_ious):
            raise ValueError("cascade_box_weights must hold one [wx, wy, ww, wh] per cascade_ious stage")
        if any(len(w) != 4 for w in self.cascade_box_weights):
            raise ValueError("cascade_box_weights must be lists of 4 numbers [wx, wy, ww, wh]")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std must hold 3 numbers (RGB)")


# Where a detector's starting weights come from: not part of the network a saved model.json describes.
WEIGHT_SOURCE_KEYS = ("pretrained", "pretrained_name", "weights", "patch_resize", "init_from")
# What shapes only training (regularisation, matching, sampling, loss) or the post-processing of
# detections (proposal / detection NMS, top-k, score threshold), never the network's tensors, its
# input normalisation or its features: a distillation student may set these differently from the
# teacher it starts from. Every other key (a new one too) must equal the teacher's.
NON_NETWORK_KEYS = ("drop_path", "grad_checkpointing", "rpn_iou_thresholds", "rpn_batch_size_per_image",
                    "rpn_positive_fraction", "rpn_pre_nms_topk_train", "rpn_post_nms_topk_train", "rois_per_image",
                    "positive_fraction", "cascade_ious", "use_federated", "federated_num_classes", "federated_power",
                    "federated_set",
                    "rpn_nms", "rpn_pre_nms_topk_test", "rpn_post_nms_topk_test", "test_score_threshold", "test_nms",
                    "max_detections", "test_soft_nms", "test_soft_nms_iou", "test_soft_nms_sigma", "test_maskness")


def inference_options(soft_nms: str | None = None, soft_nms_iou: float | None = None,
                      soft_nms_sigma: float | None = None, maskness: float | None = None) -> dict[str, Any]:
    """The model test keys that `--soft-nms`, `--soft-nms-iou`, `--soft-nms-sigma` and `--maskness`
    set for one run of eval / predict (only those given)."""
    given = {"test_soft_nms": soft_nms, "test_soft_nms_iou": soft_nms_iou, "test_soft_nms_sigma": soft_nms_sigma,
             "test_maskness": maskness}
    return {key: value for key, value in given.items() if value is not None}


def check_inference_options(options: dict[str, Any]) -> None:
    """Type and range of each test option, as a recipe's model keys are checked (one-line error)."""
    if options:
        apply_flags(ModelConfig(), options)


def tiny_cnn_config(**overrides) -> ModelConfig:
    """The narrow ResNet-18-FPN detector (CPU-fast, random init): the `model:` section of the packaged
    `synthetic_tiny` recipe on a random-init ResNet-18 with ImageNet normalisation (the recipe itself
    trains the packaged ImageNet efficientnet_lite0; tests need no weights), with `overrides`."""
    cfg = from_dict(ModelConfig, read_mapping(TINY_RECIPE)["model"], source=TINY_RECIPE, prefix="model.")
    defaults = ModelConfig()
    random_init = dict(backbone="resnet18", pretrained=False, pixel_mean=defaults.pixel_mean,
                       pixel_std=defaults.pixel_std)
    return dataclasses.replace(cfg, **{**random_init, **overrides})


def tiny_eva_config(**overrides) -> ModelConfig:
    """A very small random-init EVA-02 (4 blocks, width 64) so the ViT path runs on CPU in tests."""
    cfg = dict(
        backbone="eva02_tiny", image_size=128, window_size=4, global_blocks=[1, 3],
        vit_embed_dim=64, vit_depth=4, vit_num_heads=2, drop_path=0.1, fpn_channels=32,
        anchor_sizes=[16, 32, 64, 128, 256], rpn_convs=1,
        rpn_pre_nms_topk_train=500, rpn_pre_nms_topk_test=300,
        rpn_post_nms_topk_train=128, rpn_post_nms_topk_test=128,
        rois_per_image=32, roi_sampling_ratio=2,
        box_head_convs=1, box_head_conv_dim=32, box_head_fc_dim=64,
        mask_head_convs=1, mask_head_channels=32,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)
