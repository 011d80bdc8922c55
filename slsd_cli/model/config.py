"""The `model:` section of a recipe.

Defaults are the LVIS EVA-02-L Cascade Mask R-CNN of DESIGN §3 (the public EVA-02 / ViTDet LVIS
configs). Every width is configurable so the tiny CPU recipe can use narrow heads; see
`tiny_cnn_config()` / `tiny_eva_config()` for the small settings the tests use.

Backbones
- `eva02_large`, `eva02_base`, `eva02_small`, `eva02_tiny`: our EVA-02 ViT (timm's Eva blocks, our
  windowed forward) + simple feature pyramid. `vit_embed_dim` / `vit_depth` / `vit_num_heads` /
  `global_blocks` override the preset (for tiny random-init test models).
- any other name: a timm model created with `features_only=True` (e.g. `resnet18`) + an FPN.

Weights: `pretrained: true` loads timm's weights for `pretrained_name` (default: the preset's MIM
weights, e.g. `eva02_large_patch14_224.mim_m38m`; needs internet), `weights: PATH` loads a local
safetensors / .pth file (loaded with weights_only=True) and has priority over `pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    # ---- backbone
    backbone: str = "eva02_large"
    pretrained: bool = False
    pretrained_name: Optional[str] = None     # timm name[.tag] of the weights; None = preset default
    weights: Optional[str] = None             # local weights file for the backbone
    image_size: int = 1024                    # nominal (square) input size: sets the ViT pos-embed grid
    patch_size: int = 16
    window_size: int = 16
    global_blocks: Optional[list[int]] = None  # None = preset (L: 5,11,17,23; 12-deep: 2,5,8,11)
    vit_embed_dim: Optional[int] = None       # None = preset
    vit_depth: Optional[int] = None
    vit_num_heads: Optional[int] = None
    drop_path: float = 0.4
    grad_checkpointing: bool = False          # activation checkpointing of the ViT blocks
    fpn_channels: int = 256
    # ---- RPN
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level p2..p6
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_convs: int = 2
    rpn_iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 2000        # per level
    rpn_pre_nms_topk_test: int = 1000         # per level
    rpn_post_nms_topk_train: int = 1000       # per image
    rpn_post_nms_topk_test: int = 1000        # per image
    rpn_nms: float = 0.7
    # ---- RoI heads
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    box_pool_size: int = 7
    mask_pool_size: int = 14
    roi_sampling_ratio: int = 0               # RoIAlign sampling ratio (0 = adaptive, as detectron2)
    box_head_convs: int = 4
    box_head_conv_dim: int = 256
    box_head_fc_dim: int = 1024
    mask_head_convs: int = 4
    mask_head_channels: int = 256
    cascade_ious: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    cascade_box_weights: list[list[float]] = field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]])
    # ---- classification loss
    classifier: Literal["sigmoid", "softmax"] = "sigmoid"
    use_federated: bool = True                # sigmoid only
    federated_num_classes: int = 50
    federated_power: float = 0.5
    # ---- inference
    test_score_threshold: float = 0.02
    test_nms: float = 0.5
    max_detections: int = 300
    # ---- input normalisation (RGB 0..255)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


def tiny_cnn_config(**overrides) -> ModelConfig:
    """The narrow ResNet-18-FPN detector of DESIGN §5 (CPU-fast, random init)."""
    cfg = dict(
        backbone="resnet18", image_size=128, drop_path=0.0, fpn_channels=64,
        anchor_sizes=[16, 32, 64, 128, 256], rpn_convs=1,
        rpn_pre_nms_topk_train=1000, rpn_pre_nms_topk_test=500,
        rpn_post_nms_topk_train=256, rpn_post_nms_topk_test=256,
        rois_per_image=64, roi_sampling_ratio=2,
        box_head_convs=0, box_head_conv_dim=64, box_head_fc_dim=256,
        mask_head_convs=2, mask_head_channels=64,
        classifier="sigmoid", use_federated=False,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


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
