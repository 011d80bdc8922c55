"""Tensor files whose metadata promises more than they hold (issue 24): refused in one line naming
the file and the tensor or key, before anything is allocated or built.

- a torch file tensor that is a stride-0 or overlapping view of a small storage (a 4-byte file can
  describe a 10^6 x 10^6 float tensor: copying it would take 4 TB);
- a safetensors header whose shape and dtype disagree with its bytes;
- a model.json whose dimensions disagree with its weights (a width that would build a 36 TB model)."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.errors import InputError
from slsd_cli.io import load_torch_file
from slsd_cli.model import build_detector, load_detector, save_detector, tiny_eva_config
from slsd_cli.model.convert_detectron2 import read_checkpoint

CATEGORIES = [{"id": 1, "name": "a", "image_count": 2}, {"id": 2, "name": "b", "image_count": 5}]


@pytest.mark.parametrize("view, stored", [
    (lambda: torch.zeros(1).expand(10 ** 6, 10 ** 6), 1),                 # stride 0: 4 TB from 4 bytes
    (lambda: torch.zeros(100).as_strided((50, 50), (1, 1)), 100),         # overlapping rows
])
def test_a_view_larger_than_its_storage_is_refused_without_allocating(tmp_path, view, stored):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"backbone.net.pos_embed": view(), "ok": torch.ones(3)}}, path)
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        load_torch_file(path)
    assert time.perf_counter() - start < 5  # nothing was materialised
    line = err.value.format()
    assert str(path) in line and "'model.backbone.net.pos_embed'" in line and f"stored {stored} elements" in line
    with pytest.raises(InputError, match="model.backbone.net.pos_embed"):
        read_checkpoint(path)  # slsd convert's reader goes through it


def test_views_within_their_storage_load(tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "ok.pth"
    torch.save({"slice": base[2:5], "t": base.view(3, 4).t(), "shared": [base, base[:6]], "empty": torch.zeros(0, 5)}, path)
    loaded = load_torch_file(path)
    assert torch.equal(loaded["t"], base.view(3, 4).t()) and torch.equal(loaded["slice"], base[2:5])


def test_a_safetensors_header_promising_more_than_its_bytes_is_one_line(tmp_path, capsys):
    header = json.dumps({"backbone.net.pos_embed": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6],
                                                    "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    capsys.readouterr()
    assert main(["convert", str(path), "--annotations", str(ann), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "safetensors" in err


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cfg = tiny_eva_config(vit_depth=1, global_blocks=[0])
    run = tmp_path_factory.mktemp("limits") / "run"
    save_detector(build_detector(cfg, CATEGORIES), run, CATEGORIES, cfg)
    return run


@pytest.mark.parametrize("key, value, tensor", [
    ("vit_embed_dim", 3_000_000, "backbone.trunk.pos_embed"),   # one block 3e6 wide: > 100 TB of weights
    ("fpn_channels", 1_000_000, "backbone.pyramid.outputs.0.0.weight"),
    ("box_head_fc_dim", 65, "roi_heads.stages.0.head.fc.weight"),
])
def test_model_json_dimensions_are_checked_against_the_weights_before_building(saved_run, tmp_path, key, value,
                                                                               tensor):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((saved_run / name).read_bytes())
    meta = json.loads((run / "model.json").read_text())
    meta["model"][key] = value
    (run / "model.json").write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        load_detector(run)
    assert time.perf_counter() - start < 10  # a skeleton on the meta device, nothing allocated
    line = err.value.format()
    assert str(run / "model.safetensors") in line and "model.json" in line and tensor in line
