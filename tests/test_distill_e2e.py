"""`slsd distill` end to end on a tiny synthetic set: finite losses and pseudo-label logs, the run
directory (student + EMA teacher), exact resume, and a 2-process torchrun run that computes what
one process computes.

The teacher is a random-init tiny detector whose classifier bias favours class 0, so the real
`predict` -> pseudo-label -> student path runs with pseudo-labels on every image (a trained
teacher would take minutes to make)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.io import load_safetensors

FAST = ["data.image_size=64", "model.image_size=64", "model.max_detections=3", "model.rpn_post_nms_topk_train=64",
        "model.rpn_post_nms_topk_test=64", "model.rois_per_image=32", "model.fpn_channels=32",
        "model.box_head_fc_dim=128", "model.mask_head_channels=32"]
LOOP = ["train.micro_batch=1", "train.schedule=constant", "train.warmup_iters=0", "train.log_every=1", "train.checkpoint_every=2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two spinning OpenMP threads per run slow everything down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from slsd_cli import recipe as recipes
    from slsd_cli.config import to_dict
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.data.synthetic import generate
    from slsd_cli.model.weights import build_detector, save_detector

    root = tmp_path_factory.mktemp("distill")
    generate(root / "synth", classes=3, train_images=255, val_images=5, pool_images=8, image_size=64, seed=0)
    train_json = root / "synth" / "train.json"
    recipe = recipes.load("synthetic_tiny_distill", FAST + [f"data.train_json={train_json}"])
    annotations = load_annotations(train_json)
    torch.manual_seed(0)
    teacher = build_detector(recipe.model, annotations.categories)
    with torch.no_grad():  # a confident teacher: class 0 everywhere
        for stage in teacher.roi_heads.stages:
            stage.cls_score.bias[0] = 3.0
    save_detector(teacher, root / "teacher", annotations.categories, recipe.model,
                  extra={"phase": "teacher", "recipe": to_dict(recipe)})
    ids = [c["id"] for c in annotations.categories]
    calibration = root / "calibration.json"  # the fields `slsd calibrate` writes that distill reads
    calibration.write_text(json.dumps({"per_class": {str(ids[0]): {"delta": -0.2}, str(ids[1]): {"delta": 0.05},
                                                     str(ids[2]): {"delta": 0.1}}}))
    return {"root": root, "teacher": root / "teacher", "pool": root / "synth" / "pool.json",
            "calibration": calibration}


def _args(setup, out: Path, *extra: str) -> list[str]:
    return ["distill", "synthetic_tiny_distill", *FAST, *LOOP, *extra, "--teacher", str(setup["teacher"]),
            "--unlabeled", str(setup["pool"]), "--calibration", str(setup["calibration"]), "--lambda", "2",
            "--out-dir", str(out)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


@pytest.fixture(scope="module")
def straight(setup):
    """4 iterations in one go (batch 2 + 2)."""
    out = setup["root"] / "straight"
    assert main(_args(setup, out, "train.iterations=4", "train.batch_per_process=2")) == 0
    return out


def test_distill_runs_with_finite_losses_and_logs(setup, straight):
    records = _metrics(straight)
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and all(math.isfinite(v) for v in r["losses"].values())
        assert {"rpn_cls", "cls_stage2", "box_stage0", "mask"} <= set(r["losses"])
        # the teacher's top-3 detections are all confident class-0 boxes
        assert r["pl_per_image"] == 3.0 and r["pl_empty_images"] == 0.0
        group0 = json.loads((setup["teacher"] / "model.json").read_text())["categories"][0]["frequency"]
        assert r[f"pl_per_image_{group0}"] == 3.0
        assert 0.5 < r["pl_confidence"] <= 1.0
        assert r["ema_decay"] == 0.99
    assert records[-1]["ema_updates"] == 4

    from slsd_cli.model.weights import load_detector

    student, meta = load_detector(straight)
    ema_teacher, teacher_meta = load_detector(straight / "teacher")
    assert meta["extra"]["phase"] == "student" and teacher_meta["extra"]["phase"] == "ema_teacher"
    initial = _weights(setup["teacher"] / "model.safetensors")
    s, t = _weights(straight / "model.safetensors"), _weights(straight / "teacher" / "model.safetensors")
    name = "roi_heads.stages.0.cls_score.weight"
    # the student moved away from the teacher run's weights; the EMA teacher moved less (decay 0.99)
    student_step = (s[name] - initial[name]).norm()
    teacher_step = (t[name] - initial[name]).norm()
    assert student_step > 0 and 0 < teacher_step < student_step


def test_resume_is_exact(setup, straight):
    out = setup["root"] / "resumed"
    assert main(_args(setup, out, "train.iterations=2", "train.batch_per_process=2")) == 0
    assert main(_args(setup, out, "train.iterations=4", "train.batch_per_process=2") + ["--resume"]) == 0
    for rel in ("model.safetensors", "teacher/model.safetensors"):
        a, b = _weights(straight / rel), _weights(out / rel)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{rel}: {key} differs after resume"
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(straight)]


def test_existing_run_needs_force_or_resume(setup, straight):
    assert main(_args(setup, straight, "train.iterations=1")) == 2


def test_two_process_torchrun_matches_one_process(setup, straight):
    out = setup["root"] / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "slsd_cli.cli", *_args(setup, out, "train.iterations=2", "train.batch_per_process=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "teacher" / "model.safetensors").is_file()
    # 2 processes x (1 + 1) images = 1 process x (2 + 2) images: same samples, same model seeds
    ddp, single = _metrics(out), _metrics(straight)[:2]
    for a, b in zip(ddp, single):
        assert a["pl_per_image"] == b["pl_per_image"]
        for key in b["losses"]:
            assert a["losses"][key] == pytest.approx(b["losses"][key], rel=1e-4, abs=1e-5), key
