"""`slsd prototypes` (Eq. 1): batched RoIAlign embeddings against a per-instance reference, weights
loading, torchrun sharding, detector checkpoints, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from slsd_cli.model import timm_models
from slsd_cli.data.images import load_image
from slsd_cli.data.lvis import annotation_mask, load_annotations
from slsd_cli.data.synthetic import generate
from slsd_cli.labels import prototypes as protos
from slsd_cli.labels.smoothing import cosine_similarity, load_prototypes
from tests.helpers.cli import run_cli

IMAGE_SIZE = 64
LEVEL = 2  # resnet18 stride-8 stage: an 8 x 8 map at 64 px


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, classes=6, train_images=255, val_images=12, pool_images=1, image_size=IMAGE_SIZE, seed=0)
    return out


@pytest.fixture(scope="module")
def val(synth):
    return load_annotations(synth / "val.json")


def _instances(ann) -> list[int]:
    """Instances per class counted from the annotations (synth categories carry training counts)."""
    counts = [0] * ann.num_classes
    for a in ann.annotations:
        counts[ann.category_index[a["category_id"]]] += 1
    return counts


def _extractor(seed: int = 0):
    torch.manual_seed(seed)
    return protos.timm_extractor("resnet18", random_init=True, feature_level=LEVEL, image_size=IMAGE_SIZE)


def _reference(extractor, ann, images_dir: Path, mask_weighted: bool, pool: int = 7) -> torch.Tensor:
    """One image through the backbone at a time, one RoIAlign per instance."""
    sums = torch.zeros(ann.num_classes, extractor.dim, dtype=torch.float64)
    counts = torch.zeros(ann.num_classes)
    with torch.inference_mode():
        for image_id in sorted(ann.anns_by_image):
            record = ann.images[image_id]
            image = load_image(ann.image_file(image_id, images_dir))
            resized, (h, w) = protos.resize_longest(image, IMAGE_SIZE)
            canvas = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
            canvas[0, :, :h, :w] = resized
            features, stride = extractor.forward(canvas, [(h, w)])
            sx, sy = w / record["width"], h / record["height"]
            for a in ann.anns_by_image[image_id]:
                x, y, bw, bh = a["bbox"]
                box = torch.tensor([[0.0, x * sx, y * sy, (x + bw) * sx, (y + bh) * sy]])
                cell = roi_align(features, box, output_size=pool, spatial_scale=1 / stride, sampling_ratio=2,
                                 aligned=True)[0]
                if mask_weighted:
                    mask = torch.from_numpy(annotation_mask(a, record["height"], record["width"])).float()
                    weight = roi_align(mask[None, None], torch.tensor([[0.0, x, y, x + bw, y + bh]]),
                                       output_size=pool, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0, 0]
                    emb = (cell * weight).sum((1, 2)) / weight.sum()
                else:
                    emb = cell.mean((1, 2))
                c = ann.category_index[a["category_id"]]
                sums[c] += emb.double()
                counts[c] += 1
    return sums / counts.clamp(min=1)[:, None]


def test_batched_roi_align_equals_per_instance_reference(synth, val):
    extractor = _extractor()
    results = {}
    for mask_weighted in (False, True):
        result = protos.compute_prototypes(extractor, val, synth / "images", image_size=IMAGE_SIZE, batch_size=5,
                                           mask_weighted=mask_weighted)
        expected = _reference(extractor, val, synth / "images", mask_weighted)
        assert result["counts"].tolist() == _instances(val)
        assert result["prototypes"].shape == (6, extractor.dim)
        scale = expected.abs().max().item()
        assert scale > 0
        assert torch.allclose(result["prototypes"], expected, atol=1e-5 * max(scale, 1.0), rtol=1e-5)
        assert torch.allclose(result["similarity"], cosine_similarity(expected), atol=1e-6)
        results[mask_weighted] = result["prototypes"]
    assert not torch.allclose(results[False], results[True], atol=1e-4)  # the mask weighting matters


def test_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    full = timm.create_model("resnet18").eval()
    save_file(full.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": full.state_dict()}, tmp_path / "w.pth")
    x = torch.rand(2, 3, 64, 64) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        expected = full.forward_features((x - mean) / std)
        for name in ("w.safetensors", "w.pth"):
            torch.manual_seed(99)  # weights must come from the file, not the seed
            extractor = protos.timm_extractor("resnet18", weights=tmp_path / name, image_size=64)
            features, stride = extractor.forward(x, [(64, 64), (64, 64)])
            assert stride == 32 and extractor.metadata["weights"].startswith("file:")
            assert torch.allclose(features, expected, atol=1e-5)
    bad = {k: v for k, v in full.state_dict().items() if not k.startswith("layer4")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(protos.InputError, match="missing from the weights file"):
        protos.timm_extractor("resnet18", weights=tmp_path / "bad.safetensors", image_size=64)


def test_vit_backbone_at_image_size():
    torch.manual_seed(0)
    extractor = protos.timm_extractor("vit_tiny_patch16_224", random_init=True, image_size=64)
    features, stride = extractor.forward(torch.rand(1, 3, 64, 64) * 255, [(64, 48)])
    assert stride == 16 and tuple(features.shape) == (1, 192, 4, 4)


def test_torchrun_two_processes_equal_one(synth, tmp_path, capsys):
    common = ["--annotations", str(synth / "val.json"), "--images", str(synth / "images"), "--backbone", "resnet18",
              "--random-init", "--feature-level", str(LEVEL), "--image-size", str(IMAGE_SIZE), "--batch-size", "4",
              "--seed", "5"]
    one = tmp_path / "one.safetensors"
    code, err = run_cli(["prototypes", *common, "--out", str(one)], capsys)
    assert code == 0, err
    two = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", "slsd", "prototypes",
                           *common, "--out", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_prototypes(one), load_prototypes(two)
    assert torch.equal(a["counts"], b["counts"]) and a["category_ids"] == b["category_ids"]
    assert int(a["counts"].sum()) == len(json.loads((synth / "val.json").read_text())["annotations"])
    assert torch.allclose(a["prototypes"], b["prototypes"], atol=1e-6, rtol=1e-6)
    assert torch.allclose(a["similarity"], b["similarity"], atol=1e-6)
    assert b["metadata"]["world_size"] == "2" and a["metadata"]["world_size"] == "1"


def test_detector_checkpoint_backbone(synth, tmp_path, capsys):
    from slsd_cli.model import weights
    from slsd_cli.model.model_config import tiny_cnn_config

    ann = load_annotations(synth / "val.json")
    torch.manual_seed(0)
    cfg = tiny_cnn_config()
    model = weights.build_detector(cfg, ann.categories)
    weights.save_detector(model, tmp_path / "run", ann.categories, cfg)
    out = tmp_path / "p.safetensors"
    code, err = run_cli(["prototypes", "--annotations", str(synth / "val.json"), "--images", str(synth / "images"),
                         "--checkpoint", str(tmp_path / "run"), "--image-size", str(IMAGE_SIZE), "--out", str(out)],
                        capsys)
    assert code == 0, err
    loaded = load_prototypes(out, ann)
    assert loaded["prototypes"].shape == (ann.num_classes, 512)
    assert loaded["counts"].tolist() == _instances(ann)
    assert loaded["metadata"]["backbone"].startswith("checkpoint:")
    # the same numbers as the library with the detector's own feature map, image by image
    model.eval()
    extractor = protos.checkpoint_extractor(tmp_path / "run")
    expected = _reference(extractor, ann, synth / "images", mask_weighted=False)
    assert torch.allclose(loaded["prototypes"].double(), expected, atol=1e-5, rtol=1e-4)


def test_bad_input_exits_2_with_one_line(synth, tmp_path, capsys, monkeypatch):
    base = ["prototypes", "--annotations", str(synth / "val.json"), "--images", str(synth / "images"),
            "--image-size", "32"]
    out = tmp_path / "p.safetensors"
    cases = [
        (["--backbone", "resnet18", "--checkpoint", str(tmp_path), "--out", str(out)], "exactly one of"),
        (["--out", str(out)], "exactly one of"),
        (["--backbone", "no_such_net_v9", "--random-init", "--out", str(out)], "unknown timm model"),
        (["--backbone", "resnet18", "--weights", str(tmp_path / "missing.pth"), "--out", str(out)], "not found"),
        (["--backbone", "resnet18", "--random-init", "--feature-level", "9", "--out", str(out)], "feature level"),
        (["--checkpoint", str(tmp_path / "nothing"), "--out", str(out)], "model.safetensors"),
    ]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(timm_models, "online", lambda *a, **k: False)
    cases.append((["--backbone", "resnet18", "--out", str(out)], "no network"))
    for extra, message in cases:
        code, err = run_cli(base + extra, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
    assert not out.exists()

    # an image the annotations name but the folder lacks
    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    data = json.loads((synth / "val.json").read_text())
    victim = data["images"][-1]["file_name"]
    (images / victim).unlink()
    code, err = run_cli(["prototypes", "--annotations", str(synth / "val.json"), "--images", str(images), "--backbone",
                         "resnet18", "--random-init", "--image-size", "32", "--out", str(out)], capsys)
    assert code == 2 and victim in err and "not found" in err and len(err.splitlines()) == 1, err
    assert not out.exists()

    out.write_bytes(b"x")
    code, err = run_cli(base + ["--backbone", "resnet18", "--random-init", "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
