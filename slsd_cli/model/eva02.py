"""EVA-02 ViT trunk (`EVA02ViT`): timm's `EvaBlock`s under our windowed forward, and its presets.

The blocks are timm's `EvaBlock`s (SwiGLU MLP, RoPE attention, no class token); the forward is ours:
every block attends inside non-overlapping `window_size` windows (the grid is padded to a multiple
of the window; padded keys are masked out), except the `global_blocks`, which attend over the whole
grid. RoPE is computed for the window grid and for the global grid, both rescaled to the
pretraining grid (16 = 224/14) as EVA-02's detector does. Absolute position embeddings are kept at
the `image_size / patch_size` grid (bicubic-resampled on the fly for another input grid). Drop path
rises linearly to `drop_path`; there is no final norm.

Padded windows (a grid that is not a multiple of `window_size`): with `window_key_mask` (default) the
padded keys are masked out, so a token's output does not depend on how much padding its window
holds; `window_key_mask: false` lets the zero padding take part in attention as detectron2's ViTDet
and EVA-02 do (for reproducing a converted detector exactly on such grids).

Pretrained weights are copied in by `backbone_weights.load_eva_weights` (through `load_timm_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slsd_cli.errors import InputError
from slsd_cli.model.model_config import ModelConfig


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


def resample_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], *,
                       compute_dtype: torch.dtype = torch.float64, dtype: torch.dtype | None = None) -> Tensor:
    """A position table [1, oh*ow, D] (no prefix tokens) -> [1, nh*nw, D] by plain bicubic
    interpolation (align_corners=False, no antialiasing: EVA-02 / ViTDet's `get_abs_pos`), computed in
    `compute_dtype` and cast once to `dtype` (default: the table's own). Weights are converted in
    float64 (cast once at the end); the forward pass resamples in the table's dtype, as the reference."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    if (oh, ow) == (nh, nw) and dtype in (None, pos.dtype):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, oh, ow, d).permute(0, 3, 1, 2).to(compute_dtype)
    if (oh, ow) != (nh, nw):
        grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=False)
    return grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(dtype or pos.dtype)


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
        return resample_pos_embed(self.pos_embed, self.grid, (h, w), compute_dtype=self.pos_embed.dtype).view(
            1, h, w, -1)

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
