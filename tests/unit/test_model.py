"""Unit tests of slsd_cli.model: heads, box coder, windowed ViT, soft-target losses, inference
output format, weights round trip. CPU, tiny random-init models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slsd_cli.typed_yaml import apply_overrides, from_dict, to_dict
from slsd_cli.errors import InputError
from slsd_cli.model import (ModelConfig, build_model, build_detector, load_detector, paste_masks,
                            save_detector, tiny_cnn_config, tiny_eva_config, to_results)
from slsd_cli.model.backbone import build_backbone
from slsd_cli.model.eva02 import EVA02ViT
from slsd_cli.model.box_coder import BoxCoder
from slsd_cli.model.losses import (federated_classes, gather_class_targets, sigmoid_classification_loss,
                                   softmax_classification_loss)
from slsd_cli.model.proposal_matching import match, sample
from tests.helpers.shapes import coco_gt, draw_shapes

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return draw_shapes(n=2, size=SIZE, seed=1)


def categories(n: int) -> list[dict]:
    return [{"id": 10 + i, "name": f"c{i}", "frequency": "f", "image_count": 5 * (i + 1)} for i in range(n)]


# ---------------------------------------------------------------------- small pieces


def test_box_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    wh = torch.rand(200, 2, generator=g) * 200 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    xy2 = xy + (torch.rand(200, 2, generator=g) - 0.5) * 40
    targets = torch.cat([xy2, xy2 + wh * (torch.rand(200, 2, generator=g) + 0.5)], 1)
    for weights in ([1, 1, 1, 1], [10, 10, 5, 5], [30, 30, 15, 15]):
        coder = BoxCoder(weights)
        deltas = coder.encode(boxes, targets)
        assert torch.allclose(coder.decode(deltas, boxes), targets, atol=1e-3)
    assert torch.equal(BoxCoder().encode(boxes, boxes), torch.zeros(200, 4))
    # a wild delta is clamped instead of overflowing
    assert torch.isfinite(BoxCoder().decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), boxes[:1])).all()


def test_match_and_sample():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.2, 0.65, 0.0, 0.0]])
    idx, labels = match(iou, 0.3, 0.7, allow_low_quality=True)
    assert labels.tolist() == [1, 1, 0, 0]  # column 1 is gt 1's best match (low-quality match)
    assert idx.tolist()[:2] == [0, 1]
    idx, labels = match(iou, 0.5, 0.5)
    assert labels.tolist() == [1, 1, 0, 0]
    idx, labels = match(torch.zeros(0, 4), 0.5, 0.5)
    assert labels.tolist() == [0, 0, 0, 0]
    pos, neg = sample(torch.tensor([1] * 10 + [0] * 100), 16, 0.25)
    assert len(pos) == 4 and len(neg) == 12 and bool((pos < 10).all()) and bool((neg >= 10).all())


def test_model_config_round_trips_through_recipe_types():
    cfg = ModelConfig()
    assert cfg.global_blocks is None and cfg.cascade_box_weights[2] == [30.0, 30.0, 15.0, 15.0]
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg

    @dataclasses.dataclass
    class Recipe:
        model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    recipe = apply_overrides(Recipe(), ["model.backbone=resnet18", "model.global_blocks=[1, 3]",
                                        "model.classifier=softmax"])
    assert recipe.model.backbone == "resnet18" and recipe.model.global_blocks == [1, 3]
    with pytest.raises(InputError):
        apply_overrides(Recipe(), ["model.classifier=hinge"])


# ---------------------------------------------------------------------- ViT backbone


def test_windowed_forward_with_whole_grid_window_equals_global():
    torch.manual_seed(0)
    grid = SIZE // 16
    windowed = EVA02ViT(tiny_eva_config(window_size=grid, global_blocks=[], drop_path=0.0)).eval()
    global_ = EVA02ViT(tiny_eva_config(global_blocks=[0, 1, 2, 3], drop_path=0.0)).eval()
    global_.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = windowed(x), global_(x)
    assert a.shape == (2, 64, grid, grid)
    assert (a - b).abs().max().item() < 1e-5
    # smaller (padded) windows really change the computation
    small = EVA02ViT(tiny_eva_config(window_size=3, global_blocks=[], drop_path=0.0)).eval()
    small.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        c = small(x)
    assert torch.isfinite(c).all() and (c - b).abs().max().item() > 1e-3


def test_padded_windows_ignore_padding():
    """Window 5 on an 8x8 grid (padded to 10x10): the top-left window equals the block run on that
    5x5 crop, and the bottom-right window (3x3 real tokens + padding) equals attention over its 9
    real tokens alone, with the window's RoPE positions: padded keys are masked out."""
    torch.manual_seed(0)
    vit = EVA02ViT(tiny_eva_config(window_size=5, vit_depth=1, global_blocks=[], drop_path=0.0)).eval()
    blk = vit.blocks[0]
    with torch.no_grad():
        for name, p in blk.named_parameters():  # non-zero biases, so padding would leak if unmasked
            if name.endswith("bias"):
                p.normal_()
        tokens = torch.randn(1, 8, 8, 64)
        full = vit._block(blk, tokens, windowed=True)
        crop = vit._block(blk, tokens[:, :5, :5].contiguous(), windowed=True)
        x = tokens[:, 5:, 5:]
        rope = vit.rope(5, 5, torch.device("cpu")).view(5, 5, -1)[:3, :3].reshape(9, -1)
        ref = x + blk.attn(blk.norm1(x).reshape(1, 9, 64), rope=rope).view(1, 3, 3, 64)
        ref = ref + blk.mlp(blk.norm2(ref))
        unmasked = x + blk.attn(F.pad(blk.norm1(x), (0, 0, 0, 2, 0, 2)).reshape(1, 25, 64),
                                rope=vit.rope(5, 5, torch.device("cpu"))).view(1, 5, 5, 64)[:, :3, :3]
    assert torch.allclose(full[:, :5, :5], crop, atol=1e-5)
    assert torch.allclose(full[:, 5:, 5:], ref, atol=1e-5)
    assert not torch.allclose(full[:, 5:, 5:], unmasked + blk.mlp(blk.norm2(unmasked)), atol=1e-3)


def test_rope_matches_timm_eva_rope():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    vit = EVA02ViT(tiny_eva_config())
    ref = RotaryEmbeddingCat(dim=vit.head_dim, in_pixels=False, feat_shape=[8, 8], ref_feat_shape=[16, 16])
    assert torch.allclose(vit.rope(8, 8, torch.device("cpu")), ref.get_embed(), atol=1e-6)


def test_backbone_weights_from_local_timm_file(tmp_path):
    """A timm EVA-02 checkpoint (patch 14) loads into our patch-16 ViT: blocks copied, patch kernel
    resampled 14 -> 16 (timm's route, model.patch_resize=timm; EVA-02's own route is tested in
    test_convert_eva_weights.py), position embedding resampled to our grid without the class token."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("eva02_tiny_patch14_224", embed_dim=64, depth=2, num_heads=2, num_classes=0)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    cfg = tiny_eva_config(vit_depth=2, global_blocks=[1], weights=str(path), patch_resize="timm")
    backbone = build_backbone(cfg)
    vit = backbone.trunk
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    assert vit.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    assert torch.allclose(vit.patch_embed.proj.weight, resample_patch_embed(src.patch_embed.proj.weight, [16, 16]))
    assert vit.pos_embed.shape == (1, 64, 64)  # 8 x 8 grid, no class token
    # plain bicubic from the checkpoint's 16 x 16 grid (no antialiasing, as EVA-02's detector)
    plain = resample_abs_pos_embed(src.pos_embed, [8, 8], num_prefix_tokens=1, antialias=False)[:, 1:]
    assert torch.allclose(vit.pos_embed, plain, atol=1e-6)
    assert not torch.allclose(vit.pos_embed, resample_abs_pos_embed(src.pos_embed, [8, 8], num_prefix_tokens=1)[:, 1:])
    # a .pth holding {"model": state} (as EVA's releases) loads too
    pth = tmp_path / "eva.pth"
    torch.save({"model": src.state_dict()}, pth)
    vit2 = build_backbone(dataclasses.replace(cfg, weights=str(pth))).trunk
    assert torch.equal(vit2.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with pytest.raises(InputError, match="not found"):
        build_backbone(dataclasses.replace(cfg, weights=str(tmp_path / "missing.safetensors")))
    bad = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    with pytest.raises(InputError):
        build_backbone(dataclasses.replace(cfg, weights=str(bad)))


def test_cnn_backbone_weights_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18")
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    backbone = build_backbone(tiny_cnn_config(weights=str(path)))
    assert torch.equal(backbone.trunk.layer3[0].conv1.weight, src.layer3[0].conv1.weight)


def test_unavailable_pretrained_weights_are_an_input_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, *args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    for cfg in (tiny_eva_config(pretrained=True), tiny_cnn_config(pretrained=True)):
        with pytest.raises(InputError, match="cannot get pretrained weights.*model.weights=FILE"):
            build_backbone(cfg)


def test_unknown_backbone_is_an_input_error():
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone(tiny_cnn_config(backbone="no_such_net_xyz"))


# ---------------------------------------------------------------------- losses


def test_one_hot_soft_targets_give_exactly_the_hard_label_losses():
    g = torch.Generator().manual_seed(0)
    n, c = 100, 400
    logits = torch.randn(n, c + 1, generator=g) * 3
    labels = torch.randint(0, c + 1, (n,), generator=g)  # c = background
    labels[50:] = c
    labels[:5] = torch.arange(5)
    fg = labels < c
    matched = labels.clamp(max=c - 1)
    class_targets = F.one_hot(torch.arange(c), c).float()  # ground truth g has class g
    soft = gather_class_targets(class_targets, matched, fg)

    # softmax: identical to F.cross_entropy with the hard labels, bit for bit
    assert torch.equal(softmax_classification_loss(logits, soft, fg), F.cross_entropy(logits, labels))

    # sigmoid BCE, with and without the federated subset (detectron2's hard-label formulation)
    hard = torch.zeros(n, c + 1)
    hard[torch.arange(n), labels] = 1
    hard = hard[:, :c]
    bce = F.binary_cross_entropy_with_logits(logits[:, :c], hard, reduction="none")
    assert torch.equal(sigmoid_classification_loss(logits, soft), bce.sum() / n)
    weights = torch.rand(c, generator=g) + 0.1
    fed = federated_classes(soft, weights, 150, generator=torch.Generator().manual_seed(3))
    present = torch.unique(labels[fg])
    prob = weights.clone()
    prob[present] = 0
    sampled = torch.multinomial(prob, 150 - len(present), replacement=False, generator=torch.Generator().manual_seed(3))
    ref_mask = torch.zeros(c)
    ref_mask[present] = 1
    ref_mask[sampled] = 1
    assert torch.equal(fed.float(), ref_mask) and int(fed.sum()) == 150
    assert torch.equal(sigmoid_classification_loss(logits, soft, fed_mask=fed),
                       (bce * ref_mask.view(1, c)).sum() / n)


def test_federated_set_keeps_every_soft_target_class():
    soft = torch.zeros(4, 100)
    soft[0, [3, 7, 90]] = torch.tensor([0.8, 0.15, 0.05])
    fed = federated_classes(soft, torch.ones(100), 10)
    assert bool(fed[[3, 7, 90]].all()) and int(fed.sum()) == 10
    many = torch.zeros(1, 100)
    many[0, :60] = 1 / 60
    assert int(federated_classes(many, torch.ones(100), 50).sum()) == 60


def test_federated_set_from_labels_ignores_smoothing_mass():
    """Label smoothing gives every class a target: the federated set is then the matched ground
    truths' classes (detectron2), not every class (which made the federated loss plain BCE)."""
    from slsd_cli.model.losses import labeled_classes

    labels = [torch.tensor([5, 42]), torch.tensor([7])]  # image 0: gts of classes 5, 42; image 1: class 7
    matched = [torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0])]
    foreground = [torch.tensor([True, False, False, True]), torch.tensor([False, True])]  # gt 1 (42) unmatched
    present = labeled_classes(labels, matched, foreground, 100)
    assert torch.nonzero(present).flatten().tolist() == [5, 7]
    smoothed = torch.full((6, 100), 0.001)  # every class reached by smoothing
    assert int(federated_classes(smoothed, torch.ones(100), 10).sum()) == 100
    fed = federated_classes(smoothed, torch.ones(100), 10, present=present)
    assert bool(fed[[5, 7]].all()) and int(fed.sum()) == 10
    assert not bool(labeled_classes([torch.zeros(0, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)],
                                    [torch.zeros(3, dtype=torch.bool)], 100).any())


def _targets_for(targets: list[dict], num_classes: int, soft: bool = False) -> list[dict]:
    out = []
    for t in targets:
        t = dict(t)
        if soft:
            t["class_targets"] = F.one_hot(t["labels"], num_classes).float()
        out.append(t)
    return out


@pytest.mark.parametrize("classifier", ["sigmoid", "softmax"])
def test_detector_one_hot_class_targets_equal_default_labels(data, classifier):
    images, targets = data
    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(classifier=classifier, use_federated=True, federated_num_classes=2),
                            3, [3, 5, 7])
    sizes = [(SIZE, SIZE)] * 2
    torch.manual_seed(1)
    a = model(images, sizes, _targets_for(targets, 3))
    torch.manual_seed(1)
    b = model(images, sizes, _targets_for(targets, 3, soft=True))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a real soft target changes the classification losses only
    smooth = _targets_for(targets, 3, soft=True)
    for t in smooth:
        t["class_targets"] = 0.8 * t["class_targets"] + 0.2 / 3
    torch.manual_seed(1)
    c = model(images, sizes, smooth)
    assert not torch.equal(a["cls_stage0"], c["cls_stage0"])
    assert torch.equal(a["box_stage0"], c["box_stage0"]) and torch.equal(a["mask"], c["mask"])


# ---------------------------------------------------------------------- heads: shapes, gradients


@pytest.mark.parametrize("make_cfg", [tiny_cnn_config, tiny_eva_config], ids=["cnn", "eva"])
def test_losses_and_gradients_reach_every_head(data, make_cfg):
    images, targets = data
    torch.manual_seed(0)
    model = build_model(make_cfg(), 3, [3, 5, 7]).train()
    # second image: background only, and padded in the batch (valid 120 x 100)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 120, 100, dtype=torch.bool), "loss_weight": 0.5}
    losses = model(images, [(SIZE, SIZE), (120, 100)], [targets[0], empty])
    expected = {"rpn_cls", "rpn_box", "mask"} | {f"{k}_stage{i}" for k in ("cls", "box") for i in range(3)}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    for part in ("backbone", "rpn", "roi_heads.stages.0", "roi_heads.stages.1", "roi_heads.stages.2", "mask_head"):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(part)]
        assert params, part
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in params), part
        assert any(p.grad.abs().sum() > 0 for _, p in params), part


def test_box_head_fc_starts_as_detectron2s_c2_xavier_fill():
    """The box head's fc: kaiming_uniform with a = 1 (detectron2's c2_xavier_fill, as ViTDet), so
    weights fill [-sqrt(3 / fan_in), sqrt(3 / fan_in)], and a zero bias."""
    torch.manual_seed(0)
    fc = build_model(tiny_cnn_config(), 3).roi_heads.stages[0].head.fc
    bound = (3 / fc.weight.shape[1]) ** 0.5
    assert float(fc.weight.abs().max()) <= bound and float(fc.weight.abs().max()) > 0.99 * bound
    assert float(fc.bias.abs().max()) == 0.0


def test_background_only_batch_has_finite_losses():
    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(use_federated=True, federated_num_classes=2), 3, [1, 2, 3])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses = model(torch.rand(2, 3, 64, 64) * 255, [(64, 64), (64, 64)], [empty, dict(empty)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert losses["mask"].item() == 0.0 and losses["box_stage0"].item() == 0.0


def test_bad_targets_are_input_errors(data):
    images, targets = data
    model = build_model(tiny_cnn_config(), 3)
    bad = dict(targets[0], boxes=targets[0]["boxes"].clone())
    bad["boxes"][0, 2] = bad["boxes"][0, 0]
    with pytest.raises(InputError, match="degenerate"):
        model(images[:1], [(SIZE, SIZE)], [bad])
    with pytest.raises(InputError, match="labels"):
        model(images[:1], [(SIZE, SIZE)], [dict(targets[0], labels=targets[0]["labels"] + 5)])
    with pytest.raises(InputError, match="class_targets"):
        model(images[:1], [(SIZE, SIZE)], [dict(targets[0], class_targets=torch.zeros(1, 2))])


# ---------------------------------------------------------------------- inference and results


THRESHOLD = 0.2


@pytest.fixture(scope="module")
def predictions(data):
    images, _ = data
    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(test_score_threshold=THRESHOLD, max_detections=50, rpn_post_nms_topk_test=20), 3)
    with torch.no_grad():  # class scores near 0.5, 0.27 and 0.05: the threshold keeps classes 0 and 1
        for stage in model.roi_heads.stages:
            stage.cls_score.bias[:3] = torch.tensor([0.0, -1.0, -3.0])
    sizes = [(SIZE, SIZE), (100, 120)]
    return model, model.predict(images, sizes), sizes


def test_predict_output_shapes(predictions):
    model, dets, sizes = predictions
    assert model.training  # predict restores the mode
    for det, (h, w) in zip(dets, sizes):
        n = len(det["scores"])
        assert 0 < n <= 50
        assert bool((det["scores"] > THRESHOLD).all()) and set(det["labels"].tolist()) == {0, 1}
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["probs"].shape == (n, 3)
        assert det["mask_probs"].shape == (n, 28, 28)
        assert bool((det["boxes"][:, 2] <= w).all()) and bool((det["boxes"][:, 3] <= h).all())
        assert bool((det["boxes"] >= 0).all())
        # the score is the (stage-averaged) probability of the predicted class, sorted
        assert torch.allclose(det["probs"][torch.arange(n), det["labels"]], det["scores"])
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        assert bool(((det["mask_probs"] >= 0) & (det["mask_probs"] <= 1)).all())


def test_to_results_pass_results_validation(predictions, data, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from slsd_cli.data.lvis import Annotations
    from slsd_cli.data.results import from_records

    _, dets, sizes = predictions
    _, targets = data
    gt = coco_gt(targets, SIZE)
    # the model saw the images at half their original size
    orig = [(2 * h, 2 * w) for h, w in sizes]
    for img, (h, w) in zip(gt["images"], orig):
        img["height"], img["width"] = h, w
    category_ids = [c["id"] for c in gt["categories"]]
    results = []
    for i, (det, size) in enumerate(zip(dets, orig)):
        results += to_results(det, i + 1, category_ids, 0.5, size, with_probs=True)
    assert len(results) == sum(len(d["scores"]) for d in dets)
    json.dumps(results)  # json-ready
    annotations = Annotations(path=Path("gt.json"), data=gt, protocol="coco")
    assert len(from_records(results, annotations, "detections.json")) == len(results)  # the results validation
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    loaded = coco.loadRes([{k: v for k, v in r.items() if k != "probs"} for r in results])
    assert len(loaded.anns) == len(results)
    first = results[0]
    h, w = orig[0]
    x, y, bw, bh = first["bbox"]
    assert 0 <= x and x + bw <= w + 1e-3 and 0 <= y and y + bh <= h + 1e-3
    assert torch.allclose(torch.tensor(first["bbox"]), torch.tensor(
        [*(dets[0]["boxes"][0, :2] * 2).tolist(), *((dets[0]["boxes"][0, 2:] - dets[0]["boxes"][0, :2]) * 2).tolist()]),
        atol=1e-3)
    assert len(first["probs"]) == 3 and first["category_id"] == category_ids[int(dets[0]["labels"][0])]
    assert mask_utils.decode(first["segmentation"]).shape == (h, w)
    # a known mask: the left half of a box on a model input seen at half size; in the original
    # image the box is [8, 12, 48, 60], and the half-mask covers its columns 8..27, rows 12..59.
    # A ramp (column j holds j / 27) in a box of 28 original pixels [8, 12, 36, 40]: pixel 8 + j
    # takes j / 27, so the mask (> 0.5) is columns 22..35
    half = torch.cat([torch.ones(28, 14), torch.zeros(28, 14)], 1)
    ramp = (torch.arange(28.0) / 27).expand(28, 28)
    known = {"boxes": torch.tensor([[4.0, 6.0, 24.0, 30.0], [4.0, 6.0, 18.0, 20.0]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([2, 0]), "mask_probs": torch.stack([half, ramp])}
    record, ramped = to_results(known, 5, category_ids, 0.5, (70, 64))
    assert record["bbox"] == [8.0, 12.0, 40.0, 48.0] and record["category_id"] == category_ids[2]
    expected = np.zeros((70, 64), dtype=np.uint8)
    expected[12:60, 8:28] = 1
    assert np.array_equal(mask_utils.decode(record["segmentation"]), expected)
    expected = np.zeros((70, 64), dtype=np.uint8)
    expected[12:40, 22:36] = 1
    assert np.array_equal(mask_utils.decode(ramped["segmentation"]), expected)


def test_paste_masks_fills_the_box():
    masks = torch.ones(2, 28, 28)
    masks[1, :, 14:] = 0  # left half only
    out = paste_masks(masks, torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 40.0, 40.0]]), 64, 64)
    assert out.shape == (2, 64, 64)
    inside = out[0, 21:59, 11:29]
    assert bool((inside > 0.99).all())
    # above 0.5: exactly the box's pixels (rows 20..59, columns 10..29), and the left half of the
    # second box (columns 0..19 of rows 0..39); one pixel more or less fails
    box, half = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    box[20:60, 10:30] = True
    half[:40, :20] = True
    assert torch.equal(out[0] > 0.5, box) and torch.equal(out[1] > 0.5, half)
    assert out[0][~box].sum() == 0 and out[1, 40:].sum() == 0 and out[1, :, 21:].sum() == 0
    # the values: a ramp over the 28 columns (column j holds j / 27) pasted into a 28-pixel-wide box
    # gives pixel 8 + j the value j / 27; into a 56-pixel-wide box, pixel c samples column c / 2 - 0.25
    ramp = (torch.arange(28.0) / 27).expand(28, 28)[None].expand(2, 28, 28)
    out = paste_masks(ramp, torch.tensor([[8.0, 0.0, 36.0, 28.0], [0.0, 0.0, 56.0, 28.0]]), 28, 64)
    torch.testing.assert_close(out[0, 5, 8:36], torch.arange(28.0) / 27, atol=1e-6, rtol=0)
    interior = torch.arange(1, 55)
    torch.testing.assert_close(out[1, 5, 1:55], (interior / 2 - 0.25) / 27, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- weights


def test_save_load_round_trip_and_refusals(tmp_path, data):
    images, _ = data
    cfg = tiny_cnn_config(test_score_threshold=0.0, max_detections=20)
    cats = categories(3)
    torch.manual_seed(0)
    model = build_detector(cfg, cats).eval()
    run = tmp_path / "run"
    save_detector(model, run, cats, cfg, extra={"iteration": 7})
    assert (run / "model.safetensors").is_file() and (run / "model.json").is_file()
    loaded, meta = load_detector(run)
    assert meta["extra"] == {"iteration": 7} and [c["id"] for c in meta["categories"]] == [10, 11, 12]
    assert not loaded.training
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
    a, b = model.predict(images, [(SIZE, SIZE)] * 2), loaded.predict(images, [(SIZE, SIZE)] * 2)
    assert torch.equal(a[0]["boxes"], b[0]["boxes"]) and torch.equal(a[1]["probs"], b[1]["probs"])
    load_detector(run / "model.safetensors", categories=cats)  # the same categories: fine

    with pytest.raises(InputError, match="categories differ"):
        load_detector(run, categories=categories(4))
    with pytest.raises(InputError, match="categories differ"):
        load_detector(run, categories=[dict(c, id=c["id"] + 1) for c in cats])
    # a description that disagrees with the tensors: more classes -> shape mismatch
    meta_path = run / "model.json"
    meta4 = json.loads(meta_path.read_text())
    meta4["categories"] = categories(4)
    meta4["num_classes"] = 4
    meta_path.write_text(json.dumps(meta4))
    with pytest.raises(InputError, match="disagree|shape"):
        load_detector(run)
    # same categories, another width -> shape mismatch named in the message
    other_run = tmp_path / "other"
    save_detector(model, other_run, cats, cfg)
    meta_w = json.loads((other_run / "model.json").read_text())
    meta_w["model"]["box_head_fc_dim"] = 128
    (other_run / "model.json").write_text(json.dumps(meta_w))
    with pytest.raises(InputError, match="shape"):
        load_detector(other_run)
    # another architecture -> missing / unexpected tensors
    meta_w["model"] = to_dict(tiny_eva_config())
    (other_run / "model.json").write_text(json.dumps(meta_w))
    with pytest.raises(InputError, match="missing|unexpected"):
        load_detector(other_run)
    with pytest.raises(InputError):
        load_detector(tmp_path / "nowhere")


# ---------------------------------------------------------------------- optimiser support


def test_layer_ids_and_param_groups():
    model = build_model(tiny_eva_config(), 3)
    ids, num_layers = model.layer_ids()
    assert num_layers == 4
    assert ids["backbone.trunk.patch_embed.proj.weight"] == 0 and ids["backbone.trunk.pos_embed"] == 0
    assert ids["backbone.trunk.blocks.0.norm1.weight"] == 1 and ids["backbone.trunk.blocks.3.mlp.fc2.weight"] == 4
    assert ids["backbone.pyramid.outputs.0.1.weight"] == 5 and ids["roi_heads.stages.2.cls_score.weight"] == 5
    from slsd_cli.engine.optim import param_groups

    groups = param_groups(model, weight_decay=0.1, layer_decay=0.8)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    by_name = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = by_name[id(p)]
            assert g["lr_scale"] == pytest.approx(0.8 ** (num_layers + 1 - ids[name]))
            if "norm" in name or name.endswith("pos_embed"):
                assert g["weight_decay"] == 0.0, name
    cnn_ids, cnn_layers = build_model(tiny_cnn_config(), 3).layer_ids()
    assert cnn_layers == 4 and cnn_ids["backbone.trunk.conv1.weight"] == 0
    assert cnn_ids["backbone.trunk.layer4.0.conv1.weight"] == 4 and cnn_ids["rpn.head.objectness.weight"] == 5


def test_backbone_feature_map(data):
    images, _ = data
    for cfg, dim, stride in ((tiny_cnn_config(), 512, 32), (tiny_eva_config(), 64, 16)):
        model = build_model(cfg, 3).eval()
        with torch.no_grad():
            fmap, s = model.backbone_feature_map(images)
        assert s == stride and fmap.shape == (2, dim, SIZE // stride, SIZE // stride)


def test_window_key_mask_is_switchable_for_padded_windows():
    """A grid that is not a multiple of the window (6 x 6 tokens, window 4): with the mask, padded keys
    are ignored; without it (detectron2 / EVA-02), the zero padding takes part in attention. On a grid
    the windows tile exactly both give the same output."""
    torch.manual_seed(0)
    masked = EVA02ViT(tiny_eva_config(image_size=96, drop_path=0.0)).eval()
    plain = EVA02ViT(tiny_eva_config(image_size=96, drop_path=0.0, window_key_mask=False)).eval()
    plain.load_state_dict(masked.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert not torch.allclose(masked(x), plain(x), atol=1e-4)
        tiled = torch.randn(1, 3, 128, 128)
        assert torch.allclose(masked(tiled), plain(tiled), atol=1e-6)
