"""The detector's starting weights (issue 21 §6): EVA-02's own patch 14 -> 16 conversion.

EVA-02 releases its MIM backbones as `eva02_*_pt_*_p14to16` files, described in its README as
"interpolate the kernel size of patch_embed from 14x14 to 16x16, and interpolate the pos_embed from
16x16 to 14x14"; its detectors (and Porcher et al., which builds on `eva02_L_pt_m38m_p14to16`) start
from those, and resample the 14 x 14 table to their grid (64 x 64 at 1024 px) by bicubic
interpolation. `eva_reference` below writes that procedure as plain code. slsd must give the same
patch kernel and position table from the patch-14 weights (a p14 file, or timm's hub weights), and
load a released p14to16 file unchanged. Small width (64) and depth (2), the real grids (16 -> 14 -> 64).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from slsd_cli.model import tiny_eva_config
from slsd_cli.model.backbone import build_backbone

DIM, DEPTH, HEADS = 64, 2, 2
TIMM_ARCH = "eva02_base_patch14_224"
TIMM_TO_EVA = ((".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.norm.", ".mlp.ffn_ln."),
               (".mlp.fc2.", ".mlp.w3."), (".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias"))


def _cfg(**kw):
    """Our ViT at 1024 px: a 64 x 64 grid, as the LVIS recipes."""
    return tiny_eva_config(backbone="eva02_base", vit_embed_dim=DIM, vit_depth=DEPTH, vit_num_heads=HEADS,
                           global_blocks=[1], image_size=1024, **kw)


@pytest.fixture(scope="module")
def mim_p14():
    """Random patch-14 MIM weights in timm's names (what timm's hub serves) and in EVA-02's own
    names with its pretraining extras (mask token, regression head, RoPE buffers, final norm)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TIMM_ARCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0)
    timm_state = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}  # no zero biases
    eva = {}
    for key, value in timm_state.items():
        for ours, theirs in TIMM_TO_EVA:
            key = key.replace(ours, theirs)
        eva[key.replace("fc_norm.", "norm.")] = value.clone()
    eva.update({"mask_token": torch.randn(1, 1, DIM), "lm_head.weight": torch.randn(32, DIM),
                "lm_head.bias": torch.randn(32), "rope.freqs_cos": torch.randn(256, DIM // HEADS),
                "rope.freqs_sin": torch.randn(256, DIM // HEADS)})
    assert eva["patch_embed.proj.weight"].shape[-1] == 14 and eva["pos_embed"].shape == (1, 1 + 16 * 16, DIM)
    return timm_state, eva


def eva_reference(state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EVA-02's p14 -> p16 as its README describes it, then its detector's resampling to the 64 x 64
    grid: plain bicubic (align_corners=False, no antialiasing), float32.
    -> (p16 kernel, p14to16 position table [1, 1 + 14*14, D], the detector's table [1, 64*64, D])."""
    kernel = F.interpolate(state["patch_embed.proj.weight"].float(), size=(16, 16), mode="bicubic",
                           align_corners=False)
    pos = state["pos_embed"].float()
    grid16 = pos[:, 1:].reshape(1, 16, 16, DIM).permute(0, 3, 1, 2)
    grid14 = F.interpolate(grid16, size=(14, 14), mode="bicubic", align_corners=False)
    p14to16 = torch.cat([pos[:, :1], grid14.permute(0, 2, 3, 1).reshape(1, 196, DIM)], dim=1)
    grid64 = F.interpolate(grid14, size=(64, 64), mode="bicubic", align_corners=False)
    return kernel, p14to16, grid64.permute(0, 2, 3, 1).reshape(1, 64 * 64, DIM)


def _trunk(cfg):
    return build_backbone(cfg).trunk


def test_a_patch14_file_is_resized_as_eva02_does(mim_p14, tmp_path):
    _, eva = mim_p14
    path = tmp_path / "eva02_B_pt_p14.pt"
    torch.save({"module": eva}, path)
    vit = _trunk(_cfg(weights=str(path)))
    kernel, _, table = eva_reference(eva)
    assert vit.patch_embed.proj.weight.shape == (DIM, 3, 16, 16) and vit.pos_embed.shape == (1, 64 * 64, DIM)
    assert torch.allclose(vit.patch_embed.proj.weight, kernel, rtol=0, atol=1e-6)
    assert torch.allclose(vit.pos_embed, table, rtol=0, atol=1e-6)
    assert torch.equal(vit.blocks[1].mlp.fc1_g.weight, eva["blocks.1.mlp.w1.weight"])  # EVA names map
    assert torch.equal(vit.blocks[0].attn.v_proj.bias, eva["blocks.0.attn.v_bias"])


def test_a_released_p14to16_file_maps_unchanged(mim_p14, tmp_path):
    """EVA-02's own eva02_*_pt_*_p14to16 file: kernel copied, 14 x 14 table resampled to 64 x 64,
    the same whichever patch_resize (the kernel is already 16 pixels)."""
    _, eva = mim_p14
    kernel, p14to16, table = eva_reference(eva)
    path = tmp_path / "eva02_B_pt_p14to16.pt"
    torch.save({"model": {**eva, "patch_embed.proj.weight": kernel, "pos_embed": p14to16}}, path)
    for resize in ("eva", "timm"):
        vit = _trunk(_cfg(weights=str(path), patch_resize=resize))
        assert torch.equal(vit.patch_embed.proj.weight, kernel)
        assert torch.allclose(vit.pos_embed, table, rtol=0, atol=1e-6)


def test_timm_route_stays_available_and_differs(mim_p14, tmp_path):
    """model.patch_resize=timm: timm's PI-resize of the kernel and the 16 x 16 table straight to 64 x 64."""
    from timm.layers import resample_patch_embed

    _, eva = mim_p14
    path = tmp_path / "eva02_B_pt_p14.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in eva.items()}, str(path))
    vit = _trunk(_cfg(weights=str(path), patch_resize="timm"))
    kernel, _, table = eva_reference(eva)
    pi = resample_patch_embed(eva["patch_embed.proj.weight"], [16, 16])
    assert torch.allclose(vit.patch_embed.proj.weight, pi, atol=1e-6)
    assert (vit.patch_embed.proj.weight - kernel).abs().max() > 1e-3
    direct = F.interpolate(eva["pos_embed"][:, 1:].reshape(1, 16, 16, DIM).permute(0, 3, 1, 2), size=(64, 64),
                           mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4096, DIM)
    assert torch.allclose(vit.pos_embed, direct, atol=1e-6) and (vit.pos_embed - table).abs().max() > 1e-3


def test_pretrained_by_name_is_resized_as_eva02_does(mim_p14, monkeypatch):
    """`pretrained: true` (timm's hub weights at patch 14, served here from the fixture): EVA-02's route
    by default, timm's with patch_resize=timm."""
    import timm

    timm_state, eva = mim_p14
    real = timm.create_model

    def hub(name, *args, pretrained=False, **kwargs):
        model = real(name, *args, pretrained=False, **kwargs)
        if pretrained:
            if kwargs.get("patch_size", 14) == 14:
                model.load_state_dict(timm_state)
            else:  # timm's own route: its filter PI-resizes on load
                from timm.models.eva import checkpoint_filter_fn

                model.load_state_dict(checkpoint_filter_fn(timm_state, model))
        return model

    monkeypatch.setattr(timm, "create_model", hub)
    cfg = _cfg(pretrained=True, pretrained_name=f"{TIMM_ARCH}.mim_in22k")
    kernel, _, table = eva_reference(eva)
    vit = _trunk(cfg)
    assert torch.allclose(vit.patch_embed.proj.weight, kernel, rtol=0, atol=1e-6)
    assert torch.allclose(vit.pos_embed, table, rtol=0, atol=1e-6)
    timm_vit = _trunk(dataclasses.replace(cfg, patch_resize="timm"))
    assert (timm_vit.patch_embed.proj.weight - kernel).abs().max() > 1e-3
