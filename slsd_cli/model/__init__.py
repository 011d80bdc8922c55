"""Cascade Mask R-CNN with an EVA-02 (windowed ViT + simple feature pyramid) or timm CNN + FPN backbone.

Files: model_config.py (ModelConfig, the recipe's `model:` section), backbone.py (the ViT and CNN
families, build_backbone), eva02.py (the EVA-02 trunk), backbone_weights.py (their starting weights),
rpn.py, cascade.py, mask_head.py, losses.py, box_coder.py, proposal_matching.py, poolers.py,
detector.py (build_model, CascadeMaskRCNN), timm_models.py, convert_detectron2.py,
postprocess.py (paste_masks, to_results), weights.py (save_detector, load_detector, build_detector).
See each module's docstring.

The names below are imported on first use (PEP 562), so reading a recipe (`slsd_cli.recipe`, which
needs only `model_config`) does not import torch: `slsd --help` and `slsd recipe show` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ModelConfig": "model_config", "tiny_cnn_config": "model_config", "tiny_eva_config": "model_config",
    "CascadeMaskRCNN": "detector", "build_model": "detector", "build_backbone": "backbone",
    "paste_masks": "postprocess", "to_results": "postprocess",
    "build_detector": "weights", "load_detector": "weights", "save_detector": "weights",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'slsd_cli.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"slsd_cli.model.{_HOME[name]}"), name)
