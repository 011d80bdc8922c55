"""Benchmark `slsd eval` against the official lvis-api (issue 6), both sides timed alike, in one run.

An LVIS-scale synthetic problem: --images images (default 1,000) x --per-image detections (default
300, LVIS's cap), the 1,203 LVIS v1 categories with their real training image counts and frequency
groups (benchmarks/data/lvis_v1_counts.json), polygon ground truth, RLE detections (jittered
true positives, mislabelled ones, false positives on verified and unverified classes), negative and
not-exhaustive category lists. Generated once and cached under --work, with a copy of the
detections without masks (the box-only file of the end-to-end comparison).

Two comparisons, every side run --repeat times (default 2) in fresh processes, sides interleaved,
the best run of each side kept:

1. kernel (bbox then segm, from the json files on disk, in-process timers):
   - slsd: `results.read_results` (parse + validate ids, scores, boxes and every RLE's run lengths)
     and `evaluation.evaluate` per IoU type;
   - lvis-api: `LVIS(gt)` + `json.load(detections)`, then per IoU type `LVISResults` +
     `LVISEval.run()`. Per IoU type it is given its own shallow copies of the records without the
     other geometry (segm without `bbox`, as detectron2 passes them, so detection areas are mask
     areas for both); making those copies is not timed;
   - faster-coco-eval (COCOeval_faster, lvis_style=True; optional, --no-fce to skip).
2. end to end, as a user runs it, on the box-only file (bbox): the command line
   `python -m slsd_cli eval --detections ... --iou-type bbox` against `python lvis_script.py`, the few
   lines of lvis-api a user writes (`LVIS`, `LVISResults(gt, path)`, `LVISEval.run`), wall time of the
   process from start to exit.

The summary numbers and the 1,203 per-class APs of slsd must equal lvis-api's (|diff| <= 1e-12),
and the end-to-end summaries too: otherwise the benchmark exits with status 1.

    python benchmarks/bench_eval.py [--images 1000] [--per-image 300] [--repeat 2] [--work /tmp/slsd_bench_eval]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lvis_counts import lvis_categories  # benchmarks/lvis_counts.py, beside this script
from lvis_reference import lvis_api  # benchmarks/lvis_reference.py: lvis-api under numpy 2

IOU_TYPES = ("bbox", "segm")
TOLERANCE = 1e-12


# ------------------------------------------------------------------ the synthetic problem


def _ellipse(rng, x, y, w, h, n=16):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)
    r = rng.uniform(0.8, 1.0, n)
    px, py = x + w / 2 + (w / 2) * r * np.cos(t), y + h / 2 + (h / 2) * r * np.sin(t)
    return np.stack([px, py], 1).ravel().round(2).tolist()


def make_problem(out_dir: Path, num_images: int, per_image: int, seed: int = 0) -> tuple[Path, Path]:
    from pycocotools import mask as mask_utils

    out_dir.mkdir(parents=True, exist_ok=True)
    gt_path, dt_path = out_dir / f"gt_{num_images}.json", out_dir / f"dt_{num_images}x{per_image}.json"
    if gt_path.exists() and dt_path.exists():
        return gt_path, dt_path
    rng = np.random.default_rng(seed)
    cats = lvis_categories()
    categories = [{k: c[k] for k in ("id", "name", "frequency", "image_count", "instance_count")} for c in cats]
    ids = np.array([c["id"] for c in cats])
    counts = np.array([c["image_count"] for c in cats], dtype=np.float64)
    # classes per image follow the LVIS long tail, mixed with a uniform share so that rare classes
    # occur in a 1,000-image set (in LVIS val they are in ~1 % of the images)
    p = 0.8 * counts / counts.sum() + 0.2 / len(cats)
    images, anns, dets = [], [], []
    started = time.time()
    for i in range(num_images):
        image_id = i + 1
        h, w = int(rng.integers(360, 641)), int(rng.integers(360, 641))
        pos = np.unique(rng.choice(len(cats), size=1 + rng.poisson(2.6), p=p))
        neg = np.setdiff1d(rng.choice(len(cats), size=8, replace=False), pos)
        nel = pos[rng.random(pos.size) < 0.1]
        images.append({"id": image_id, "width": w, "height": h, "coco_url": f"http://x/val2017/{image_id:012d}.jpg",
                       "neg_category_ids": ids[neg].tolist(), "not_exhaustive_category_ids": ids[nel].tolist()})
        gts = []
        for c in pos:
            for _ in range(min(12, 1 + rng.poisson(2.0))):
                bw = float(np.exp(rng.uniform(np.log(6), np.log(0.6 * w))))
                bh = float(np.exp(rng.uniform(np.log(6), np.log(0.6 * h))))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                poly = _ellipse(rng, x, y, bw, bh)
                rle = mask_utils.frPyObjects([poly], h, w)[0]
                box = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
                if box[2] <= 0 or box[3] <= 0:
                    continue
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(ids[c]), "bbox": box,
                             "segmentation": [poly], "area": float(mask_utils.area(rle))})
                gts.append((int(ids[c]), x, y, bw, bh))
        verified = np.concatenate([ids[pos], ids[neg]])
        for k in range(per_image):
            if gts and k < 3 * len(gts):
                c, x, y, bw, bh = gts[k % len(gts)]
                if rng.random() < 0.1:
                    c = int(rng.choice(verified))
                j = rng.normal(0, 0.15, 4)
                x, y, bw, bh = x + j[0] * bw, y + j[1] * bh, bw * np.exp(j[2]), bh * np.exp(j[3])
                score = rng.uniform(0.3, 1.0)
            else:
                c = int(rng.choice(verified)) if rng.random() < 0.7 else int(rng.choice(ids))
                bw = float(np.exp(rng.uniform(np.log(4), np.log(0.6 * w))))
                bh = float(np.exp(rng.uniform(np.log(4), np.log(0.6 * h))))
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                score = rng.uniform(0.0, 0.7)
            x, y = float(np.clip(x, 0, w - 2)), float(np.clip(y, 0, h - 2))
            bw, bh = float(min(bw, w - x)), float(min(bh, h - y))
            rle = mask_utils.frPyObjects([_ellipse(rng, x, y, bw, bh)], h, w)[0]
            dets.append({"image_id": image_id, "category_id": int(c),
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                         "score": round(float(score), 4),
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
        if (i + 1) % 100 == 0:
            print(f"  generated {i + 1}/{num_images} images ({time.time() - started:.0f} s)", file=sys.stderr)
    gt_path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": categories}))
    dt_path.write_text(json.dumps(dets))
    return gt_path, dt_path


def boxes_only(dt_path: Path) -> Path:
    """The detections without their masks (cached next to them)."""
    out = dt_path.with_name(dt_path.stem + "_boxes.json")
    if not out.exists():
        out.write_text(json.dumps([{k: v for k, v in d.items() if k != "segmentation"}
                                   for d in json.loads(dt_path.read_text())]))
    return out


# ------------------------------------------------------------------ kernel: one evaluator per process


def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}


def run_slsd(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    from slsd_cli.evaluation import metrics as evaluation
    from slsd_cli.data import results
    from slsd_cli.data.lvis import load_annotations

    t0 = time.perf_counter()
    ann = load_annotations(gt_path)
    dets = results.read_results(dt_path, ann)
    t1 = time.perf_counter()
    metrics, phases = {}, {"load_s": t1 - t0}
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        metrics[iou_type] = evaluation.evaluate(ann, dets, iou_types=[iou_type], max_dets=max_dets)[iou_type]
        phases[f"{iou_type}_s"] = time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t0, **phases, **_usage(), "metrics": metrics}


def _lvis_metrics(ev, with_per_class: bool = True) -> dict:
    m = {k: float(v) for k, v in ev.get_results().items()}
    if with_per_class:
        p = ev.eval["precision"]
        m["per_class"] = {}
        for k, cid in enumerate(ev.params.cat_ids):
            s = p[:, :, k, 0]
            m["per_class"][str(cid)] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    return m


def run_lvis_api(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    lvis = lvis_api()
    t0 = time.perf_counter()
    gt = lvis.LVIS(str(gt_path))
    raw = json.loads(dt_path.read_text())
    phases = {"load_s": time.perf_counter() - t0}
    metrics, untimed = {}, 0.0
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        drop = "bbox" if iou_type == "segm" else "segmentation"
        results = [{k: v for k, v in r.items() if k != drop} for r in raw]  # LVISResults adds keys: own dicts
        untimed += time.perf_counter() - t
        t = time.perf_counter()
        ev = lvis.LVISEval(gt, lvis.LVISResults(gt, results, max_dets=max_dets), iou_type)
        ev.params.max_dets = max_dets
        ev.run()
        phases[f"{iou_type}_s"] = time.perf_counter() - t
        metrics[iou_type] = _lvis_metrics(ev)
        del ev, results
    return {"wall_s": time.perf_counter() - t0 - untimed, **phases, **_usage(), "metrics": metrics}


def run_fce(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    """faster-coco-eval's LVIS mode; the per-image cap done beforehand as LVISResults does (timed)."""
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as fmask

    from slsd_cli.evaluation.metrics import limit_per_image

    t0 = time.perf_counter()
    gt_data = json.loads(gt_path.read_text())
    raw = json.loads(dt_path.read_text())
    keep = limit_per_image(np.array([d["image_id"] for d in raw]), np.array([d["score"] for d in raw]), max_dets)
    raw = [raw[i] for i in keep]
    phases = {"load_s": time.perf_counter() - t0}
    metrics = {}
    untimed = 0.0
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        gt_copy = copy.deepcopy(gt_data)  # COCO() takes ownership of the dict: a copy, not timed
        untimed += time.perf_counter() - t
        t = time.perf_counter()
        gt = COCO(gt_copy)
        anns = []
        areas = fmask.area([d["segmentation"] for d in raw]) if iou_type == "segm" else None
        for i, d in enumerate(raw):
            a = {"id": i + 1, "image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"],
                 "iscrowd": 0}
            if iou_type == "bbox":
                a["bbox"], a["area"] = d["bbox"], d["bbox"][2] * d["bbox"][3]
            else:
                a["segmentation"], a["area"] = d["segmentation"], float(areas[i])
            anns.append(a)
        dt = COCO()
        dt.dataset = {"images": gt_data["images"], "categories": gt_data["categories"], "annotations": anns}
        dt.createIndex()
        ev = COCOeval_faster(gt, dt, iou_type, lvis_style=True, print_function=lambda *a: None)
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        p = ev.eval["precision"][..., 0]
        r = ev.eval["recall"][..., 0]

        def mean(s):
            return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0

        m = {"AP": mean(p[:, :, :, [0]]), "AP50": mean(p[[0], :, :, 0]), "AP75": mean(p[[5], :, :, 0]),
             "APs": mean(p[:, :, :, [1]]), "APm": mean(p[:, :, :, [2]]), "APl": mean(p[:, :, :, [3]]),
             f"AR@{max_dets}": mean(r[:, :, [0]])}
        for g, idx in zip("rcf", ev.freq_groups):
            m[f"AP{g}"] = mean(p[:, :, idx, 0])
        metrics[iou_type] = m
        phases[f"{iou_type}_s"] = time.perf_counter() - t
        del ev, gt, dt, anns
    return {"wall_s": time.perf_counter() - t0 - untimed, **phases, **_usage(), "metrics": metrics}


RUNNERS = {"slsd": run_slsd, "lvis-api": run_lvis_api, "faster-coco-eval": run_fce}


def _child(name: str, gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--gt", str(gt_path), "--dt", str(dt_path),
                           "--max-dets", str(max_dets)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(a: dict, b: dict, iou_types=IOU_TYPES) -> float:
    worst = 0.0
    for iou_type in iou_types:
        for key, value in a[iou_type].items():
            if key == "per_class":
                if "per_class" in b[iou_type]:
                    for cid, v in value.items():
                        worst = max(worst, abs(b[iou_type]["per_class"][cid] - v))
            elif key in b[iou_type]:
                worst = max(worst, abs(b[iou_type][key] - value))
    return worst


# ------------------------------------------------------------------ end to end, as a user runs it

LVIS_SCRIPT = """
import json, sys
import numpy as np
if "float" not in np.__dict__:
    np.float = float  # lvis 0.5.3 under numpy 2
from lvis import LVIS, LVISEval, LVISResults
gt = LVIS(sys.argv[1])
ev = LVISEval(gt, LVISResults(gt, sys.argv[2], max_dets=int(sys.argv[3])), "bbox")
ev.params.max_dets = int(sys.argv[3])
ev.run()
ev.print_results()
print(json.dumps({k: float(v) for k, v in ev.get_results().items()}))
"""


def end_to_end(name: str, gt_path: Path, dt_path: Path, max_dets: int, out_dir: Path) -> dict:
    """Wall time of one process, start to exit, and its bbox summary numbers."""
    if name == "slsd":
        cmd = [sys.executable, "-m", "slsd_cli", "eval", "--annotations", str(gt_path), "--detections", str(dt_path),
               "--iou-type", "bbox", "--max-dets", str(max_dets), "--out-dir", str(out_dir), "--force"]
    else:
        cmd = [sys.executable, "-c", LVIS_SCRIPT, str(gt_path), str(dt_path), str(max_dets)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} end to end failed:\n{proc.stderr[-3000:]}")
    if name == "slsd":
        metrics = json.loads((out_dir / "metrics.json").read_text())["bbox"]
    else:
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "metrics": {"bbox": metrics}}


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-image", type=int, default=300)
    parser.add_argument("--max-dets", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2, help="runs of every side (the best is kept)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slsd_bench_eval"))
    parser.add_argument("--no-fce", action="store_true", help="skip the faster-coco-eval baseline")
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--gt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(RUNNERS[args.child](args.gt, args.dt, args.max_dets)))
        return

    gt_path, dt_path = make_problem(args.work, args.images, args.per_image)
    box_path = boxes_only(dt_path)
    gt = json.loads(gt_path.read_text())
    freq = {g: sum(c["frequency"] == g for c in gt["categories"]) for g in "rcf"}
    present = {c["category_id"] for c in gt["annotations"]}
    print(f"problem: {len(gt['images']):,} images, {len(gt['annotations']):,} ground-truth instances of "
          f"{len(present)} classes present ({len(gt['categories'])} LVIS classes: r/c/f {freq['r']}/{freq['c']}/"
          f"{freq['f']}), {args.images * args.per_image:,} detections ({dt_path.stat().st_size / 2**20:.0f} MiB "
          f"with masks, {box_path.stat().st_size / 2**20:.0f} MiB box-only), max {args.max_dets} per image; "
          f"every side run {args.repeat}x, interleaved, best kept")
    del gt
    failed = []

    names = ["slsd", "lvis-api"] + ([] if args.no_fce else ["faster-coco-eval"])
    kernel: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:
            print(f"kernel: running {name} ...", file=sys.stderr, flush=True)
            kernel[name].append(_child(name, gt_path, dt_path, args.max_dets))
    runs = {name: _best(r) for name, r in kernel.items()}
    base = runs["lvis-api"]
    print(f"\nkernel (bbox + segm, in-process timers)\n{'evaluator':<18}{'wall s':>9}{'cpu s':>9}{'load s':>9}"
          f"{'bbox s':>9}{'segm s':>9}{'peak MB':>10}{'x lvis (wall)':>15}{'x lvis (cpu)':>14}{'max |diff|':>12}")
    for name, r in runs.items():
        diff = 0.0 if name == "lvis-api" else _max_diff(r["metrics"], base["metrics"])
        if name == "slsd" and diff > TOLERANCE:
            failed.append(f"kernel: slsd differs from lvis-api by {diff:.1e}")
        print(f"{name:<18}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['load_s']:>9.1f}{r['bbox_s']:>9.1f}{r['segm_s']:>9.1f}"
              f"{r['peak_mb']:>10.0f}{base['wall_s'] / r['wall_s']:>15.1f}{base['cpu_s'] / r['cpu_s']:>14.1f}"
              f"{diff:>12.1e}")
    for iou_type in IOU_TYPES:
        m = runs["slsd"]["metrics"][iou_type]
        print(f"slsd {iou_type}: " + ", ".join(f"{k} {100 * m[k]:.2f}" for k in
                                            ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
                                             f"AR@{args.max_dets}")))

    e2e: dict[str, list[dict]] = {"slsd": [], "lvis-api": []}
    with tempfile.TemporaryDirectory(prefix="slsd-bench-eval-") as tmp:
        for _ in range(args.repeat):
            for name in e2e:
                print(f"end to end: running {name} ...", file=sys.stderr, flush=True)
                e2e[name].append(end_to_end(name, gt_path, box_path, args.max_dets, Path(tmp)))
    ours, theirs = _best(e2e["slsd"]), _best(e2e["lvis-api"])
    diff = _max_diff(ours["metrics"], theirs["metrics"], ("bbox",))
    if diff > TOLERANCE:
        failed.append(f"end to end: slsd differs from lvis-api by {diff:.1e}")
    print(f"\nend to end (process start to exit, box-only file, bbox): slsd eval {ours['wall_s']:.1f} s, "
          f"lvis-api script {theirs['wall_s']:.1f} s -> {theirs['wall_s'] / ours['wall_s']:.1f}x "
          f"(max |diff| {diff:.1e}); kernel above: {base['wall_s'] / runs['slsd']['wall_s']:.1f}x wall, "
          f"{base['cpu_s'] / runs['slsd']['cpu_s']:.1f}x CPU")
    if failed:
        print("FAIL: " + "; ".join(failed))
        raise SystemExit(1)
    print("outputs equal (kernel: summaries and per-class APs; end to end: summaries)")


if __name__ == "__main__":
    main()
