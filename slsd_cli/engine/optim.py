"""AdamW with layer-wise learning-rate decay, and a cosine schedule with linear warm-up.

Layer-wise decay (BEiT / ViTDet / EVA): a backbone parameter of layer id `l` (0 = patch embedding,
1..L = the blocks) trains at `lr * decay ** (L + 1 - l)`; everything after the backbone (pyramid,
RPN, RoI heads) at `lr`. Layer ids come from the model's `layer_ids()` (the detector's) or its
backbone's. One weight-decay rule for every model, ViTDet's (detectron2 / EVA): no weight decay on
the parameters of normalisation layers (LayerNorm, GroupNorm, BatchNorm) and on absolute position
embeddings (`*pos_embed`); every other parameter, biases included, decays.

The schedule is a pure function of the iteration (`lr_factor`), so resuming needs only the
iteration number: warm-up multiplies by `f + (1 - f) * t / warmup` (detectron2's linear warm-up)
and the cosine goes from 1 to `min_lr_ratio` over the whole run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter of `model` (full names) and the number of backbone layers L.
    Parameters outside the backbone get L + 1 (full lr)."""
    ids: dict[str, int] = {}
    num_layers = 0
    if hasattr(model, "layer_ids"):
        ids, num_layers = model.layer_ids()
    elif hasattr(model, "backbone") and hasattr(model.backbone, "layer_ids"):
        sub, num_layers = model.backbone.layer_ids()
        ids = {f"backbone.{k}": v for k, v in sub.items()}
    return {name: ids.get(name, num_layers + 1) for name, _ in model.named_parameters()}, num_layers


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters exempt from weight decay: normalisation layers' and position embeddings."""
    names = {name for name, _ in model.named_parameters() if name.endswith("pos_embed")}
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False))
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups keyed by (lr scale, weight decay); each group carries `lr_scale`."""
    ids, num_layers = layer_ids(model)
    exempt = no_weight_decay(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = layer_decay ** (num_layers + 1 - ids[name]) if layer_decay < 1.0 else 1.0
        wd = 0.0 if name in exempt else weight_decay
        groups.setdefault((scale, wd), {"params": [], "lr_scale": scale, "weight_decay": wd})["params"].append(param)
    # a stable order: by decreasing scale, then decay (the optimizer state is saved by position)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], -k[1]))]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups` (layer-wise lr decay, ViTDet's weight-decay rule)."""
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
        group["base_lr"] = lr
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


def lr_factor(iteration: int, total: int, schedule: str = "cosine", warmup_iters: int = 0,
              warmup_factor: float = 0.001, min_ratio: float = 0.0) -> float:
    """The lr multiplier at `iteration` (0-based) of a run of `total` iterations."""
    if schedule == "cosine":
        progress = min(iteration / max(total, 1), 1.0)
        factor = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to base_lr * lr_scale * factor; returns the un-scaled lr (for logs)."""
    lr = 0.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * group["lr_scale"] * factor
        lr = group["base_lr"] * factor
    return lr
