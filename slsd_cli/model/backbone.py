"""Backbones as types: a family is a trunk + a feature pyramid behind one interface (`Backbone`),
built by `build_backbone(cfg)`.

- `ViTBackbone`: our windowed EVA-02 ViT (`eva02.EVA02ViT`, the `eva02_*` presets) + ViTDet's
  simple feature pyramid;
- `CNNBackbone`: a timm CNN (features_only, maps at strides 4, 8, 16, 32) + an FPN.

Every family gives `forward(x)` -> pyramid maps p2..p6 (strides 4..64, `out_channels` each),
`feature_map(x)` -> the plain backbone map used for class prototypes (`feature_dim` channels at
`feature_stride`), `layer_ids()` for layer-wise lr decay, and the input canvas (`canvas`,
`square_canvas`, `size_divisibility`). State dict names are `trunk.*` and `pyramid.*` in both.
Where the weights come from (`model.weights`, `model.pretrained`) is `backbone_weights.py`.

Input canvas (`Backbone.canvas`): a ViT always sees the square canvas it was trained on
(`square_canvas`) — at least `image_size` x `image_size`, zero-padded at the bottom/right (ViTDet's
square padding) — so the position table and the global RoPE grid never stretch to a non-square image
and an image's features do not depend on the other images of its batch. A CNN only pads to its size
divisibility.
"""

from __future__ import annotations

import abc

import torch.nn.functional as F
from torch import Tensor, nn

from slsd_cli.errors import InputError
from slsd_cli.model.backbone_weights import create_timm_features, load_eva_weights
from slsd_cli.model.eva02 import EVA_PRESETS, EVA02ViT
from slsd_cli.model.model_config import ModelConfig

PYRAMID_STRIDES = [4, 8, 16, 32, 64]


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


class Backbone(nn.Module, abc.ABC):
    """A trunk + a pyramid: forward(x normalised) -> [p2..p6]. Subclasses set `trunk`, `pyramid`,
    `size_divisibility`, `feature_dim`, `feature_stride` and say whether they see a square canvas."""

    strides = PYRAMID_STRIDES
    square_canvas: bool  # pads every input to a square of side >= image_size (else to size_divisibility)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_channels = cfg.fpn_channels
        self.image_size = cfg.image_size

    def canvas(self, height: int, width: int, min_side: int | None = None) -> tuple[int, int]:
        """The padded input size for images of at most height x width: with a square canvas the
        square of side >= `min_side` (default: the trained `image_size`), else the size-divisible box."""
        d = self.size_divisibility
        if self.square_canvas:
            side = max(height, width, self.image_size if min_side is None else min_side)
            side = -(-side // d) * d
            return side, side
        return -(-height // d) * d, -(-width // d) * d

    @abc.abstractmethod
    def forward(self, x: Tensor) -> list[Tensor]:
        """Pyramid maps p2..p6 of a normalised, padded batch."""

    @abc.abstractmethod
    def feature_map(self, x: Tensor) -> tuple[Tensor, int]:
        """The plain backbone map and its stride."""

    @abc.abstractmethod
    def trunk_layer_ids(self) -> tuple[dict[str, int], int]:
        """Layer id per trunk parameter (names relative to the trunk) and num_layers."""

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Layer id per backbone parameter (names relative to this module) and num_layers; the
        pyramid gets num_layers + 1 (no decay), like the heads."""
        trunk_ids, num_layers = self.trunk_layer_ids()
        ids = {f"trunk.{k}": v for k, v in trunk_ids.items()}
        for name, _ in self.pyramid.named_parameters():
            ids[f"pyramid.{name}"] = num_layers + 1
        return ids, num_layers


class ViTBackbone(Backbone):
    """EVA-02 ViT (stride-16 tokens) + simple feature pyramid, on a square canvas."""

    square_canvas = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.patch_size != 16:
            raise InputError("the simple feature pyramid needs patch_size 16 (stride-16 ViT map)", record="model")
        self.trunk = EVA02ViT(cfg)
        self.pyramid = SimpleFeaturePyramid(self.trunk.embed_dim, cfg.fpn_channels)
        # the ViT grid must be whole patches; the pyramid halves it once more (p5)
        self.size_divisibility = cfg.patch_size * 2
        self.feature_dim, self.feature_stride = self.trunk.embed_dim, cfg.patch_size
        load_eva_weights(self.trunk, cfg)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.pyramid(self.trunk(x))

    def feature_map(self, x: Tensor) -> tuple[Tensor, int]:
        """The ViT tokens at stride 16."""
        return self.trunk(x), self.feature_stride

    def trunk_layer_ids(self) -> tuple[dict[str, int], int]:
        return self.trunk.layer_ids()


class CNNBackbone(Backbone):
    """A timm CNN's stride-4..32 maps + FPN, padded to a multiple of 32."""

    square_canvas = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.trunk = create_timm_features(cfg)
        reductions = self.trunk.feature_info.reduction()
        channels = self.trunk.feature_info.channels()
        levels = []
        for stride in (4, 8, 16, 32):
            hits = [i for i, r in enumerate(reductions) if r == stride]
            if not hits:
                raise InputError(f"timm backbone {cfg.backbone!r} has no stride-{stride} feature map "
                                 f"(its strides: {reductions}); the FPN needs 4, 8, 16 and 32", record="model")
            levels.append(hits[-1])
        self.levels = levels  # the trunk outputs the FPN reads, strides 4..32
        self.pyramid = FPN([channels[i] for i in levels], cfg.fpn_channels)
        self.size_divisibility = 32
        self.feature_dim, self.feature_stride = channels[levels[-1]], 32

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.trunk(x)
        return self.pyramid([feats[i] for i in self.levels])

    def feature_map(self, x: Tensor) -> tuple[Tensor, int]:
        """The CNN's stride-32 stage."""
        return self.trunk(x)[self.levels[-1]], self.feature_stride

    def trunk_layer_ids(self) -> tuple[dict[str, int], int]:
        """The stem is layer 0, then one id per stage that ends at a returned feature map."""
        returned = {r.replace(".", "_") for r in self.trunk.feature_info.module_name()}
        trunk_ids, layer = {}, 0
        for child_name, child in self.trunk.named_children():
            for pname, _ in child.named_parameters():
                trunk_ids[f"{child_name}.{pname}"] = layer
            if child_name.replace(".", "_") in returned:
                layer += 1
        num_layers = max(layer - 1, 1)
        return {k: min(v, num_layers) for k, v in trunk_ids.items()}, num_layers


def build_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone family `cfg.backbone` names: an `eva02_*` preset -> `ViTBackbone`, any other name
    -> a timm CNN (`CNNBackbone`), with its starting weights."""
    if cfg.backbone in EVA_PRESETS:
        return ViTBackbone(cfg)
    return CNNBackbone(cfg)
