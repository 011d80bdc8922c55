"""slsd eval --checkpoint: sharded inference (per-rank shard files merged by rank 0), the same
metrics from 1 and 2 torchrun processes, student/teacher selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.io import write_png

from slsd_cli.inference import sharded as inference
from slsd_cli.cli import main
from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError
from slsd_cli.run_dir import resolve_model

CATEGORIES = [{"id": 2, "name": "a", "frequency": "r"}, {"id": 5, "name": "b", "frequency": "c"},
              {"id": 8, "name": "c", "frequency": "f"}]
SIZES = [(48, 64), (64, 56), (64, 64), (40, 60)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(SIZES):
        image_id = 10 + i
        pixels = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        write_png(pixels, str(root / "images" / f"{image_id}.png"))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w,
                       "neg_category_ids": [8] if i % 2 else [], "not_exhaustive_category_ids": []})
        for k in range(2):
            x, y, bw, bh = 4.0 + 20 * k, 6.0, 14.0, 16.0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORIES[(i + k) % 3]["id"],
                         "bbox": [x, y, bw, bh], "area": bw * bh,
                         "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    path = root / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def _save_model(out_dir: Path, seed: int) -> None:
    from slsd_cli.model.model_config import tiny_cnn_config
    from slsd_cli.model.weights import build_detector, save_detector

    torch.manual_seed(seed)
    cfg = tiny_cnn_config(image_size=64, test_score_threshold=0.0, max_detections=25,
                          rpn_pre_nms_topk_test=64, rpn_post_nms_topk_test=32)
    save_detector(build_detector(cfg, CATEGORIES), out_dir, CATEGORIES, cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalinf")
    gt = _write_dataset(root)
    run = root / "run"
    _save_model(run, seed=0)               # the distillation run's student (its default export)
    _save_model(run / "teacher", seed=1)   # and its teacher
    return root, gt, run


@pytest.fixture(scope="module")
def single_process(setup):
    root, gt, run = setup
    out = root / "one"  # one thread (the module's): as each torchrun worker, the same float reductions
    assert main(["eval", "--annotations", str(gt), "--checkpoint", str(run), "--images", str(root / "images"),
                 "--out-dir", str(out), "--max-dets", "20", "--batch-size", "1"]) == 0
    return out


def _load(out: Path) -> tuple[dict, list]:
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, json.loads((out / "detections.json").read_text())


def test_checkpoint_eval_writes_results(single_process, setup):
    metrics, dets = _load(single_process)
    assert metrics["num_detections"] == len(dets) > 0
    assert set(metrics) >= {"bbox", "segm", "protocol", "num_images"} and metrics["protocol"] == "lvis"
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        assert isinstance(d["segmentation"]["counts"], str)
    assert max(per_image.values()) <= 20
    # results come out in image order, as a single process would write them
    assert [d["image_id"] for d in dets] == sorted(d["image_id"] for d in dets)
    assert not list(single_process.glob("*.rank*"))  # shards removed


def test_two_processes_give_the_same_metrics(single_process, setup):
    root, gt, run = setup
    out = root / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           "slsd", "eval", "--annotations", str(gt), "--checkpoint", str(run), "--images", str(root / "images"),
           "--out-dir", str(out), "--max-dets", "20", "--batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stderr is a pipe: rank 0 alone prints the plain progress line of the finished inference
    assert proc.stderr.count("inference 4/4 (100%)") == 1, proc.stderr[-3000:]
    m1, d1 = _load(single_process)
    m2, d2 = _load(out)
    assert d1 == d2
    assert m1 == m2
    assert not list(out.glob("*.rank*"))


def test_teacher_is_selected_with_model_teacher(single_process, setup):
    root, gt, run = setup
    assert resolve_model(run, "student") == run
    assert resolve_model(run, "teacher") == run / "teacher"
    assert resolve_model(run / "teacher", "teacher") == run / "teacher"  # a teacher run
    with pytest.raises(InputError, match="teacher"):
        resolve_model(root / "images", "teacher")
    with pytest.raises(InputError):
        resolve_model(run, "ema")
    ann = load_annotations(gt)
    teacher = inference.predict_results(run, ann, root / "images", model_kind="teacher", max_dets=20, device="cpu")
    _, student = _load(single_process)
    assert len(teacher) > 0 and teacher != student
    assert {d["image_id"] for d in teacher} <= set(ann.images)


class _StubDetector(nn.Module):
    """Deterministic `predict`: detections derived from the image size, 7 per image, 2 classes."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(image_size=32)

    def predict(self, images, image_sizes, score_threshold=None, canvas=None):
        out = []
        for h, w in image_sizes:
            n = 7
            x1 = torch.arange(n, dtype=torch.float32)
            boxes = torch.stack([x1, x1, x1 + w / 2, x1 + h / 2], 1)
            scores = torch.linspace(0.9, 0.3, n)[torch.tensor([3, 0, 6, 1, 5, 2, 4])]
            probs = torch.stack([scores, 1 - scores], 1)
            out.append({"boxes": boxes, "scores": scores, "labels": torch.arange(n) % 2, "probs": probs,
                        "mask_probs": torch.ones(n, 28, 28)})
        return out


def test_predict_to_results_and_merge_with_a_stub(setup, tmp_path):
    root, gt, _ = setup
    ann = load_annotations(gt)
    out = inference.predict_to_results(_StubDetector(), ann, root / "images", tmp_path / "d.json", image_size=32,
                                       batch_size=3, max_dets=4, with_probs=True, category_ids=[5, 8])
    dets = json.loads(out.read_text())
    assert len(dets) == 4 * len(SIZES)
    for image_id in ann.image_ids:
        mine = [d for d in dets if d["image_id"] == image_id]
        assert sorted((d["score"] for d in mine), reverse=True) == pytest.approx([0.9, 0.8, 0.7, 0.6])
        h, w = ann.images[image_id]["height"], ann.images[image_id]["width"]
        assert all(d["segmentation"]["size"] == [h, w] and len(d["probs"]) == 2 for d in mine)
        assert {d["category_id"] for d in mine} <= {5, 8}
    with pytest.raises(InputError, match="category id 99"):
        inference.predict_to_results(_StubDetector(), ann, root / "images", tmp_path / "e.json", image_size=32,
                                     category_ids=[5, 99])


def test_merge_shards_keeps_rank_order_and_removes_shards(tmp_path):
    out = tmp_path / "detections.json"
    for rank, records in enumerate([[{"a": 1}, {"a": 2}], [], [{"a": 3}]]):
        inference.shard_path(out, rank).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert inference.merge_shards(out, 3) == 3
    assert json.loads(out.read_text()) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert not list(tmp_path.glob("*.rank*"))
    with pytest.raises(InputError, match="shard"):
        inference.merge_shards(tmp_path / "x.json", 1)
