"""Where a detector backbone's starting weights come from (the recipe's `model.weights`,
`model.pretrained`, `model.pretrained_name`).

EVA-02 (`load_eva_weights`): by name through timm's hub download (`timm.create_model(name,
pretrained=True, patch_size=16, img_size=<the weights' own grid>)`), or from a local file
(safetensors, or a torch file read with weights_only=True; timm or original EVA key names,
optionally wrapped in "model"/"module"/...), run through timm's EVA checkpoint filter. Either way
timm converts the key names; a patch-14 kernel and its position grid go to patch 16 as EVA-02 does
(`model.patch_resize: eva`, `timm_models.eva_p14_to_p16`: bicubic kernel, grid 16 -> 14) or as timm
does (`timm`: `resample_patch_embed`'s PI-resize, grid kept);
the position embedding is resampled to our grid with plain bicubic interpolation
(`eva02.resample_pos_embed`: no antialiasing, as EVA-02's detector does on every forward — timm's
default antialiased resampling changes the table by up to 8%). We copy patch embedding, position
embedding (without the class token) and blocks, and refuse a checkpoint that lacks any of them or
has other shapes.

A timm CNN (`create_timm_features`, features_only=True) gets its weights from `model.weights` (a
local file, through timm's checkpoint filter), else with `pretrained: true` from the package that
ships them for a name in `timm_models.PACKAGED` (`efficientnet_lite0`: ImageNet, offline,
`timm_models.create_packaged`), else from timm's download by name (needs the network or the
HF_HUB_OFFLINE cache).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from slsd_cli.errors import InputError
from slsd_cli.model.eva02 import EVA_PRESETS, EVA02ViT
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.model.timm_models import eva_p14_to_p16, pretrained_eva_p16


def create_timm_features(cfg: ModelConfig) -> nn.Module:
    """The timm CNN `cfg.backbone` (features_only) with its weights: `model.weights`, else the
    packaged or downloaded pretrained ones with `model.pretrained`, else random init."""
    import timm

    if not timm.is_model(cfg.backbone):
        raise InputError(f"unknown backbone {cfg.backbone!r}: use one of {sorted(EVA_PRESETS)} or a timm model "
                         "name (e.g. resnet18)", record="model.backbone")
    from slsd_cli.model.timm_models import PACKAGED, architecture_kwargs, create_packaged

    kwargs = dict(features_only=True, **architecture_kwargs(cfg.backbone))
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    want = cfg.weights is not None or cfg.pretrained
    if want:
        kwargs["pretrained"] = True
        if cfg.weights is not None:
            _check_weights_file(cfg.weights)
            kwargs["pretrained_cfg_overlay"] = dict(file=str(cfg.weights))
    name = cfg.pretrained_name or cfg.backbone
    if cfg.weights is None and cfg.pretrained and name in PACKAGED:  # weights shipped in a package: offline
        return create_packaged(name, **{k: v for k, v in kwargs.items() if k != "pretrained"})
    try:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError:
            if "drop_path_rate" not in kwargs:
                raise
            kwargs.pop("drop_path_rate")  # a model without stochastic depth
            return timm.create_model(name, **kwargs)
    except Exception as exc:
        if want:
            raise _weights_error(cfg, exc, name) from exc
        raise InputError(f"cannot build timm backbone {name!r} ({type(exc).__name__}: {exc})",
                         record="model.backbone") from exc


def _check_weights_file(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise InputError("backbone weights file not found", path=p)
    if p.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise InputError("backbone weights must be a .safetensors or torch (.pth/.pt/.bin) file", path=p)


def _weights_error(cfg: ModelConfig, exc: Exception, name: str) -> InputError:
    if cfg.weights is not None:
        return InputError(f"cannot load backbone weights into {name!r} ({type(exc).__name__}: {exc})",
                          path=cfg.weights)
    return InputError(f"cannot get pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                      "without internet, download them elsewhere and pass model.weights=FILE "
                      "(or model.pretrained=false for random init)", record="model.pretrained")


def _read_weights_file(path: str) -> dict:
    from slsd_cli.model.timm_models import read_weights_file

    _check_weights_file(path)
    # no unwrapping here: timm's EVA checkpoint filter unwraps (model_ema, model, ...) and renames keys
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise InputError("a weights file must hold a state dict", path=path)
    return state


def _pos_grid_side(state: dict) -> int | None:
    """The side of the square position grid of an EVA / timm checkpoint (class token or not)."""
    for key, value in state.items():
        if isinstance(value, dict):
            found = _pos_grid_side(value)
            if found is not None:
                return found
        elif str(key).endswith("pos_embed") and isinstance(value, torch.Tensor) and value.dim() == 3:
            for tokens in (value.shape[1], value.shape[1] - 1):
                side = math.isqrt(max(tokens, 0))
                if side > 0 and side * side == tokens:
                    return side
    return None


def _native_img_size(name: str, patch_size: int) -> int | None:
    """The input size at our patch size that keeps a timm EVA checkpoint's own position grid
    (e.g. eva02_large_patch14_224: 16 x 16 -> 256 at patch 16); None when unknown."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    arch = name.split(".")[0]
    if not size or "_patch" not in arch:
        return None
    try:
        src_patch = int(arch.split("_patch")[1].split("_")[0])
    except ValueError:
        return None
    return int(size[-1]) // src_patch * patch_size


def load_eva_weights(vit: EVA02ViT, cfg: ModelConfig) -> None:
    """Pretrained timm weights (by name, through timm's hub download) or a local file (EVA / timm key
    names; timm's EVA checkpoint filter converts them and resamples the patch kernel and position
    embedding) into our ViT; nothing without `model.weights` or `model.pretrained`."""
    if cfg.weights is None and not cfg.pretrained:
        return
    import timm

    preset = vit.preset
    if cfg.weights is not None:
        from timm.models.eva import checkpoint_filter_fn

        name = (cfg.pretrained_name or preset.timm_arch).split(".")[0]
        state = _read_weights_file(cfg.weights)
        if cfg.patch_resize == "eva":  # EVA-02's own p14 -> p16 (its *_p14to16 files pass unchanged)
            state = eva_p14_to_p16(state, vit.patch_size)
        try:
            kwargs = vit.timm_kwargs()
            side = _pos_grid_side(state)
            if side is not None:  # keep the file's position grid; load_timm_state resamples it (plain bicubic)
                kwargs["img_size"] = side * vit.patch_size
            skeleton = timm.create_model(name, pretrained=False, **kwargs)
            state = checkpoint_filter_fn(state, skeleton)
        except Exception as exc:
            raise _weights_error(cfg, exc, name) from exc
        vit.load_timm_state(state, getattr(skeleton, "num_prefix_tokens", 1), source=cfg.weights)
        return
    name = cfg.pretrained_name or f"{preset.timm_arch}.{preset.timm_tag}"
    kwargs = vit.timm_kwargs()
    native = _native_img_size(name, vit.patch_size)
    if native is not None:  # keep the weights' own position grid; load_timm_state resamples it (plain bicubic)
        kwargs["img_size"] = native
    try:
        if cfg.patch_resize == "eva":  # the weights at their own patch 14, then EVA-02's p14 -> p16
            state, prefix_tokens = pretrained_eva_p16(name, **vit.timm_kwargs())
        else:
            model = timm.create_model(name, pretrained=True, **kwargs)
            state, prefix_tokens = model.state_dict(), getattr(model, "num_prefix_tokens", 1)
    except Exception as exc:
        raise _weights_error(cfg, exc, name) from exc
    vit.load_timm_state(state, prefix_tokens, source=name)
