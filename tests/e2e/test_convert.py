"""`slsd convert` (issue 14 §2, issue 21 §1): detectron2-format EVA-02 LVIS Cascade Mask R-CNN -> slsd run.

The reference checkpoints here are built from the reference's own state-dict key lists
(`tests/fixtures/eva02_det_reference_keys.json`, recorded by instantiating baaivision/EVA
`EVA-02/det`'s LVIS Cascade Mask R-CNN LazyConfigs): every parameter, the shared RoPE tables
`rope_win` / `rope_glb`, their per-block copies `blocks.N.attn.rope.freqs_{cos,sin}` and the
federated-loss weights, with random values (RoPE tables computed as EVA-02 describes them). The
`small` layout is the 1024 config at the width of `_cfg()` (width 64, 4 blocks, 3 classes); the
full-size layouts are checked on the meta device."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from slsd_cli.cli import main
from slsd_cli.errors import InputError
from slsd_cli.model import build_detector, load_detector, tiny_eva_config
from slsd_cli.model.convert_detectron2 import class_permutation, convert_state_dict, key_map, read_checkpoint
from slsd_cli.inference.predictor import Predictor
from slsd_cli.typed_yaml import to_dict
from tests.helpers.tiny_data import write_dataset

# LVIS-like categories, listed in the annotation file out of id order
CATEGORIES = [{"id": 9, "name": "c9", "frequency": "f", "image_count": 30},
              {"id": 2, "name": "c2", "frequency": "r", "image_count": 3},
              {"id": 5, "name": "c5", "frequency": "c", "image_count": 12}]
REFERENCE_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "eva02_det_reference_keys.json"
ROPE_TABLES = ("backbone.net.rope_win.", "backbone.net.rope_glb.")


def _cfg(**kw):
    return tiny_eva_config(backbone="eva02_base", drop_path=0.0, test_score_threshold=0.0, **kw)


@functools.lru_cache(maxsize=None)
def reference_layout(name: str) -> dict[str, list[int]]:
    """The reference's state-dict names and shapes, in its order: 'small', 'eva02_L_lvis_bsl', 'eva02_L_lvis_sys'."""
    return json.loads(REFERENCE_KEYS.read_text())["layouts"][name]


def eva_rope(rows: int, head: int, pretrain_grid: int = 16, theta: float = 10000.0) -> dict[str, torch.Tensor]:
    """EVA-02's 2-D RoPE tables for a side x side grid (rows = side^2), written from its description:
    per axis, positions rescaled to the pretraining grid (i / side * 16) times head/4 frequencies
    theta^(-2j / (head/2)), each angle repeated for its (even, odd) pair; the row's angles fill the
    first half of a token's head, the column's the second."""
    side = int(round(rows ** 0.5))
    half = head // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)
    pos = torch.arange(side).float() / side * pretrain_grid
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [side, half]
    table = torch.cat([angles[:, None, :].expand(side, side, half), angles[None, :, :].expand(side, side, half)], -1)
    table = table.reshape(rows, head)
    return {"freqs_cos": table.cos(), "freqs_sin": table.sin()}


def reference_state(layout: str = "small", seed: int = 0, device: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint with the reference's full key list: random parameters, the shared RoPE tables,
    per-block copies equal to the table of their block (the reference's blocks hold the shared
    module, so `state_dict()` repeats it), positive federated-loss weights. device="meta": all but
    the RoPE buffers on the meta device (shapes only)."""
    g = torch.Generator().manual_seed(seed)
    shapes = reference_layout(layout)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.startswith(ROPE_TABLES):
            state[name] = eva_rope(*shape)[name.rsplit(".", 1)[1]]
        elif ".attn.rope." in name:  # a per-block copy: of the shared table of its shape (same storage)
            table = next(t for t in ROPE_TABLES if list(state[t + "freqs_cos"].shape) == shape)
            state[name] = state[table + name.rsplit(".", 1)[1]]
        elif device == "meta":
            state[name] = torch.empty(*shape, device="meta")
        elif name.endswith("fed_loss_cls_weights"):
            state[name] = torch.rand(*shape, generator=g) * 10 + 1
        else:
            state[name] = torch.randn(*shape, generator=g) * 0.05
    return state


def buffers(state: dict) -> list[str]:
    """The reference's buffers: RoPE tables, their per-block copies, federated-loss weights."""
    return [k for k in state if ".rope" in k or k.endswith("fed_loss_cls_weights")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    state = reference_state()
    ckpt = root / "model_final.pth"
    torch.save({"model": state, "iteration": 40000, "__author__": "test"}, ckpt)
    ann = root / "lvis_val.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    recipe = root / "tiny_eva02.yaml"
    recipe.write_text(yaml.safe_dump({"model": to_dict(_cfg())}))
    return root, state, ckpt, ann, recipe


def _convert(files, out: Path, *extra: str) -> int:
    root, _, ckpt, ann, recipe = files
    return main(["convert", str(ckpt), "--annotations", str(ann), "--out-dir", str(out), "--recipe", str(recipe),
                 *extra])


def test_converts_loads_strictly_and_maps_every_rule(files, tmp_path):
    _, state, _, _, _ = files
    out = tmp_path / "run"
    assert _convert(files, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # safetensors, no pickle
    model, meta = load_detector(out)  # strict: every tensor present, none extra, equal shapes
    assert [c["id"] for c in meta["categories"]] == [2, 5, 9]  # the annotations' order: ids ascending
    assert meta["model"]["window_key_mask"] is False  # R11: padded keys attend as in the reference
    sd = model.state_dict()
    assert len(buffers(state)) == 4 + 8 + 3  # shared RoPE, per-block copies (4 blocks x 2), federated (3 stages)
    assert len(sd) == len(state) - len(buffers(state)) == 151  # R10: those buffers dropped, nothing else
    b, r = "backbone.trunk.blocks.2.", "backbone.net.blocks.2."
    assert torch.equal(sd[b + "attn.k_proj.weight"], state[r + "attn.k_proj.weight"])  # R1
    assert torch.equal(sd[b + "attn.q_proj.bias"], state[r + "attn.q_bias"])  # R2
    assert torch.equal(sd[b + "attn.v_proj.bias"], state[r + "attn.v_bias"])
    for ours, theirs in (("fc1_g", "w1"), ("fc1_x", "w2"), ("norm", "ffn_ln"), ("fc2", "w3")):  # R3
        assert torch.equal(sd[f"{b}mlp.{ours}.weight"], state[f"{r}mlp.{theirs}.weight"])
    # R4: class row dropped, 14x14 -> 8x8 plain bicubic (not timm's antialiased resampling), in
    # float64 and cast once to the model's float32
    table = state["backbone.net.pos_embed"][:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    plain = F.interpolate(table.double(), size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(sd["backbone.trunk.pos_embed"], plain.permute(0, 2, 3, 1).reshape(1, 64, 64).float())
    own64 = {k: v.double() for k, v in sd.items()}  # a float64 model gets the float64 table itself
    table64 = convert_state_dict(state, _cfg(), own64, meta["categories"])["backbone.trunk.pos_embed"]
    assert table64.dtype == torch.float64 and torch.equal(table64, plain.permute(0, 2, 3, 1).reshape(1, 64, 64))
    smooth = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(sd["backbone.trunk.pos_embed"], smooth.permute(0, 2, 3, 1).reshape(1, 64, 64), atol=1e-3)
    # R5 simple feature pyramid
    assert torch.equal(sd["backbone.pyramid.outputs.0.1.weight"], state["backbone.simfp_2.4.norm.weight"])
    assert torch.equal(sd["backbone.pyramid.outputs.3.2.weight"], state["backbone.simfp_5.2.weight"])
    assert torch.equal(sd["backbone.pyramid.scale2.weight"], state["backbone.simfp_3.0.weight"])
    # R6 RPN, R7 cascade heads, R8 mask head
    assert torch.equal(sd["rpn.head.convs.0.weight"], state["proposal_generator.rpn_head.conv.weight"])
    assert torch.equal(sd["rpn.head.deltas.bias"], state["proposal_generator.rpn_head.anchor_deltas.bias"])
    assert torch.equal(sd["roi_heads.stages.2.head.convs.1.bias"], state["roi_heads.box_head.2.conv1.norm.bias"])
    assert torch.equal(sd["roi_heads.stages.1.head.fc.weight"], state["roi_heads.box_head.1.fc1.weight"])
    assert torch.equal(sd["roi_heads.stages.0.bbox_pred.weight"], state["roi_heads.box_predictor.0.bbox_pred.weight"])
    assert torch.equal(sd["mask_head.convs.0.weight"], state["roi_heads.mask_head.mask_fcn1.weight"])
    assert torch.equal(sd["mask_head.deconv.weight"], state["roi_heads.mask_head.deconv.weight"])
    # R9 (sorted ids: identity), background last
    assert torch.equal(sd["roi_heads.stages.1.cls_score.weight"], state["roi_heads.box_predictor.1.cls_score.weight"])
    # the converted run predicts, and a teacher can start from it (model.init_from)
    dets = Predictor(model, [2, 5, 9], amp="fp32").predict(torch.rand(1, 3, 96, 128) * 255, [(96, 128)])
    assert dets[0]["scores"].numel() > 0
    started = build_detector(dataclasses.replace(_cfg(), init_from=str(out)), meta["categories"])
    assert all(torch.equal(v, sd[k]) for k, v in started.state_dict().items())
    with pytest.raises(InputError, match="categories differ"):
        build_detector(dataclasses.replace(_cfg(), init_from=str(out)), meta["categories"][::-1])


def test_category_permutation_round_trips():
    state = reference_state(seed=1)
    cfg = _cfg()
    own = build_detector(cfg, CATEGORIES).state_dict()
    shuffled = convert_state_dict(state, cfg, own, CATEGORIES)  # our order: ids 9, 2, 5
    perm = class_permutation(CATEGORIES)
    assert perm == [2, 0, 1]  # checkpoint rows are ids ascending: 2, 5, 9
    src_w = state["roi_heads.box_predictor.0.cls_score.weight"]
    ours_w = shuffled["roi_heads.stages.0.cls_score.weight"]
    inverse = torch.argsort(torch.tensor(perm))
    assert torch.equal(ours_w[:3][inverse], src_w[:3]) and torch.equal(ours_w[3], src_w[3])  # background last
    assert torch.equal(shuffled["mask_head.predictor.weight"][inverse], state["roi_heads.mask_head.predictor.weight"])
    # the same detections, labelled with the same category ids, whichever order the run lists them in
    ordered = sorted(CATEGORIES, key=lambda c: c["id"])
    models = []
    for cats, tensors in ((CATEGORIES, shuffled),
                          (ordered, convert_state_dict(state, cfg, own, ordered))):
        model = build_detector(cfg, cats).eval()
        model.load_state_dict(tensors)
        models.append(Predictor(model, [c["id"] for c in cats], amp="fp32"))
    image = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(0)) * 255
    a, b = (p.predict(image, [(128, 96)])[0] for p in models)
    ids_a = torch.tensor(models[0].category_ids)[a["labels"]]
    ids_b = torch.tensor(models[1].category_ids)[b["labels"]]
    key_a = sorted(zip(ids_a.tolist(), a["scores"].tolist()))
    key_b = sorted(zip(ids_b.tolist(), b["scores"].tolist()))
    assert len(key_a) > 0 and len(key_a) == len(key_b)
    assert [c for c, _ in key_a] == [c for c, _ in key_b]
    assert [s for _, s in key_a] == pytest.approx([s for _, s in key_b], abs=1e-6)


@pytest.mark.parametrize("damage, named", [
    ("missing", "backbone.net.blocks.1.attn.q_bias"),
    ("misshapen", "roi_heads.box_head.0.fc1.weight"),
    ("extra", "backbone.net.blocks.0.attn.k_bias"),
    ("copy differs", "backbone.net.blocks.2.attn.rope.freqs_sin"),  # a windowed block's copy of rope_win
    ("copy of the other table", "backbone.net.blocks.1.attn.rope.freqs_cos"),  # global block 1 holding rope_win
    ("NaN", "backbone.net.blocks.3.mlp.w3.weight"),
    ("inf", "roi_heads.box_predictor.2.cls_score.bias"),
])
def test_bad_tensor_is_a_one_line_exit_2_before_anything_is_written(files, tmp_path, capsys, damage, named):
    state = dict(files[1])
    if damage == "missing":
        del state[named]
    elif damage == "misshapen":
        state[named] = torch.zeros(3, 5)
    elif damage == "extra":
        state[named] = torch.zeros(64)
    elif damage == "copy differs":
        state[named] = state[named].clone()
        state[named][5, 7] += 1e-6
    elif damage == "copy of the other table":
        state[named] = state["backbone.net.rope_win.freqs_cos"]
    else:
        state[named] = state[named].clone()
        state[named].view(-1)[3] = float(damage.lower())
    ckpt = tmp_path / "bad.pth"
    torch.save({"model": state}, ckpt)
    root, _, _, ann, recipe = files
    capsys.readouterr()
    code = main(["convert", str(ckpt), "--annotations", str(ann), "--out-dir", str(tmp_path / "out"),
                 "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_recipe_whose_global_blocks_differ_is_refused_by_the_rope_copies(files, tmp_path, capsys):
    """Block 0 global in the recipe, windowed in the checkpoint: its RoPE copy names the mismatch."""
    root, _, ckpt, ann, recipe = files
    capsys.readouterr()
    code = main(["convert", str(ckpt), "--annotations", str(ann), "--out-dir", str(tmp_path / "out"),
                 "--recipe", str(recipe), "model.global_blocks=[0,3]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'backbone.net.blocks.0.attn.rope.freqs_cos' differs from 'backbone.net.rope_glb.freqs_cos'" in err
    assert "model.global_blocks [0, 3]" in err


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_malicious_pickle_is_never_unpickled(tmp_path, files, capsys):
    marker = tmp_path / "marker.txt"
    for name, dump in (("evil.pth", lambda f, obj: torch.save(obj, f)), ("evil.pkl", lambda f, obj: pickle.dump(obj, f))):
        path = tmp_path / name
        with open(path, "wb") as f:
            dump(f, {"model": {"x": _Evil(str(marker))}})
        root, _, _, ann, recipe = files
        capsys.readouterr()
        code = main(["convert", str(path), "--annotations", str(ann), "--out-dir", str(tmp_path / "o"),
                     "--recipe", str(recipe)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "docs/lvis_reproduction.md" in err  # the stripping hint
        assert not marker.exists()


def test_safetensors_input_and_bare_state_dict(files, tmp_path):
    from safetensors.torch import save_file

    state = files[1]
    st = tmp_path / "model.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(st))  # safetensors refuses shared storage
    assert read_checkpoint(st).keys() == state.keys()
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    assert read_checkpoint(bare).keys() == state.keys()
    root, _, _, ann, recipe = files
    assert main(["convert", str(st), "--annotations", str(ann), "--out-dir", str(tmp_path / "run"),
                 "--recipe", str(recipe)]) == 0
    assert main(["convert", str(st), "--annotations", str(ann), "--out-dir", str(tmp_path / "run"),
                 "--recipe", str(recipe)]) == 2  # an existing run needs --force


def test_vitdet_mae_checkpoint_is_refused_clearly():
    state = reference_state()
    state["backbone.net.blocks.0.attn.rel_pos_h"] = torch.zeros(27, 32)
    cfg = _cfg()
    with pytest.raises(InputError, match="ViTDet"):
        convert_state_dict(state, cfg, build_detector(cfg, CATEGORIES).state_dict(), CATEGORIES)


@pytest.mark.parametrize("recipe, layout, grid", [("lvis_eva02_L_teacher", "eva02_L_lvis_bsl", 64),
                                                  ("lvis_eva02_L_sys_teacher", "eva02_L_lvis_sys", 96)])
def test_released_eva02_L_layout_maps_all_569_tensors(recipe, layout, grid):
    """The released EVA-02-L layouts (the reference's full key lists: 569 parameters, 52 RoPE
    buffers, 3 federated weights) against our packaged recipes: parameters on the meta device, the
    RoPE tables real, so their shapes, values and per-block copies (which blocks are global) are
    checked; the other release's recipe is refused, naming a RoPE table."""
    from slsd_cli import recipe as recipes

    cats = [{"id": i + 1, "image_count": 1} for i in range(1203)]
    state = reference_state(layout, device="meta")
    assert len(state) == 569 + 52 + 3
    for name in (recipe, "lvis_eva02_L_sys_teacher" if recipe == "lvis_eva02_L_teacher" else "lvis_eva02_L_teacher"):
        cfg = dataclasses.replace(recipes.load(name).model, pretrained=False)
        with torch.device("meta"):
            skeleton = build_detector(cfg, cats)
        own = skeleton.state_dict()
        rope = functools.partial(skeleton.backbone.trunk.rope, device=torch.device("cpu"))
        if name != recipe:
            with pytest.raises(InputError, match="rope_win.freqs_cos.*model.window_size"):
                convert_state_dict(state, cfg, own, cats, rope=rope)
            continue
        assert len(key_map(cfg, 3)) == len(own) == 569
        out = convert_state_dict(state, cfg, own, cats, rope=rope)
        assert len(out) == 569 and out["backbone.trunk.pos_embed"].shape == (1, grid * grid, 1024)


def test_a_converted_run_works_in_every_command(files, tmp_path):
    """eval / calibrate / predict / prototypes --checkpoint and train-teacher model.init_from on a converted run."""
    root, _, ckpt, _, recipe = files
    data = tmp_path / "data"
    gt = write_dataset(data, [(48, 64), (64, 40)], [2, 3], categories=(2, 5, 9))
    run = tmp_path / "converted"
    assert main(["convert", str(ckpt), "--annotations", str(gt), "--out-dir", str(run), "--recipe", str(recipe)]) == 0
    assert main(["eval", "--annotations", str(gt), "--checkpoint", str(run), "--images", str(data),
                 "--out-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_detections"] > 0
    assert main(["calibrate", "--annotations", str(gt), "--checkpoint", str(run), "--images", str(data),
                 "--out", str(tmp_path / "calibration.json")]) == 0
    assert main(["predict", "--checkpoint", str(run), str(data), "--out", str(tmp_path / "predict.json")]) == 0
    assert len(json.loads((tmp_path / "predict.json").read_text())) > 0
    assert main(["prototypes", "--annotations", str(gt), "--images", str(data), "--checkpoint", str(run),
                 "--image-size", "128", "--out", str(tmp_path / "prototypes.safetensors")]) == 0
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", str(recipe), f"model.init_from={run}", "train.batch_per_process=1",
                 "train.micro_batch=1", "train.warmup_iters=0", "data.image_size=128", "data.num_workers=0",
                 "data.repeat_threshold=0", "train.amp=fp32", "--train-json", str(gt), "--images", str(data),
                 "--iterations", "1", "--smoothing", "none", "--out-dir", str(teacher)]) == 0
    start, _ = load_detector(run)
    tuned, _ = load_detector(teacher)
    # one AdamW step (lr 4e-5) away from the converted weights, not from a random init
    drift = max(float((v - start.state_dict()[k]).abs().max()) for k, v in tuned.state_dict().items())
    assert 0 < drift < 1e-3
