"""timm models with their weights from one of three places, as `slsd prototypes` (feature maps) and
`slsd retrieve` (embedders) build them:

* a local `--weights FILE`: safetensors or a torch file (read with weights_only=True), passed
  through timm's own checkpoint filter, so timm or original key names both load;
* `--random-init`: no weights (seeded when a seed is given);
* else pretrained weights by name, which needs the network or the HF_HUB_OFFLINE cache.

The detector's backbone (`model.backbone`) has its own rules (recipe keys, EVA checkpoint filter);
it shares only `read_weights_file`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from slsd_cli.errors import InputError
from slsd_cli.io import load_safetensors, load_torch_file

WeightsKind = Literal["file", "random-init", "pretrained"]


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

    `image_size` builds ViT-like models for that input size (timm resamples position embeddings); a
    model that takes no `img_size` (a CNN) is built without it. `seed` seeds the random init without
    touching the caller's RNG; None draws from the global RNG. `option` names the CLI option that
    chose the model, for the error messages. Errors other than build / load failures (an IndexError
    for a missing feature level, ...) are the caller's to report.
    """
    import timm

    if weights is not None and random_init:
        raise InputError("--weights and --random-init exclude each other")
    kwargs = dict(timm_kwargs)
    kind: WeightsKind = "random-init"
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
