"""The demo runs the whole pipeline end to end (at a reduced size) and reports every row."""

from __future__ import annotations

import json

import pytest
import torch

from slsd_cli.demo import STUDENTS, TEACHERS, DemoSize, parse_seeds, run_demo
from slsd_cli.errors import InputError

TINY = DemoSize(classes=10, train_images=255, val_images=12, pool_images=24, image_size=64,
                teacher_iterations=2, distill_iterations=2, retrieve_k=2)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores; one thread is faster under contention
    try:
        out = tmp_path_factory.mktemp("demo")
        report = run_demo(out, size=TINY)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_quick_demo_report_has_every_row(quick_demo):
    out, report = quick_demo
    text = report.read_text()
    for label in (TEACHERS["similarity"].label, STUDENTS["calibrated"].label):
        assert f"| {label} |" in text
    assert "Pseudo-labels per unlabeled image" in text
    assert "Seeds: 0" in text and "peak memory" in text
    for step in ("synth", "split", "prototypes", "retrieve", "teacher_similarity (seed 0)",
                 "calibrate teacher on held-out (seed 0)", "student_calibrated (seed 0)",
                 "eval teacher_similarity (seed 0)", "eval student_calibrated (seed 0)",
                 "plot reliability", "plot ap-vs-frequency", "plot predictions"):
        assert f"| {step} |" in text, step
    for figure in ("reliability", "ap_vs_frequency", "predictions"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    metrics = json.loads((out / "seed0" / "student_calibrated" / "eval_val" / "metrics.json").read_text())
    assert metrics["protocol"] == "lvis" and "APr" in metrics["segm"]


def test_rerun_skips_finished_steps(quick_demo):
    out, _ = quick_demo
    before = (out / "seed0" / "teacher_similarity" / "model.safetensors").stat().st_mtime_ns
    report = run_demo(out, size=TINY)
    text = report.read_text()
    assert text.count("| skipped |") >= 12
    assert (out / "seed0" / "teacher_similarity" / "model.safetensors").stat().st_mtime_ns == before


def test_parse_seeds():
    assert parse_seeds("0, 2,5") == [0, 2, 5]
    assert parse_seeds(None) is None
    with pytest.raises(InputError):
        parse_seeds("a,b")
