"""Benchmark `slsd eval` against the official lvis-api (issue 6), in the same run.

An LVIS-scale synthetic problem: --images images (default 1,000) x --per-image detections (default
300, LVIS's cap), the 1,203 LVIS v1 categories with their real training image counts and frequency
groups (../shared/data/lvis_v1_train_cat_info.json), polygon ground truth, RLE detections (jittered
true positives, mislabelled ones, false positives on verified and unverified classes), negative and
not-exhaustive category lists. Generated once and cached under --work.

Each evaluator runs in its own fresh process, bbox then segm, from the json files on disk:
- slsd: read + validate the detections (ids, scores, boxes, every RLE's run lengths), evaluate;
- lvis-api: LVIS + LVISResults + LVISEval.run() per IoU type (segm given results without `bbox`,
  as detectron2 passes them, so detection areas are mask areas for both);
- faster-coco-eval (COCOeval_faster, lvis_style=True; optional second baseline, --no-fce to skip).
It prints wall and CPU time, peak memory (ru_maxrss of each process), the speed-up over lvis-api
and the largest difference of any summary number or per-class AP.

    python benchmarks/bench_eval.py [--images 1000] [--per-image 300] [--work /tmp/slsd_bench_eval]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CAT_INFO = Path(__file__).resolve().parents[2] / "shared" / "data" / "lvis_v1_train_cat_info.json"
IOU_TYPES = ("bbox", "segm")


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
    cats = json.loads(CAT_INFO.read_text())
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


# ------------------------------------------------------------------ one evaluator per process


def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}


def run_slsd(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    from slsd_cli import evaluation
    from slsd_cli.data.lvis import load_annotations

    t0 = time.perf_counter()
    ann = load_annotations(gt_path)
    dets = evaluation.load_detections(dt_path, ann)
    t1 = time.perf_counter()
    metrics, phases = {}, {"load_validate_s": t1 - t0}
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        metrics[iou_type] = evaluation.evaluate(ann, dets, iou_types=[iou_type], max_dets=max_dets)[iou_type]
        phases[f"{iou_type}_s"] = time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t0, **phases, **_usage(), "metrics": metrics}


def run_lvis_api(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    from slsd_cli.evaluation import lvis_api

    lvis = lvis_api()
    t0 = time.perf_counter()
    gt = lvis.LVIS(str(gt_path))
    raw = json.loads(dt_path.read_text())
    phases = {"load_s": time.perf_counter() - t0}
    metrics = {}
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        results = copy.deepcopy(raw)
        for r in results:
            r.pop("bbox" if iou_type == "segm" else "segmentation")
        ev = lvis.LVISEval(gt, lvis.LVISResults(gt, results, max_dets=max_dets), iou_type)
        ev.params.max_dets = max_dets
        ev.run()
        m = {k: float(v) for k, v in ev.get_results().items()}
        p = ev.eval["precision"]
        m["per_class"] = {}
        for k, cid in enumerate(ev.params.cat_ids):
            s = p[:, :, k, 0]
            m["per_class"][str(cid)] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
        metrics[iou_type] = m
        phases[f"{iou_type}_s"] = time.perf_counter() - t
        del ev, results
    return {"wall_s": time.perf_counter() - t0, **phases, **_usage(), "metrics": metrics}


def run_fce(gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    """faster-coco-eval's LVIS mode; the per-image cap done beforehand as LVISResults does."""
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as fmask

    from slsd_cli.evaluation import limit_per_image

    t0 = time.perf_counter()
    gt_data = json.loads(gt_path.read_text())
    raw = json.loads(dt_path.read_text())
    keep = limit_per_image(np.array([d["image_id"] for d in raw]), np.array([d["score"] for d in raw]), max_dets)
    raw = [raw[i] for i in keep]
    phases = {"load_s": time.perf_counter() - t0}
    metrics = {}
    for iou_type in IOU_TYPES:
        t = time.perf_counter()
        gt = COCO(copy.deepcopy(gt_data))
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
    return {"wall_s": time.perf_counter() - t0, **phases, **_usage(), "metrics": metrics}


RUNNERS = {"slsd": run_slsd, "lvis-api": run_lvis_api, "faster-coco-eval": run_fce}


def _child(name: str, gt_path: Path, dt_path: Path, max_dets: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--gt", str(gt_path), "--dt", str(dt_path),
                           "--max-dets", str(max_dets)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for iou_type in IOU_TYPES:
        for key, value in a[iou_type].items():
            if key == "per_class":
                for cid, v in value.items():
                    worst = max(worst, abs(b[iou_type]["per_class"][cid] - v))
            elif key in b[iou_type]:
                worst = max(worst, abs(b[iou_type][key] - value))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-image", type=int, default=300)
    parser.add_argument("--max-dets", type=int, default=300)
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
    gt = json.loads(gt_path.read_text())
    freq = {g: sum(c["frequency"] == g for c in gt["categories"]) for g in "rcf"}
    present = {c["category_id"] for c in gt["annotations"]}
    print(f"problem: {len(gt['images']):,} images, {len(gt['annotations']):,} ground-truth instances of "
          f"{len(present)} classes present ({len(gt['categories'])} LVIS classes: r/c/f {freq['r']}/{freq['c']}/"
          f"{freq['f']}), {args.images * args.per_image:,} detections, bbox + segm, max {args.max_dets} per image")
    del gt
    # slsd runs first and last and keeps its faster run, so that a burst of load from other work on
    # the machine does not decide the ratio (CPU seconds, also printed, are immune to it)
    names = ["slsd", "lvis-api"] + ([] if args.no_fce else ["faster-coco-eval"]) + ["slsd"]
    runs = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result = _child(name, gt_path, dt_path, args.max_dets)
        if name not in runs or result["wall_s"] < runs[name]["wall_s"]:
            runs[name] = result
    base = runs["lvis-api"]
    print(f"\n{'evaluator':<18}{'wall s':>9}{'cpu s':>9}{'load s':>9}{'bbox s':>9}{'segm s':>9}{'peak MB':>10}"
          f"{'x lvis (wall)':>15}{'x lvis (cpu)':>14}{'max |diff|':>12}")
    for name, r in runs.items():
        load = r.get("load_validate_s", r.get("load_s", 0.0))
        diff = 0.0 if name == "lvis-api" else _max_diff(r["metrics"], base["metrics"])
        print(f"{name:<18}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{load:>9.1f}{r['bbox_s']:>9.1f}{r['segm_s']:>9.1f}"
              f"{r['peak_mb']:>10.0f}{base['wall_s'] / r['wall_s']:>15.1f}{base['cpu_s'] / r['cpu_s']:>14.1f}"
              f"{diff:>12.1e}")
    print("\n(slsd: the faster of two runs, one before and one after the baselines. Its load includes "
          "validating every record and every RLE's run lengths; lvis-api and faster-coco-eval only parse "
          "json. max |diff|: over all summary numbers and, where computed, the 1,203 per-class APs, "
          "against lvis-api.)")
    for iou_type in IOU_TYPES:
        m = runs["slsd"]["metrics"][iou_type]
        print(f"slsd {iou_type}: " + ", ".join(f"{k} {100 * m[k]:.2f}" for k in
                                            ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
                                             f"AR@{args.max_dets}")))


if __name__ == "__main__":
    main()
