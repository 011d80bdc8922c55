"""`slsd plot`: every figure renders from small fixture files; bad input ends with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsd_cli import plots
from slsd_cli.cli import main
from slsd_cli.data.lvis import encode_mask, load_annotations

DPI = 40


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def assert_figure(png: Path, width_in: float, height_in: float, dpi: int = DPI) -> np.ndarray:
    assert png.is_file() and png.with_suffix(".pdf").is_file()
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    with Image.open(png) as im:
        assert im.size == (round(width_in * dpi), round(height_in * dpi))
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, "the figure is blank"
    return pixels


def calibration(ece: float, over: float) -> dict:
    bins = 10
    reliability = []
    for b in range(bins):
        conf = (b + 0.5) / bins
        reliability.append({"lower": b / bins, "upper": (b + 1) / bins, "count": 0 if b == 0 else 10 * b,
                            "accuracy": 0.0 if b == 0 else max(0.0, conf - over), "confidence": 0.0 if b == 0 else conf})
    return {"bins": bins, "iou": 0.5, "ece": ece, "reliability": reliability,
            "per_class": {"1": {"delta": -over, "count": 450, "bins": []}},
            "groups": {"r": {"ece": 0.3}, "c": {"ece": 0.2}, "f": {"ece": ece}}}


CATEGORIES = [
    {"id": 1, "name": "red_solid_circle", "frequency": "f", "image_count": 150, "instance_count": 300},
    {"id": 2, "name": "blue_striped_star", "frequency": "c", "image_count": 40, "instance_count": 55},
    {"id": 3, "name": "green_dotted_ring", "frequency": "r", "image_count": 3, "instance_count": 4},
    {"id": 4, "name": "cyan_solid_cross", "frequency": "r", "image_count": 0, "instance_count": 0},
]


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, Path]:
    """Two 48x40 images with two annotated objects each (RLE masks), LVIS layout."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id in (1, 2):
        pixels = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "width": 48, "height": 40,
                       "neg_category_ids": [3], "not_exhaustive_category_ids": []})
        for k, (x, y, w, h) in enumerate(((4, 5, 12, 10), (20, 14, 20, 18))):
            mask = np.zeros((40, 48), dtype=np.uint8)
            mask[y:y + h, x:x + w] = 1
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k + 1,
                         "bbox": [x, y, w, h], "area": w * h, "segmentation": encode_mask(mask), "iscrowd": 0})
    ann_path = write(tmp_path / "val.json", {"images": images, "annotations": anns, "categories": CATEGORIES})
    return ann_path, images_dir


def test_reliability(tmp_path):
    a = write(tmp_path / "teacher.json", calibration(0.22, 0.2))
    b = write(tmp_path / "student.json", calibration(0.07, 0.05))
    out = tmp_path / "fig3.png"
    assert main(["plot", "reliability", str(a), str(b), "--labels", "teacher,student", "--out", str(out),
                 "--dpi", str(DPI)]) == 0
    assert_figure(out, 2 * plots.PANEL_IN, 1.3 * plots.PANEL_IN)
    first = out.read_bytes()
    assert main(["plot", "reliability", str(a), str(b), "--out", str(out), "--dpi", str(DPI)]) == 2
    assert out.read_bytes() == first, "an existing figure is kept without --force"
    assert main(["plot", "reliability", str(a), str(b), "--labels", "teacher,student", "--out", str(out),
                 "--dpi", str(DPI), "--force"]) == 0
    assert out.read_bytes() == first, "same input, same PNG bytes"


def test_reliability_titles_carry_ece():
    fig = plots.reliability_figure([plots.Calibration(0.2188, *(np.ones(2) for _ in range(3)),
                                                      np.array([0.0, 0.5]), np.array([0.5, 1.0]), {})], ["teacher"])
    assert fig.axes[0].get_title().startswith("teacher: ECE 0.219")


def test_ap_vs_frequency(tmp_path, dataset):
    ann_path, _ = dataset
    per_class = {"1": 0.6, "2": 0.4, "3": 0.1, "4": -1}
    metrics = write(tmp_path / "metrics.json", {
        "protocol": "lvis",
        "segm": {"AP": 0.4, "APr": 0.1, "APc": 0.4, "APf": 0.6, "per_class": per_class},
        "bbox": {"AP": 0.45, "APr": 0.2, "APc": 0.4, "APf": 0.6, "per_class": {**per_class, "4": 0.05}}})
    for iou_type in ("segm", "bbox"):
        out = tmp_path / f"fig4_{iou_type}.png"
        assert main(["plot", "ap-vs-frequency", str(metrics), "--annotations", str(ann_path), "--iou-type", iou_type,
                     "--out", str(out), "--dpi", str(DPI)]) == 0
        assert_figure(out, 6.4, 4.4)
    annotations = load_annotations(ann_path)
    xs, ys, groups, skipped = plots.per_class_points(json.loads(metrics.read_text()), annotations, "segm", metrics)
    assert sorted(xs.tolist()) == [4, 55, 300] and skipped == 1 and sorted(groups) == ["c", "f", "r"]
    assert sorted(ys.tolist()) == [0.1, 0.4, 0.6]


def test_label_efficiency(tmp_path):
    files = []
    for method, bonus in (("one-hot", 0.0), ("similarity smoothing", 0.05)):
        for fraction, ap in ((0.01, 0.1), (0.1, 0.25), (1.0, 0.4)):
            files.append(write(tmp_path / f"m_{len(files)}.json", {
                "protocol": "lvis", "method": method, "labeled_fraction": fraction,
                "segm": {"AP": ap + bonus, "APr": -1 if fraction == 0.01 else ap / 2 + bonus, "per_class": {}}}))
    out = tmp_path / "fig2.png"
    assert main(["plot", "label-efficiency", *map(str, files), "--out", str(out), "--dpi", str(DPI)]) == 0
    assert_figure(out, 2 * plots.PANEL_IN + 1.6, plots.PANEL_IN)
    runs = plots.label_efficiency_runs(files[:2], methods=["a", "b"], fractions=[0.5, 0.5])
    assert [(r.method, r.fraction, r.ap) for r in runs] == [("a", 0.5, 0.1), ("b", 0.5, 0.25)]
    assert runs[0].apr is None  # -1: undefined, drawn as a gap
    out2 = tmp_path / "fig2b"
    assert main(["plot", "label-efficiency", *map(str, files[:2]), "--methods", "a,b", "--fractions", "0.05,0.2",
                 "--out", str(out2), "--dpi", str(DPI)]) == 0
    assert_figure(tmp_path / "fig2b.png", 2 * plots.PANEL_IN + 1.6, plots.PANEL_IN)


def test_predictions(tmp_path, dataset):
    ann_path, images_dir = dataset
    anns = json.loads(ann_path.read_text())["annotations"]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": 0.9 - 0.1 * i} for i, a in enumerate(anns)]
    dets.append({"image_id": 2, "category_id": 3, "bbox": [30, 2, 10, 8], "score": 0.8})  # a box-only result
    det_path = write(tmp_path / "detections.json", dets)
    out = tmp_path / "fig5.png"
    assert main(["plot", "predictions", str(det_path), "--images", str(images_dir), "--annotations", str(ann_path),
                 "--ids", "2,1", "--gt", "--out", str(out), "--dpi", str(DPI)]) == 0
    row = 3.0 * 40 / 48 + 0.25  # panels follow the images' aspect (48x40)
    assert_figure(out, 3.0 * 2, row * 2 + 0.3)
    out = tmp_path / "fig5_auto.png"
    assert main(["plot", "predictions", str(det_path), "--images", str(images_dir), "--annotations", str(ann_path),
                 "--score", "0.75", "--max-images", "1", "--out", str(out), "--dpi", str(DPI)]) == 0
    assert_figure(out, 3.0, row + 0.3)
    # two runs (teacher vs student, the paper's Fig. 5): one row each, plus the ground truth
    student = write(tmp_path / "student.json", dets[:2])
    out = tmp_path / "fig5_two.png"
    assert main(["plot", "predictions", str(det_path), str(student), "--labels", "teacher,student", "--images",
                 str(images_dir), "--annotations", str(ann_path), "--ids", "1,2", "--gt", "--out", str(out),
                 "--dpi", str(DPI)]) == 0
    assert_figure(out, 3.0 * 2, row * 3 + 0.3)
    anns_obj = load_annotations(ann_path)
    fig = plots.predictions_figure([dets, dets[:2]], anns_obj, images_dir, [1, 2], label=["teacher", "student"])
    titles = [ax.get_title() for ax in fig.axes]
    assert (titles[0], titles[2]) == ("teacher: image 1 (2 >= 0.5)", "student: image 1 (2 >= 0.5)")  # row-major


def test_bad_input_exits_2(tmp_path, dataset, capsys):
    ann_path, images_dir = dataset
    good = write(tmp_path / "cal.json", calibration(0.1, 0.1))
    no_bins = write(tmp_path / "nobins.json", {"ece": 0.1, "per_class": {}})
    bad_bin = write(tmp_path / "badbin.json", {**calibration(0.1, 0.1),
                                                "reliability": [{"count": 3, "accuracy": 2.0, "confidence": 0.5}]})
    percent = write(tmp_path / "percent.json", {"segm": {"AP": 40.0, "APr": 10.0, "per_class": {"1": 60.0}}})
    unknown = write(tmp_path / "unknown.json", {"segm": {"AP": 0.4, "per_class": {"99": 0.5}}})
    no_method = write(tmp_path / "nomethod.json", {"segm": {"AP": 0.4, "APr": 0.1}, "labeled_fraction": 0.1})
    dets = write(tmp_path / "dets.json", [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}])
    ok_dets = write(tmp_path / "ok.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}])
    out = str(tmp_path / "fig.png")
    cases = [
        ["reliability", str(tmp_path / "missing.json"), "--out", out],
        ["reliability", str(no_bins), "--out", out],
        ["reliability", str(bad_bin), "--out", out],
        ["reliability", str(good), str(good), "--labels", "only-one", "--out", out],
        ["reliability", str(good), "--out", out, "--dpi", "0"],
        ["ap-vs-frequency", str(percent), "--annotations", str(ann_path), "--out", out],
        ["ap-vs-frequency", str(unknown), "--annotations", str(ann_path), "--out", out],
        ["ap-vs-frequency", str(percent), "--annotations", str(ann_path), "--iou-type", "mask", "--out", out],
        ["label-efficiency", str(no_method), "--out", out],
        ["label-efficiency", str(no_method), "--methods", "a,b", "--out", out],
        ["label-efficiency", str(no_method), "--methods", "a", "--fractions", "x", "--out", out],
        ["predictions", str(dets), "--images", str(images_dir), "--annotations", str(ann_path), "--out", out],
        ["predictions", str(ok_dets), "--images", str(images_dir), "--annotations", str(ann_path), "--ids", "5",
         "--out", out],
        ["predictions", str(ok_dets), "--images", str(tmp_path / "nowhere"), "--annotations", str(ann_path),
         "--out", out],
    ]
    messages = []
    for args in cases:
        capsys.readouterr()
        assert main(["plot", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        messages.append(err)
    assert not list(tmp_path.glob("fig.*")), "nothing is written on bad input"
    expected = ["file not found", "no 'reliability'", "reliability[0]", "1 labels for 2", "--dpi",
                "fraction in [0, 1]", "category id 99", "unknown IoU type", "pass --methods", "--methods has 2",
                "--fractions takes numbers", "unknown image id 7", "image id 5", "image file not found"]
    for message, needle in zip(messages, expected):
        assert needle in message, (needle, message)


# ------------------------------------------------------------------ issue 13.7: figures as the paper's


def test_reliability_names_runs_handles_empty_groups_and_keeps_a_single_legend(tmp_path):
    """Panel names default to the run (not the `eval` folder); a group with no detection reads n/a
    (null, or the older 0.0 with count 0); one panel keeps its whole legend inside the figure."""
    cal = calibration(0.22, 0.2)
    cal["groups"] = {"r": {"classes": 3, "classes_with_detections": 0, "count": 0, "ece": None},
                     "c": {"classes": 2, "classes_with_detections": 0, "count": 0, "ece": 0.0},
                     "f": {"classes": 4, "classes_with_detections": 4, "count": 90, "ece": 0.25}}
    for run in ("teacher", "student"):
        (tmp_path / "runs" / run / "eval").mkdir(parents=True)
        (tmp_path / "runs" / run / "model.json").write_text("{}")
        write(tmp_path / "runs" / run / "eval" / "calibration.json", cal)
    files = [tmp_path / "runs" / r / "eval" / "calibration.json" for r in ("teacher", "student")]
    assert plots.default_labels(files) == ["teacher", "student"]
    assert plots.run_label(tmp_path / "x" / "eval" / "calibration.json") == "x"  # no model.json: skip 'eval'
    out = tmp_path / "one.png"
    assert main(["plot", "reliability", str(files[0]), "--out", str(out), "--dpi", str(DPI)]) == 0
    assert_figure(out, plots.PANEL_IN, 1.3 * plots.PANEL_IN)
    fig = plots.reliability_figure([plots.read_calibration(files[0])], ["teacher"], dpi=DPI)
    assert fig.axes[0].get_title() == "teacher: ECE 0.220\n(r n/a, c n/a, f 0.250)"
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    box = fig.bbox
    assert legend.x0 >= box.x0 and legend.x1 <= box.x1 and legend.y0 >= box.y0, "legend clipped"


def test_ap_vs_frequency_two_runs_one_group_definition_no_negative_axis(tmp_path, dataset):
    ann_path, _ = dataset
    for run in ("teacher", "student"):
        (tmp_path / run).mkdir()
    teacher = write(tmp_path / "teacher" / "metrics.json", {
        "segm": {"AP": 0.3, "APr": 0.9, "APc": 0.3, "APf": 0.5, "per_class": {"1": 0.5, "2": 0.3, "3": 0.0, "4": -1}}})
    student = write(tmp_path / "student" / "metrics.json", {
        "segm": {"AP": 0.4, "APr": 0.2, "APc": 0.35, "APf": 0.55,
                 "per_class": {"1": 0.55, "2": 0.35, "3": 0.2, "4": -1}}})
    out = tmp_path / "fig4_two.png"
    assert main(["plot", "ap-vs-frequency", str(teacher), str(student), "--annotations", str(ann_path),
                 "--out", str(out), "--dpi", str(DPI)]) == 0
    assert_figure(out, 6.4, 4.4)
    annotations = load_annotations(ann_path)
    fig = plots.ap_vs_frequency_figure([json.loads(teacher.read_text()), json.loads(student.read_text())],
                                       annotations, metrics_path=[teacher, student], labels=["teacher", "student"])
    ax = fig.axes[0]
    assert ax.get_ylim()[0] >= -1 and min(ax.get_yticks()) >= 0, "no negative AP axis"
    texts = {t.get_text(): t for t in ax.texts}
    # group lines are the mean AP of the dots of that colour (groups from the training json), not the
    # metrics' APr (0.9 here, computed by eval with other groups): one definition for dots and lines
    assert "APr 0.0 -> 20.0" in texts and "APc 30.0 -> 35.0" in texts and "APf 50.0 -> 55.0" in texts
    assert texts["APr 0.0 -> 20.0"].get_color() == plots.GROUP_COLOURS["r"]
    assert "hollow: teacher, filled: student" in ax.get_title()
    assert main(["plot", "ap-vs-frequency", str(teacher), str(student), str(student), "--annotations",
                 str(ann_path), "--out", str(tmp_path / "three.png")]) == 2


def test_group_labels_never_overlap():
    placed = plots.spread_labels([30.0, 31.0, 60.0, 29.5], 6.0)
    ordered = sorted(placed)
    assert all(b - a >= 6.0 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert placed[2] == 60.0 and placed[3] == 29.5  # the lowest and a far one stay where they are
