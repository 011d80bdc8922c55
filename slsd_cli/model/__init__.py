"""Cascade Mask R-CNN with an EVA-02 (windowed ViT + simple feature pyramid) or timm CNN + FPN backbone.

Files: config.py (ModelConfig), backbone.py, rpn.py, cascade.py, mask_head.py, losses.py,
box_coder.py, matching.py, poolers.py, detector.py (CascadeMaskRCNN), postprocess.py (paste_masks,
to_results), weights.py (save_detector, load_detector, build_detector). See each module's docstring.
"""

from slsd_cli.model.config import ModelConfig, tiny_cnn_config, tiny_eva_config
from slsd_cli.model.detector import CascadeMaskRCNN
from slsd_cli.model.postprocess import paste_masks, to_results
from slsd_cli.model.weights import build_detector, load_detector, save_detector

__all__ = ["ModelConfig", "tiny_cnn_config", "tiny_eva_config", "CascadeMaskRCNN", "paste_masks", "to_results",
           "build_detector", "load_detector", "save_detector"]
