"""Embedders of `slsd retrieve`: colour histogram, timm (random init / weights file), slsd checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slsd_cli.errors import InputError
from slsd_cli.io import save_safetensors_atomic
from slsd_cli.retrieval.embedders import ColorHistEmbedder, TimmEmbedder, build_embedder


def _solid(rgb, size=32) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()


def test_colorhist_separates_hues_and_ignores_greys():
    emb = build_embedder("colorhist")
    assert isinstance(emb, ColorHistEmbedder) and emb.dim == 108 and emb.input_size == (64, 64)
    red, dark_red, blue = _solid([220, 30, 30]), _solid([200, 20, 25]), _solid([30, 40, 220])
    red_on_grey = _solid([128, 128, 128])
    red_on_grey[:, 8:16, 8:16] = red[:, :8, :8]
    grey = _solid([90, 90, 90])
    v = emb(torch.stack([red, dark_red, blue, red_on_grey, grey]))
    assert torch.allclose(v.norm(dim=1), torch.ones(5))
    sim = v @ v.T
    assert sim[0, 1] > 0.9 and sim[0, 2] < 0.1
    assert sim[0, 3] > 0.99  # a red patch on grey: the grey pixels have no chroma, so no weight
    assert torch.isfinite(v[4]).all()  # all grey: a defined vector, no NaN
    assert torch.equal(emb(torch.stack([red, blue])), emb(torch.stack([red, blue])))


def test_timm_random_init_is_seeded_and_weights_file_reproduces_it(tmp_path):
    a = TimmEmbedder("test_vit", random_init=True, image_size=32, seed=3)
    b = TimmEmbedder("test_vit", random_init=True, image_size=32, seed=3)
    c = TimmEmbedder("test_vit", random_init=True, image_size=32, seed=4)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a(images), b(images)) and not torch.allclose(a(images), c(images))
    assert a.input_size == (32, 32) and a(images).shape == (2, a.dim)
    weights = tmp_path / "vit.safetensors"
    save_safetensors_atomic(a.model.state_dict(), weights)
    d = build_embedder("test_vit", weights=weights, image_size=32)
    assert torch.allclose(d(images), a(images), atol=1e-6)
    assert "weights:" in d.fingerprint and d.fingerprint != a.fingerprint
    state = a.model.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_safetensors_atomic(state, bad)
    with pytest.raises(InputError, match="bad.safetensors"):
        build_embedder("test_vit", weights=bad, image_size=32)
    with pytest.raises(InputError, match="unknown embedder"):
        build_embedder("no_such_model_abc", random_init=True)
    with pytest.raises(InputError, match="exclude"):
        build_embedder("test_vit", weights=weights, random_init=True)


def test_slsd_checkpoint_backbone_is_average_pooled(tmp_path):
    from slsd_cli.model import weights
    from slsd_cli.model.model_config import tiny_cnn_config

    categories = [{"id": 1, "name": "a", "image_count": 3}, {"id": 2, "name": "b", "image_count": 1}]
    torch.manual_seed(0)
    cfg = tiny_cnn_config()
    model = weights.build_detector(cfg, categories)
    weights.save_detector(model, tmp_path / "run", categories, cfg)
    emb = build_embedder(f"slsd:{tmp_path / 'run'}", image_size=64)
    assert emb.input_size == (64, 64) and emb.dim == 512
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.inference_mode():
        features, _ = model.backbone_feature_map(images.float())
    expected = torch.nn.functional.normalize(features.mean(dim=(2, 3)), dim=1)
    assert torch.allclose(emb(images), expected, atol=1e-5)
    assert emb.fingerprint.startswith("slsd:")
    with pytest.raises(InputError):
        build_embedder(f"slsd:{tmp_path / 'missing'}")
    np.testing.assert_equal(emb(images).numpy(), emb(images).numpy())
