"""Released detectron2-format EVA-02 LVIS Cascade Mask R-CNN checkpoints -> an slsd detector.

Input: `model_final.pth`-like torch files ({"model": state_dict, ...} or a bare state dict), read
with `torch.load(weights_only=True)` only, or a `.safetensors` state dict. Output: the tensors of a
`CascadeMaskRCNN` built from a recipe's `model:` section (default `lvis_eva02_L_teacher`; the 1536
"sys" models: `lvis_eva02_L_sys_teacher`), ready for `model.weights.save_detector`.

Mapping rules (reference layout: baaivision/EVA `EVA-02/det`, detectron2 `ViT` + `SimpleFeaturePyramid`,
`StandardRPNHead`, `CascadeROIHeads` with `FastRCNNConvFCHead` / `FastRCNNOutputLayers`,
`MaskRCNNConvUpsampleHead`); every parameter maps one to one (569 for EVA-02-L) with equal shapes:
  R1 `backbone.net.patch_embed.proj`, `blocks.i.norm1/norm2`, `attn.q_proj/k_proj/v_proj/proj` -> our ViT
     (`backbone.trunk.*`, the same names);
  R2 `attn.q_bias` / `attn.v_bias` -> `attn.q_proj.bias` / `attn.v_proj.bias` (k has no bias);
  R3 SwiGLU `mlp.w1` / `w2` / `ffn_ln` / `w3` -> `mlp.fc1_g` / `fc1_x` / `norm` / `fc2`;
  R4 `backbone.net.pos_embed` [1, 1 + 14*14, D]: the class-token row dropped, the 14x14 table
     resampled to the run's grid (image_size / 16) by plain bicubic interpolation (no antialias), as
     the reference does on every forward; computed in float64, cast once to the model's dtype;
  R5 simple feature pyramid `backbone.simfp_{2,3,4,5}.*` (deconvs, LayerNorm, 1x1 / 3x3 convs with
     `.norm`) -> `backbone.pyramid.scale4 / scale2 / outputs.{0..3}`;
  R6 RPN `proposal_generator.rpn_head.conv.conv{k}` (or `.conv` for one conv), `objectness_logits`,
     `anchor_deltas` -> `rpn.head.convs.{2k}`, `objectness`, `deltas`;
  R7 cascade box heads `roi_heads.box_head.{s}.conv{j}` (+ `.norm`), `fc1` -> `roi_heads.stages.{s}.head`;
     predictors `roi_heads.box_predictor.{s}.cls_score / bbox_pred` -> `roi_heads.stages.{s}.*`;
  R8 mask head `roi_heads.mask_head.mask_fcn{j}` (+ `.norm`), `deconv`, `predictor` -> `mask_head.*`;
  R9 class order: rows of `cls_score` (C + 1, background last) and of the mask `predictor` are
     permuted from the checkpoint's order (category ids ascending, as detectron2 registers LVIS) to
     the run's category order; the background row stays last;
  R10 dropped after a check (recomputed by slsd): the RoPE buffers. The reference's ViT holds two
     shared tables, `rope_win` [window^2, head] and `rope_glb` [grid^2, head]; each attention block
     holds the one it uses, so its state dict repeats them per block
     (`blocks.N.attn.rope.freqs_{cos,sin}`). The shared tables must have the recipe's window and head
     size and equal the RoPE slsd computes; every per-block copy must equal the shared table of its
     kind (global in `model.global_blocks`, else windowed). A differing copy names the tensor (a
     recipe whose global blocks are not the checkpoint's). Also dropped: the federated loss weights
     (`box_predictor.{s}.fed_loss_cls_weights`, recomputed from the annotations) and `pixel_mean` /
     `pixel_std` (checked against the recipe);
  R11 the converted model attends to padded window keys as the reference does
     (`model.window_key_mask: false`, for grids that are not a multiple of the window).
A missing, misshapen, unknown or non-finite tensor is an InputError naming the key, raised before
the detector is built (the checks run against a skeleton on the meta device).

`slsd convert` is `run_convert(ConvertConfig(...))`: the recipe's model section and the annotations'
categories, then `convert_checkpoint` (read, map, load strictly, save the run directory).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from slsd_cli.errors import InputError
from slsd_cli.model.eva02 import default_global_blocks
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.model.eva02 import resample_pos_embed

NET = "backbone.net."
DROPPED_SUFFIXES = ("fed_loss_cls_weights",)
ROPE_PARTS = ("freqs_cos", "freqs_sin")
BLOCK_ROPE = re.compile(r"^backbone\.net\.blocks\.(\d+)\.attn\.rope\.(freqs_cos|freqs_sin)$")
RopeFn = Callable[[int, int], Tensor]  # (h, w) -> slsd's RoPE table sin|cos [h*w, 2*head]
PIXEL_KEYS = ("pixel_mean", "pixel_std")
STRIP_HINT = ("if you trust the file, save its state dict alone first (a one-line python command in "
              "docs/lvis_reproduction.md, 'Evaluate the released EVA-02-L LVIS model')")


# ---------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A detectron2 checkpoint's model state dict: `.safetensors`, or a torch file read with
    weights_only=True (a {"model": ...} wrapper is unwrapped). Never unpickles anything else."""
    from slsd_cli.io import load_safetensors, load_torch_file

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path=path)
    if path.suffix == ".safetensors":
        state, _ = load_safetensors(path)
        return state
    try:
        obj = load_torch_file(path)
    except InputError as exc:
        raise InputError(f"{exc.message}; {STRIP_HINT}", path=path) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError("not a detectron2 state dict (expected {'model': {name: tensor}} or {name: tensor})",
                         path=path)
    return {str(k): v for k, v in obj.items()}


# ---------------------------------------------------------------------- the key map


def key_map(cfg: ModelConfig, num_stages: int) -> dict[str, str]:
    """Our parameter name -> the reference's (every name but pos_embed's source is a plain copy)."""
    m: dict[str, str] = {}

    def pair(ours: str, theirs: str, names=("weight", "bias")) -> None:
        for n in names:
            m[f"{ours}.{n}"] = f"{theirs}.{n}"

    def conv_ln(ours_conv: str, ours_norm: str, theirs: str) -> None:  # detectron2 Conv2d(bias=False, norm=LN)
        m[f"{ours_conv}.weight"] = f"{theirs}.weight"
        pair(ours_norm, f"{theirs}.norm")

    t = "backbone.trunk."
    m[t + "pos_embed"] = NET + "pos_embed"                                              # R4
    pair(t + "patch_embed.proj", NET + "patch_embed.proj")                             # R1
    depth = cfg.vit_depth or _preset(cfg).depth
    for i in range(depth):
        o, r = f"{t}blocks.{i}.", f"{NET}blocks.{i}."
        for norm in ("norm1", "norm2"):
            pair(o + norm, r + norm)
        m[o + "attn.q_proj.weight"] = r + "attn.q_proj.weight"
        m[o + "attn.q_proj.bias"] = r + "attn.q_bias"                                   # R2
        m[o + "attn.k_proj.weight"] = r + "attn.k_proj.weight"
        m[o + "attn.v_proj.weight"] = r + "attn.v_proj.weight"
        m[o + "attn.v_proj.bias"] = r + "attn.v_bias"
        pair(o + "attn.proj", r + "attn.proj")
        for ours, theirs in (("fc1_g", "w1"), ("fc1_x", "w2"), ("norm", "ffn_ln"), ("fc2", "w3")):  # R3
            pair(o + f"mlp.{ours}", r + f"mlp.{theirs}")
    p = "backbone.pyramid."                                                             # R5
    pair(p + "scale4.0", "backbone.simfp_2.0")
    pair(p + "scale4.1", "backbone.simfp_2.1")
    pair(p + "scale4.3", "backbone.simfp_2.3")
    pair(p + "scale2", "backbone.simfp_3.0")
    first = {0: ("simfp_2", 4), 1: ("simfp_3", 1), 2: ("simfp_4", 0), 3: ("simfp_5", 1)}
    for level, (stage, k) in first.items():
        conv_ln(f"{p}outputs.{level}.0", f"{p}outputs.{level}.1", f"backbone.{stage}.{k}")
        conv_ln(f"{p}outputs.{level}.2", f"{p}outputs.{level}.3", f"backbone.{stage}.{k + 1}")
    rpn = "proposal_generator.rpn_head."                                                # R6
    if cfg.rpn_convs == 1:
        pair("rpn.head.convs.0", rpn + "conv")
    else:
        for k in range(cfg.rpn_convs):
            pair(f"rpn.head.convs.{2 * k}", f"{rpn}conv.conv{k}")
    pair("rpn.head.objectness", rpn + "objectness_logits")
    pair("rpn.head.deltas", rpn + "anchor_deltas")
    for s in range(num_stages):                                                         # R7
        o, head, pred = f"roi_heads.stages.{s}.", f"roi_heads.box_head.{s}.", f"roi_heads.box_predictor.{s}."
        for j in range(cfg.box_head_convs):
            conv_ln(f"{o}head.convs.{3 * j}", f"{o}head.convs.{3 * j + 1}", f"{head}conv{j + 1}")
        pair(o + "head.fc", head + "fc1")
        pair(o + "cls_score", pred + "cls_score")
        pair(o + "bbox_pred", pred + "bbox_pred")
    mh = "roi_heads.mask_head."                                                         # R8
    for j in range(cfg.mask_head_convs):
        conv_ln(f"mask_head.convs.{3 * j}", f"mask_head.convs.{3 * j + 1}", f"{mh}mask_fcn{j + 1}")
    pair("mask_head.deconv", mh + "deconv")
    pair("mask_head.predictor", mh + "predictor")
    return m


def _preset(cfg: ModelConfig):
    from slsd_cli.model.eva02 import EVA_PRESETS

    if cfg.backbone not in EVA_PRESETS:
        raise InputError(f"the converter needs an EVA-02 backbone (eva02_large, eva02_base), got {cfg.backbone!r}",
                         record="model.backbone")
    preset = EVA_PRESETS[cfg.backbone]
    if preset.qkv_fused or not preset.scale_mlp:
        raise InputError(f"{cfg.backbone} has a fused qkv / no SwiGLU norm; EVA-02's detectors use "
                         "eva02_base or eva02_large blocks", record="model.backbone")
    return preset


# ---------------------------------------------------------------------- conversion


def class_permutation(categories: list[dict], checkpoint_ids: list[int] | None = None) -> list[int]:
    """Row of the checkpoint for each of our classes: checkpoint rows are `checkpoint_ids` (default:
    our category ids ascending, detectron2's LVIS order)."""
    ours = [int(c["id"]) for c in categories]
    theirs = sorted(ours) if checkpoint_ids is None else [int(c) for c in checkpoint_ids]
    if sorted(theirs) != sorted(ours) or len(set(theirs)) != len(theirs):
        raise InputError(f"the checkpoint's {len(theirs)} classes are not the run's {len(ours)} categories",
                         record="categories")
    row = {cid: i for i, cid in enumerate(theirs)}
    return [row[cid] for cid in ours]


def convert_state_dict(state: dict[str, Tensor], cfg: ModelConfig, own: dict[str, Tensor],
                       categories: list[dict], checkpoint_ids: list[int] | None = None,
                       source: str | Path = "checkpoint", rope: RopeFn | None = None) -> dict[str, Tensor]:
    """The reference `state` -> tensors for a model whose state dict is `own` (names, shapes and
    dtypes; meta tensors will do). `rope` (slsd's RoPE for an h x w grid) also checks the values of
    the reference's RoPE tables, not only their shapes."""
    _preset(cfg)
    num_stages = len(cfg.cascade_ious)
    mapping = key_map(cfg, num_stages)
    if set(mapping) != set(own):
        extra = sorted(set(own) - set(mapping)) or sorted(set(mapping) - set(own))
        raise InputError(f"the recipe's model is not the reference architecture ({extra[0]})", record="model")
    if any(k.endswith("rel_pos_h") or k.endswith("mlp.fc1.weight") for k in state):
        raise InputError("a ViTDet (MAE ViT, relative positions) checkpoint: slsd's detector has an EVA-02 "
                         "backbone; only EVA-02 detectors convert", path=source)
    perm = torch.tensor(class_permutation(categories, checkpoint_ids))
    used = check_rope_buffers(state, cfg, source, rope)
    out: dict[str, Tensor] = {}
    for ours, theirs in mapping.items():
        if theirs not in state:
            raise InputError(f"missing tensor {theirs!r} (for {ours})", path=source)
        value = state[theirs]
        _check_finite(value, theirs, source)
        used.add(theirs)
        if ours == "backbone.trunk.pos_embed":
            value = _pos_embed(value, own[ours], theirs, source)
        elif ours.endswith("cls_score.weight") or ours.endswith("cls_score.bias"):
            if value.shape[0] == len(perm) + 1:  # background last, classes permuted
                value = torch.cat([value[perm], value[len(perm):]])
        elif ours.startswith("mask_head.predictor."):
            if value.shape[0] == len(perm):
                value = value[perm]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise InputError(f"tensor {theirs!r} has shape {tuple(state[theirs].shape)}, the model expects "
                             f"{tuple(own[ours].shape)} (for {ours})", path=source)
        out[ours] = value.to(own[ours].dtype).contiguous()
    for key in sorted(set(state) - used):
        if key.endswith(DROPPED_SUFFIXES):
            continue
        if key in PIXEL_KEYS:
            want = torch.tensor(cfg.pixel_mean if key == "pixel_mean" else cfg.pixel_std)
            if not torch.allclose(state[key].flatten().float(), want, atol=1e-3):
                raise InputError(f"{key} {state[key].flatten().tolist()} differs from the recipe's "
                                 f"{want.tolist()}", path=source)
            continue
        raise InputError(f"unexpected tensor {key!r} (not part of the reference architecture)", path=source)
    return out


def _check_finite(value: Tensor, key: str, source: str | Path) -> None:
    if value.is_floating_point() and not value.is_meta:
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise InputError(f"tensor {key!r} holds {bad} non-finite values (NaN or inf): not usable weights",
                             path=source)


def check_rope_buffers(state: dict[str, Tensor], cfg: ModelConfig, source: str | Path,
                       rope: RopeFn | None = None) -> set[str]:
    """Check the reference's RoPE buffers (R10) and return their keys, to be dropped: the shared
    `rope_win` / `rope_glb` tables have the recipe's window and head size (and, given `rope`,
    slsd's values), and every per-block copy equals the shared table of its block's kind."""
    preset = _preset(cfg)
    depth = cfg.vit_depth or preset.depth
    head = (cfg.vit_embed_dim or preset.embed_dim) // (cfg.vit_num_heads or preset.num_heads)
    global_blocks = set(default_global_blocks(depth) if cfg.global_blocks is None else cfg.global_blocks)
    checked: set[str] = set()
    for table in ("rope_win", "rope_glb"):
        for part in ROPE_PARTS:
            key = f"{NET}{table}.{part}"
            if key in state:
                _check_rope_table(state[key], key, table, part, cfg.window_size, head, source, rope)
                checked.add(key)
    for key, value in state.items():
        match = BLOCK_ROPE.match(key)
        if match is None or int(match.group(1)) >= depth:
            continue  # a block the recipe lacks: reported as an unexpected tensor
        block, part = int(match.group(1)), match.group(2)
        kind = "global" if block in global_blocks else "windowed"
        shared = f"{NET}{'rope_glb' if kind == 'global' else 'rope_win'}.{part}"
        if shared not in state:
            raise InputError(f"tensor {key!r} copies {shared!r}, which the checkpoint lacks", path=source)
        same = value.shape == state[shared].shape and (value.is_meta or torch.equal(value, state[shared]))
        if not same:
            raise InputError(f"tensor {key!r} differs from {shared!r}, the shared table it should copy (block "
                             f"{block} is {kind} in the recipe: model.global_blocks {sorted(global_blocks)}, "
                             f"window_size {cfg.window_size}; is --recipe the checkpoint's architecture?)",
                             path=source)
        checked.add(key)
    return checked


def _check_rope_table(value: Tensor, key: str, table: str, part: str, window: int, head: int,
                      source: str | Path, rope: RopeFn | None) -> None:
    side = math.isqrt(value.shape[0]) if value.dim() == 2 else 0
    if value.dim() != 2 or side * side != value.shape[0] or value.shape[1] != head or (
            table == "rope_win" and side != window):
        rows = f"{window}*{window}" if table == "rope_win" else "grid*grid"
        raise InputError(f"tensor {key!r} has shape {tuple(value.shape)}, the recipe needs [{rows}, {head}] "
                         f"(model.window_size {window}, head size {head}): is --recipe the checkpoint's "
                         "architecture?", path=source)
    if rope is None or value.is_meta:
        return
    sin, cos = rope(side, side).chunk(2, dim=-1)
    ours = cos if part == "freqs_cos" else sin
    diff = float((value.double() - ours.double()).abs().max())
    if not diff <= 1e-5:  # NaN too
        raise InputError(f"tensor {key!r} is not the RoPE slsd computes for a {side}x{side} grid (largest "
                         f"difference {diff:.3g})", path=source)


def _pos_embed(value: Tensor, own: Tensor, key: str, source: str | Path) -> Tensor:
    """The reference's position table -> ours: class row dropped, resampled to our grid in float64
    and cast once to our dtype."""
    if value.dim() != 3 or value.shape[-1] != own.shape[-1]:
        raise InputError(f"tensor {key!r} has shape {tuple(value.shape)}, expected [1, 1 + n*n, "
                         f"{own.shape[-1]}]", path=source)
    tokens = value.shape[1]
    side = math.isqrt(tokens - 1)
    if side * side == tokens - 1:
        value = value[:, 1:]  # the class-token row
    else:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise InputError(f"tensor {key!r} has shape {tuple(value.shape)}: not a square position grid",
                             path=source)
    grid = math.isqrt(own.shape[1])
    return resample_pos_embed(value, (side, side), (grid, grid), dtype=own.dtype)


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, categories: list[dict], cfg: ModelConfig,
                       *, window_key_mask: bool = False, extra: dict | None = None) -> dict:
    """Read, convert (checked against a meta-device skeleton of the recipe's detector, so a bad
    checkpoint stops before anything is built), load strictly and save a detectron2 checkpoint as
    an slsd run directory. -> a summary {"tensors", "dropped", "classes", "out"}."""
    from slsd_cli.model.weights import build_detector, load_strict, save_detector

    cfg = dataclasses.replace(cfg, pretrained=False, weights=None, init_from=None, window_key_mask=window_key_mask)
    state = read_checkpoint(checkpoint)
    _preset(cfg)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        skeleton = build_detector(cfg, categories)
    trunk = skeleton.backbone.trunk
    converted = convert_state_dict(state, cfg, skeleton.state_dict(), categories, source=checkpoint,
                                   rope=lambda h, w: trunk.rope(h, w, torch.device("cpu")))
    model = build_detector(cfg, categories)
    load_strict(model, converted, checkpoint, "the recipe")
    save_detector(model, out_dir, categories, cfg, extra={"converted_from": str(checkpoint), **(extra or {})})
    return {"tensors": len(converted), "dropped": len(state) - len(converted), "classes": len(categories),
            "out": str(out_dir)}


# ---------------------------------------------------------------------- slsd convert


@dataclasses.dataclass
class ConvertConfig:
    checkpoint: Path  # the detectron2 checkpoint (.pth read with weights_only=True, or .safetensors)
    annotations: Path  # LVIS json whose categories the checkpoint predicts (ids ascending = its class rows)
    out_dir: Path  # the slsd run directory written (model.safetensors + model.json)
    recipe: str = "lvis_eva02_L_teacher"  # its model: section is the checkpoint's architecture
    overrides: list[str] = dataclasses.field(default_factory=list)  # model.key=value only
    window_key_mask: bool = False  # False: padded window keys attend, as in the reference (R11)
    force: bool = False


def run_convert(cfg: ConvertConfig) -> dict:
    """Check every input and output, then `convert_checkpoint`. -> its summary."""
    from slsd_cli import recipe as recipes
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.io import check_output
    from slsd_cli.model.weights import META_NAME, WEIGHTS_NAME

    bad = [o for o in cfg.overrides if not o.startswith("model.")]
    if bad:
        raise InputError(f"only model.* overrides apply to a conversion, got {bad[0]!r}")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out-dir must be a directory", path=out_dir)
    check_output(out_dir / WEIGHTS_NAME, cfg.force)
    check_output(out_dir / META_NAME, cfg.force)
    model_cfg = recipes.load(cfg.recipe, list(cfg.overrides)).model
    ann = load_annotations(cfg.annotations, require_annotations=False)
    if not ann.categories:  # the classes come from here: name the file, not the model section
        raise InputError("lists no categories (the checkpoint's classes are read from them)", path=cfg.annotations)
    return convert_checkpoint(cfg.checkpoint, out_dir, ann.categories, model_cfg, window_key_mask=cfg.window_key_mask,
                              extra={"recipe": cfg.recipe, "annotations": str(cfg.annotations)})


__all__ = ["ConvertConfig", "check_rope_buffers", "class_permutation", "convert_checkpoint", "convert_state_dict",
           "key_map", "read_checkpoint", "run_convert"]
