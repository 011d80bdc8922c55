"""Benchmark `slsd calibrate` at LVIS scale (issue 3), and its reader against a plain json reference.

Generates (once, cached under --work) an LVIS-format held-out set of 20,000 images over the 1,203
LVIS v1 categories with their real training counts (benchmarks/data/lvis_v1_counts.json),
and a detections file with 300 detections per image (6 M results, ~560 MiB); and the same at 1/10.

1. Phases (fresh process each, full and 1/10 set): import, annotations json + validation,
   detections (`results.read_results`: parse + validate), compute (matching + Eq. 4), write:
   wall and CPU seconds, peak memory (VmHWM).
2. The reader against the plain reference a user would write (`json.load` + `results.from_records`,
   which validates the same fields) on the 1/10 set: both sides run --repeat times in fresh
   processes, interleaved, best kept; their arrays (ids, labels, scores, boxes) and the resulting
   calibration must be equal, else exit status 1.
3. `slsd calibrate` end to end (the CLI entry point, process start to exit) on the full set,
   --repeat times, best kept; goal < 10 s and < 2 GB.

    python benchmarks/bench_calibrate.py [--images 20000] [--per-image 300] [--repeat 2] [--work /tmp/slsd_bench_cal]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lvis_counts import lvis_categories  # benchmarks/lvis_counts.py, beside this script

WIDTH, HEIGHT = 640, 480
GOAL_S, GOAL_GB = 10.0, 2.0


def make_dataset(out_dir: Path, num_images: int, per_image: int, seed: int = 0) -> tuple[Path, Path]:
    """Write held-out annotations and detections shaped like LVIS (long tail, ~3.6 classes and
    ~12.7 instances per image, verified negatives, some not-exhaustive classes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ann_path, det_path = out_dir / "annotations.json", out_dir / "detections.json"
    if ann_path.exists() and det_path.exists():
        return ann_path, det_path
    rng = np.random.default_rng(seed)
    cats = lvis_categories()
    categories = [{k: c[k] for k in ("id", "name", "frequency", "image_count", "instance_count")} for c in cats]
    ids = np.array([c["id"] for c in cats])
    img_count = np.array([c["image_count"] for c in cats], dtype=np.float64)
    inst_per_img = np.array([c["instance_count"] / c["image_count"] for c in cats])
    p_class = img_count / img_count.sum()

    images, annotations, gts = [], [], []  # gts: (image_id, class_index, x, y, w, h)
    ann_id = 1
    for i in range(num_images):
        image_id = i + 1
        k = 1 + rng.poisson(2.6)
        classes = np.unique(rng.choice(len(cats), size=k, p=p_class))
        neg = rng.choice(len(cats), size=8, replace=False)
        neg = np.setdiff1d(neg, classes)
        not_exh = classes[rng.random(classes.size) < 0.1]
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT,
                       "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                       "neg_category_ids": ids[neg].tolist(), "not_exhaustive_category_ids": ids[not_exh].tolist()})
        for c in classes:
            n = min(30, 1 + rng.poisson(max(inst_per_img[c] - 1, 0)))
            w = rng.uniform(8, 200, n).round(2)
            h = rng.uniform(8, 200, n).round(2)
            x = (rng.uniform(0, 1, n) * (WIDTH - w)).round(2)
            y = (rng.uniform(0, 1, n) * (HEIGHT - h)).round(2)
            for j in range(n):
                xj, yj, wj, hj = float(x[j]), float(y[j]), float(w[j]), float(h[j])
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": int(ids[c]),
                                    "bbox": [xj, yj, wj, hj], "area": wj * hj,
                                    "segmentation": [[xj, yj, xj + wj, yj, xj + wj, yj + hj, xj, yj + hj]]})
                gts.append((image_id, c, xj, yj, wj, hj))
                ann_id += 1
    data = {"info": {"description": "slsd calibrate benchmark"}, "images": images,
            "annotations": annotations, "categories": categories}
    ann_path.write_text(json.dumps(data))

    gt = np.array(gts, dtype=np.float64)
    gt_by_image = np.split(gt, np.flatnonzero(np.diff(gt[:, 0])) + 1)
    with open(det_path, "w") as out:
        out.write("[")
        first = True
        for rows in gt_by_image:
            image_id = int(rows[0, 0])
            # ~2 detections per GT: jittered boxes, the right class 75% of the time
            tp = np.repeat(rows, 2, axis=0)[: per_image // 2]
            n_tp = tp.shape[0]
            jitter = rng.normal(0, 0.08, (n_tp, 4)) * tp[:, [4, 5, 4, 5]]
            boxes_tp = tp[:, 2:6] + jitter
            cls_tp = np.where(rng.random(n_tp) < 0.75, tp[:, 1].astype(np.int64),
                              rng.choice(len(cats), size=n_tp, p=p_class))
            score_tp = rng.beta(5, 2, n_tp)
            n_fp = per_image - n_tp
            w = rng.uniform(8, 300, n_fp)
            h = rng.uniform(8, 300, n_fp)
            boxes_fp = np.stack([rng.uniform(0, 1, n_fp) * (WIDTH - w), rng.uniform(0, 1, n_fp) * (HEIGHT - h), w, h], 1)
            cls_fp = np.where(rng.random(n_fp) < 0.3, rng.choice(rows[:, 1].astype(np.int64), size=n_fp),
                              rng.choice(len(cats), size=n_fp, p=p_class))
            score_fp = rng.beta(1.2, 6, n_fp)
            boxes = np.concatenate([boxes_tp, boxes_fp])
            boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
            cls = ids[np.concatenate([cls_tp, cls_fp])]
            scores = np.clip(np.concatenate([score_tp, score_fp]), 0.02, 1.0)
            parts = [f'{{"image_id": {image_id}, "category_id": {c}, "bbox": [{b[0]:.2f}, {b[1]:.2f}, {b[2]:.2f}, '
                     f'{b[3]:.2f}], "score": {s:.4f}}}'
                     for c, b, s in zip(cls.tolist(), boxes.tolist(), scores.tolist())]
            out.write(("" if first else ", ") + ", ".join(parts))
            first = False
        out.write("]")
    return ann_path, det_path


PEAK = r"""
def peak_gb():
    # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 2**20
"""

PHASES = PEAK + r"""
import sys, time, json
t0 = time.perf_counter()
from slsd_cli.data import results
from slsd_cli.data.lvis import load_annotations
from slsd_cli.labels import calibration
t_import = time.perf_counter()
c_import = time.process_time()
ann = load_annotations(sys.argv[1])
t_ann = time.perf_counter()
c_ann = time.process_time()
dets = results.read_results(sys.argv[2], ann, masks=False)
t_det = time.perf_counter()
c_det = time.process_time()
result = calibration.calibrate_detections(dets, ann, bins=10, iou=0.5)
t_compute = time.perf_counter()
c_compute = time.process_time()
calibration.write_calibration(sys.argv[3], result, force=True)
t_write = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "annotations_s": t_ann - t_import, "detections_s": t_det - t_ann,
                  "compute_s": t_compute - t_det, "write_s": t_write - t_compute,
                  "annotations_cpu_s": c_ann - c_import, "detections_cpu_s": c_det - c_ann,
                  "compute_cpu_s": c_compute - c_det, "torch": "torch" in sys.modules,
                  "detections": len(dets), "judged": result["judged"], "ece": result["ece"],
                  "peak_gb": peak_gb()}))
"""

# one side of the reader comparison: the reader ("fast") or json.load + from_records ("json")
READER = PEAK + r"""
import hashlib, json, sys, time
from slsd_cli.data import results
from slsd_cli.data.lvis import load_annotations
from slsd_cli.io import read_json
from slsd_cli.labels import calibration
ann = load_annotations(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
if sys.argv[1] == "fast":
    dets = results.read_results(sys.argv[3], ann, masks=False)
else:
    dets = results.from_records(read_json(sys.argv[3]), ann, sys.argv[3], masks=False)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
digest = hashlib.sha256()
for name in ("image_ids", "category_ids", "labels", "scores", "boxes", "has_box"):
    digest.update(getattr(dets, name).tobytes())
cal = calibration.calibrate_detections(dets, ann)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_gb": peak_gb(), "arrays": digest.hexdigest(),
                  "calibration": hashlib.sha256(json.dumps(cal, sort_keys=True).encode()).hexdigest()}))
"""

CLI = PEAK + r"""
import sys, json, resource
from slsd_cli.cli import main
code = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "peak_gb": peak_gb(), "cpu_s": usage.ru_utime + usage.ru_stime,
                  "torch": "torch" in sys.modules}))
"""


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(ann: Path, det: Path, out: Path) -> dict:
    """`slsd calibrate` end to end (the CLI entry point) in a fresh process."""
    t0 = time.perf_counter()
    report = _run(CLI, "calibrate", "--annotations", str(ann), "--detections", str(det), "--out", str(out), "--force")
    report["wall_s"] = time.perf_counter() - t0
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--per-image", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2, help="runs of every compared side (the best is kept)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slsd_bench_cal"))
    args = parser.parse_args()

    work = args.work / f"{args.images}x{args.per_image}"
    t0 = time.perf_counter()
    ann, det = make_dataset(work, args.images, args.per_image)
    print(f"dataset: {work} ({time.perf_counter() - t0:.1f} s to generate or find; detections file "
          f"{det.stat().st_size / 2**20:.0f} MiB)")
    small_ann, small_det = make_dataset(args.work / f"{args.images // 10}x{args.per_image}", args.images // 10,
                                        args.per_image, seed=1)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} (other work on the machine inflates wall "
          f"times; CPU seconds are the steadier figure)")
    failed = []

    small = _run(PHASES, str(small_ann), str(small_det), str(small_ann.with_name("calibration.json")))
    full = _run(PHASES, str(ann), str(det), str(work / "calibration.json"))
    for name, r in (("1/10 set", small), ("full set", full)):
        print(f"{name}: {r['detections']:,} detections ({r['judged']:,} judged), ECE {r['ece']:.4f}")
        print(f"  import {r['import_s']:.1f} s (torch loaded: {r['torch']}) | annotations json+validation "
              f"{r['annotations_s']:.1f} s ({r['annotations_cpu_s']:.1f} s CPU) | detections read+validation "
              f"{r['detections_s']:.1f} s ({r['detections_cpu_s']:.1f} s CPU) | compute {r['compute_s']:.1f} s "
              f"({r['compute_cpu_s']:.1f} s CPU) | write {r['write_s']:.2f} s | peak {r['peak_gb']:.2f} GB")
    ratio = (full["detections_cpu_s"] + full["compute_cpu_s"]) / (small["detections_cpu_s"] + small["compute_cpu_s"])
    print(f"full / 1/10 CPU time (detections + compute): {ratio:.1f}x for 10x the detections")

    sides: dict[str, list[dict]] = {"fast": [], "json": []}
    for _ in range(args.repeat):
        for side in sides:
            sides[side].append(_run(READER, side, str(small_ann), str(small_det)))
    fast, ref = (min(sides[s], key=lambda r: r["cpu_s"]) for s in ("fast", "json"))
    same = all(r["arrays"] == fast["arrays"] and r["calibration"] == fast["calibration"]
               for r in sides["fast"] + sides["json"])
    if not same:
        failed.append("the reader's arrays or calibration differ from json.load + from_records")
    print(f"reader on the 1/10 set, best of {args.repeat} each: read_results {fast['wall_s']:.2f} s "
          f"({fast['cpu_s']:.2f} s CPU, peak {fast['peak_gb']:.2f} GB) vs json.load + from_records "
          f"{ref['wall_s']:.2f} s ({ref['cpu_s']:.2f} s CPU, peak {ref['peak_gb']:.2f} GB): "
          f"{ref['cpu_s'] / max(fast['cpu_s'], 1e-9):.1f}x (CPU), {ref['wall_s'] / max(fast['wall_s'], 1e-9):.1f}x "
          f"(wall); arrays and calibration equal: {same}")

    cli = min((run_cli(ann, det, work / "calibration_cli.json") for _ in range(args.repeat)),
              key=lambda r: r["wall_s"])
    ok = cli["wall_s"] < GOAL_S and cli["peak_gb"] < GOAL_GB
    print(f"`slsd calibrate` end to end (process start to exit, best of {args.repeat}): {cli['wall_s']:.1f} s wall, "
          f"{cli['cpu_s']:.1f} s CPU, peak {cli['peak_gb']:.2f} GB, torch loaded: {cli['torch']} "
          f"(goal < {GOAL_S:g} s and < {GOAL_GB:g} GB): {'PASS' if ok else 'FAIL'}")
    if failed:
        print("FAIL: " + "; ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
