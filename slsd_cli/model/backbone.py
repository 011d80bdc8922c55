"""Backbones: our windowed EVA-02 ViT + simple feature pyramid, or a timm CNN + FPN.

Both give the same interface (`Backbone`): `forward(x)` -> pyramid maps p2..p6 (strides 4..64,
`out_channels` each), `feature_map(x)` -> the plain backbone map used for class prototypes,
`layer_ids()` for layer-wise lr decay, `size_divisibility` for input padding.

EVA-02 (`EVA02ViT`): the blocks are timm's `EvaBlock`s (SwiGLU MLP, RoPE attention, no class token),
the forward is ours: every block attends inside non-overlapping `window_size` windows (the grid is
padded to a multiple of the window; padded keys are masked out), except the `global_blocks`, which
attend over the whole grid. RoPE is computed for the window grid and for the global grid, both
rescaled to the pretraining grid (16 = 224/14) as EVA-02's detector does. Absolute position
embeddings are kept at the `image_size / patch_size` grid (bicubic-resampled on the fly for another
input grid). Drop path rises linearly to `drop_path`; there is no final norm.

Pretrained weights: by name through timm's hub download (`timm.create_model(name, pretrained=True,
patch_size=16, img_size=<the weights' own grid>)`), or from a local file (safetensors, or a torch file
read with weights_only=True; timm or original EVA key names, optionally wrapped in "model"/"module"/...),
run through timm's EVA checkpoint filter. Either way timm converts the key names and resamples the
patch-14 kernel to patch 16 (`resample_patch_embed`); the position embedding is resampled to our grid
with plain bicubic interpolation (`resample_pos_embed`: no antialiasing, as EVA-02's detector does on
every forward — timm's default antialiased resampling changes the table by up to 8%). We copy patch
embedding, position embedding (without the class token) and blocks, and refuse a checkpoint that
lacks any of them or has other shapes. A timm CNN (features_only=True) gets its weights from
`model.weights` (a local file, through timm's checkpoint filter), else with `pretrained: true` from
the package that ships them for a name in `timm_models.PACKAGED` (`efficientnet_lite0`: ImageNet,
offline, `timm_models.create_packaged`), else from timm's download by name (needs the network or
the HF_HUB_OFFLINE cache).

Input canvas (`Backbone.canvas`): a ViT always sees the square canvas it was trained on — at least
`image_size` x `image_size`, zero-padded at the bottom/right (ViTDet's square padding) — so the
position table and the global RoPE grid never stretch to a non-square image and an image's features
do not depend on the other images of its batch. A CNN only pads to its size divisibility.

Padded windows (a grid that is not a multiple of `window_size`): with `window_key_mask` (default) the
padded keys are masked out, so a token's output does not depend on how much padding its window
holds; `window_key_mask: false` lets the zero padding take part in attention as detectron2's ViTDet
and EVA-02 do (for reproducing a converted detector exactly on such grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slsd_cli.errors import InputError
from slsd_cli.model.model_config import ModelConfig

PYRAMID_STRIDES = [4, 8, 16, 32, 64]


@dataclass(frozen=True)
class EvaPreset:
    embed_dim: int
    depth: int
    num_heads: int
    qkv_fused: bool
    scale_mlp: bool
    timm_arch: str
    timm_tag: str


EVA_PRESETS: dict[str, EvaPreset] = {
    "eva02_tiny": EvaPreset(192, 12, 3, True, False, "eva02_tiny_patch14_224", "mim_in22k"),
    "eva02_small": EvaPreset(384, 12, 6, True, False, "eva02_small_patch14_224", "mim_in22k"),
    "eva02_base": EvaPreset(768, 12, 12, False, True, "eva02_base_patch14_224", "mim_in22k"),
    "eva02_large": EvaPreset(1024, 24, 16, False, True, "eva02_large_patch14_224", "mim_m38m"),
}
PRETRAIN_GRID = 16  # 224 / 14: EVA-02's RoPE coordinates are rescaled to this grid


def default_global_blocks(depth: int) -> list[int]:
    """Four evenly spaced global blocks ending with the last: 24 -> 5,11,17,23; 12 -> 2,5,8,11."""
    return sorted({(i + 1) * depth // 4 - 1 for i in range(4)} - {-1})


def resample_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """A position table [1, oh*ow, D] (no prefix tokens) -> [1, nh*nw, D] by plain bicubic
    interpolation (align_corners=False, no antialiasing: EVA-02 / ViTDet's `get_abs_pos`)."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    if (oh, ow) == (nh, nw):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, oh, ow, d).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos.dtype)


class EVA02ViT(nn.Module):
    """EVA-02 ViT with windowed attention; forward(x [B,3,H,W], H and W multiples of the patch)
    -> [B, D, H/patch, W/patch]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from timm.layers import PatchEmbed, calculate_drop_path_rates
        from timm.models.eva import EvaBlock

        preset = EVA_PRESETS[cfg.backbone]
        self.preset = preset
        self.embed_dim = cfg.vit_embed_dim or preset.embed_dim
        self.depth = cfg.vit_depth or preset.depth
        self.num_heads = cfg.vit_num_heads or preset.num_heads
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise InputError(f"vit_embed_dim {self.embed_dim} must split into {self.num_heads} heads whose "
                             "size is a multiple of 4 (RoPE)", record="model")
        self.head_dim = self.embed_dim // self.num_heads
        self.patch_size = cfg.patch_size
        self.window_size = cfg.window_size
        self.window_key_mask = cfg.window_key_mask
        globals_ = default_global_blocks(self.depth) if cfg.global_blocks is None else list(cfg.global_blocks)
        if any(not 0 <= g < self.depth for g in globals_):
            raise InputError(f"global_blocks {globals_} must lie in 0..{self.depth - 1}", record="model")
        self.global_blocks = sorted(set(globals_))
        self.grid = (cfg.image_size // cfg.patch_size,) * 2
        self.grad_checkpointing = cfg.grad_checkpointing

        self.patch_embed = PatchEmbed(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3,
                                      embed_dim=self.embed_dim, output_fmt="NHWC", strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], self.embed_dim))
        rates = calculate_drop_path_rates(cfg.drop_path, self.depth)
        self.blocks = nn.ModuleList([
            EvaBlock(dim=self.embed_dim, num_heads=self.num_heads, qkv_bias=True, qkv_fused=preset.qkv_fused,
                     mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=preset.scale_mlp, num_prefix_tokens=0,
                     drop_path=rates[i])
            for i in range(self.depth)])
        self._rope_cache: dict[tuple, Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):  # as BEiT/EVA: shrink residual branches with depth
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    # ------------------------------------------------------------------ position encodings
    def rope(self, h: int, w: int, device: torch.device) -> Tensor:
        """RoPE sin|cos [h*w, 2*head_dim] for an h x w grid, coordinates rescaled to the pretrain grid."""
        key = (h, w, str(device))
        emb = self._rope_cache.get(key)
        if emb is None:
            from timm.layers.pos_embed_sincos import build_rotary_pos_embed, freq_bands

            bands = freq_bands(self.head_dim // 4, temperature=10000.0, step=1)
            sin, cos = build_rotary_pos_embed([h, w], bands=bands, dim=self.head_dim, in_pixels=False,
                                              ref_feat_shape=[PRETRAIN_GRID, PRETRAIN_GRID])
            emb = torch.cat([sin, cos], dim=-1).to(device)
            self._rope_cache[key] = emb
        return emb

    def abs_pos(self, h: int, w: int) -> Tensor:
        if (h, w) == self.grid:
            return self.pos_embed.view(1, h, w, -1)
        return resample_pos_embed(self.pos_embed, self.grid, (h, w)).view(1, h, w, -1)

    # ------------------------------------------------------------------ forward
    def _attention(self, blk: nn.Module, x: Tensor, windowed: bool) -> Tensor:
        """Attention of one block on normed tokens x [B, h, w, C] (windowed or global)."""
        b, h, w, c = x.shape
        if not windowed:
            out = blk.attn(x.reshape(b, h * w, c), rope=self.rope(h, w, x.device))
            return out.view(b, h, w, c)
        ws = self.window_size
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        nh, nw = hp // ws, wp // ws
        x = x.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        mask = None
        # padded keys are never attended to (each window keeps >= 1 real token), unless switched off
        if (ph or pw) and self.window_key_mask:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.view(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, ws * ws)
            mask = valid.repeat(b, 1, 1, 1)
        out = blk.attn(x, rope=self.rope(ws, ws, x.device), attn_mask=mask)
        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w]

    def _block(self, blk: nn.Module, x: Tensor, windowed: bool) -> Tensor:
        y = self._attention(blk, blk.norm1(x), windowed)
        if blk.gamma_1 is not None:
            y = blk.gamma_1 * y
        x = x + blk.drop_path1(y)
        y = blk.mlp(blk.norm2(x))
        if blk.gamma_2 is not None:
            y = blk.gamma_2 * y
        return x + blk.drop_path2(y)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # [B, h, w, D]
        x = x + self.abs_pos(x.shape[1], x.shape[2]).to(x.dtype)
        for i, blk in enumerate(self.blocks):
            windowed = i not in self.global_blocks
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._block, blk, x, windowed, use_reentrant=False)
            else:
                x = self._block(blk, x, windowed)
        return x.permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ weights
    def timm_kwargs(self) -> dict:
        return dict(patch_size=self.patch_size, img_size=self.grid[0] * self.patch_size, num_classes=0,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)

    def load_timm_state(self, state: dict[str, Tensor], num_prefix_tokens: int, source: str) -> None:
        """Copy a timm Eva state dict (already filtered to our patch size and grid) into our blocks."""
        own = self.state_dict()
        converted = {}
        for key, value in own.items():
            src = state.get(key)
            if src is None:
                raise InputError(f"backbone weights lack {key!r}", path=source)
            if key == "pos_embed":
                src = src[:, num_prefix_tokens:]
                side = math.isqrt(src.shape[1])
                if side * side == src.shape[1] and src.shape[-1] == value.shape[-1] and (side, side) != self.grid:
                    src = resample_pos_embed(src, (side, side), self.grid)
            if src.shape != value.shape:
                raise InputError(f"backbone weight {key!r} has shape {tuple(src.shape)}, expected "
                                 f"{tuple(value.shape)}", path=source)
            converted[key] = src
        self.load_state_dict(converted)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Layer id per parameter: 0 for patch/pos embedding, i+1 for block i; num_layers = depth."""
        ids = {}
        for name, _ in self.named_parameters():
            ids[name] = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 0
        return ids, self.depth


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-16 map: scales 4, 2, 1, 1/2 (deconv / identity / max-pool),
    each followed by 1x1 and 3x3 convs with LayerNorm; p6 is a stride-2 max-pool of p5."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        half, quarter = dim // 2, dim // 4
        self.scale4 = nn.Sequential(nn.ConvTranspose2d(dim, half, 2, 2), LayerNorm2d(half), nn.GELU(),
                                    nn.ConvTranspose2d(half, quarter, 2, 2))
        self.scale2 = nn.ConvTranspose2d(dim, half, 2, 2)
        self.scale05 = nn.MaxPool2d(2, 2)
        self.outputs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), LayerNorm2d(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
            for c in (quarter, half, dim, dim)])
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.scale4(x), self.scale2(x), x, self.scale05(x)]
        out = [conv(level) for conv, level in zip(self.outputs, levels)]
        out.append(F.max_pool2d(out[-1], kernel_size=1, stride=2))
        return out


class FPN(nn.Module):
    """Top-down feature pyramid on C2..C5 (lateral 1x1, output 3x3, nearest upsampling, sum) + p6."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        top = self.lateral[-1](feats[-1])
        out = [self.output[-1](top)]
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            out.insert(0, self.output[i](top))
        out.append(F.max_pool2d(out[-1], kernel_size=1, stride=2))
        return out


class Backbone(nn.Module):
    """Common wrapper: trunk (ViT or CNN) + pyramid. forward(x normalised) -> [p2..p6]."""

    strides = PYRAMID_STRIDES

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.is_vit = cfg.backbone in EVA_PRESETS
        self.out_channels = cfg.fpn_channels
        self.image_size = cfg.image_size
        if self.is_vit:
            self.trunk = EVA02ViT(cfg)
            self.pyramid = SimpleFeaturePyramid(self.trunk.embed_dim, cfg.fpn_channels)
            # the ViT grid must be whole patches; the pyramid halves it once more (p5)
            self.size_divisibility = cfg.patch_size * 2
            self.feature_dim, self.feature_stride = self.trunk.embed_dim, cfg.patch_size
            self._cnn_levels: list[int] = []
            if cfg.patch_size != 16:
                raise InputError("the simple feature pyramid needs patch_size 16 (stride-16 ViT map)", record="model")
        else:
            self.trunk = _create_timm_features(cfg)
            reductions = self.trunk.feature_info.reduction()
            channels = self.trunk.feature_info.channels()
            levels = []
            for stride in (4, 8, 16, 32):
                hits = [i for i, r in enumerate(reductions) if r == stride]
                if not hits:
                    raise InputError(f"timm backbone {cfg.backbone!r} has no stride-{stride} feature map "
                                     f"(its strides: {reductions}); the FPN needs 4, 8, 16 and 32", record="model")
                levels.append(hits[-1])
            self._cnn_levels = levels
            self.pyramid = FPN([channels[i] for i in levels], cfg.fpn_channels)
            self.size_divisibility = 32
            self.feature_dim, self.feature_stride = channels[levels[-1]], 32
        load_backbone_weights(self, cfg)

    def canvas(self, height: int, width: int, min_side: int | None = None) -> tuple[int, int]:
        """The padded input size for images of at most height x width: for a ViT the square canvas of
        side >= `min_side` (default: the trained `image_size`), for a CNN the size-divisible box."""
        d = self.size_divisibility
        if self.is_vit:
            side = max(height, width, self.image_size if min_side is None else min_side)
            side = -(-side // d) * d
            return side, side
        return -(-height // d) * d, -(-width // d) * d

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.is_vit:
            return self.pyramid(self.trunk(x))
        feats = self.trunk(x)
        return self.pyramid([feats[i] for i in self._cnn_levels])

    def feature_map(self, x: Tensor) -> tuple[Tensor, int]:
        """The plain backbone map (ViT tokens at stride 16, or the CNN's stride-32 stage) and its stride."""
        if self.is_vit:
            return self.trunk(x), self.feature_stride
        return self.trunk(x)[self._cnn_levels[-1]], self.feature_stride

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Layer id per backbone parameter (names relative to this module) and num_layers; the
        pyramid gets num_layers + 1 (no decay), like the heads."""
        if self.is_vit:
            trunk_ids, num_layers = self.trunk.layer_ids()
        else:
            # a CNN: the stem is layer 0, then one id per stage that ends at a returned feature map
            returned = set(self.trunk.feature_info.module_name())
            trunk_ids, layer = {}, 0
            for child_name, child in self.trunk.named_children():
                for pname, _ in child.named_parameters():
                    trunk_ids[f"{child_name}.{pname}"] = layer
                if child_name.replace(".", "_") in {r.replace(".", "_") for r in returned}:
                    layer += 1
            num_layers = max(layer - 1, 1)
            trunk_ids = {k: min(v, num_layers) for k, v in trunk_ids.items()}
        ids = {f"trunk.{k}": v for k, v in trunk_ids.items()}
        for name, _ in self.pyramid.named_parameters():
            ids[f"pyramid.{name}"] = num_layers + 1
        return ids, num_layers


# ---------------------------------------------------------------------- timm models and weights


def _create_timm_features(cfg: ModelConfig) -> nn.Module:
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


def load_backbone_weights(backbone: Backbone, cfg: ModelConfig) -> None:
    """EVA: pretrained timm weights (by name, through timm's hub download) or a local file (EVA /
    timm key names; timm's EVA checkpoint filter converts them and resamples the patch kernel and
    position embedding) into our ViT. CNN weights are loaded by timm when the trunk is created."""
    if not backbone.is_vit or (cfg.weights is None and not cfg.pretrained):
        return
    import timm

    vit: EVA02ViT = backbone.trunk
    preset = vit.preset
    if cfg.weights is not None:
        from timm.models.eva import checkpoint_filter_fn

        name = (cfg.pretrained_name or preset.timm_arch).split(".")[0]
        state = _read_weights_file(cfg.weights)
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
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise _weights_error(cfg, exc, name) from exc
    vit.load_timm_state(model.state_dict(), getattr(model, "num_prefix_tokens", 1), source=name)
