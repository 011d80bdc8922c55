"""Inference check (print figures; not a test).

  python benchmarks/bench_inference.py infer-check --device cuda --size 1024 --images 20 \
      --backbone eva02_large --dtype bf16
      The EVA-02-L Cascade Mask R-CNN (random init, 1203 classes, the published head widths) through
      `slsd_cli.inference.predictor.Predictor` on images of mixed aspect ratios (longest edge = --size, square
      canvas padding), every candidate kept (score threshold 0, up to 300 detections per image, so the
      mask head and the RLE encoding see a full LVIS load). Prints images/s for the model alone and
      with the results conversion (paste + RLE), peak GPU memory per image (goal <= 24.9 GB), that
      no output is NaN (exit code 1 otherwise), and the largest difference between an image
      predicted alone and in a batch of two with another shape. `benchmarks/gpu_check.sh` runs it;
      on CPU it is a smoke test: `--device cpu --size 256 --images 3 --backbone eva02_tiny --dtype fp32`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

from slsd_cli.model import ModelConfig, build_model, to_results  # noqa: E402
from slsd_cli.inference.predictor import Predictor  # noqa: E402

ASPECTS = [(1.0, 0.75), (0.667, 1.0), (1.0, 1.0), (0.5625, 1.0), (1.0, 0.8), (0.75, 1.0), (1.0, 0.5)]  # (h, w)


def image_shapes(n: int, size: int) -> list[tuple[int, int]]:
    return [(max(32, int(size * h)), max(32, int(size * w))) for h, w in (ASPECTS[i % len(ASPECTS)] for i in range(n))]


def finite(det: dict) -> bool:
    return all(bool(torch.isfinite(det[k]).all()) for k in ("boxes", "scores", "probs", "mask_probs"))


def infer_check(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    cfg = ModelConfig(backbone=args.backbone, image_size=args.size, drop_path=0.0)
    if args.backbone == "eva02_tiny":  # small enough for a CPU smoke run
        cfg = dataclasses.replace(cfg, fpn_channels=64, box_head_conv_dim=64, box_head_fc_dim=256,
                                  mask_head_channels=64, rpn_post_nms_topk_test=200)
    torch.manual_seed(0)
    model = build_model(cfg, args.num_classes).to(device).eval()
    amp = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[args.dtype]
    predictor = Predictor(model, list(range(1, args.num_classes + 1)), amp=amp)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.backbone} Cascade Mask R-CNN inference, {params:.1f} M params, {args.num_classes} classes, "
          f"canvas {predictor.canvas}^2, {args.dtype}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else device}", flush=True)
    g = torch.Generator().manual_seed(0)
    shapes = image_shapes(args.images, args.size)
    images = [torch.rand(3, h, w, generator=g) * 255 for h, w in shapes]

    def run(img: torch.Tensor) -> dict:
        return predictor.predict(img.unsqueeze(0).to(device), [tuple(img.shape[-2:])], score_threshold=0.0)[0]

    warm = min(2, len(images))
    for img in images[:warm]:
        run(img)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    bad, dets, model_time, post_time = 0, 0, 0.0, 0.0
    for i, img in enumerate(images):
        t0 = time.perf_counter()
        det = run(img)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        records = to_results(det, i, predictor.category_ids, 1.0, tuple(img.shape[-2:]))
        t2 = time.perf_counter()
        model_time, post_time = model_time + t1 - t0, post_time + t2 - t1
        dets += len(records)
        if not finite(det):
            bad += 1
            print(f"image {i} {tuple(img.shape[-2:])}: non-finite output")
    n = len(images)
    print(f"{n} images of shapes {sorted(set(shapes))}, {dets / n:.0f} detections per image")
    print(f"throughput: {n / model_time:.2f} images/s (model), {n / (model_time + post_time):.2f} images/s "
          f"(with paste + RLE: {post_time / n:.3f} s/image)")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        print(f"peak GPU memory: {peak / 2**30:.2f} GiB per image ({peak / 1e9:.2f} GB; target <= 24.9 GB)")
    # batch composition: the first image alone vs batched with the second (another shape)
    a, b = images[0], images[1 % n]
    h, w = max(a.shape[1], b.shape[1]), max(a.shape[2], b.shape[2])
    pair = torch.zeros(2, 3, h, w)
    pair[0, :, :a.shape[1], :a.shape[2]] = a
    pair[1, :, :b.shape[1], :b.shape[2]] = b
    alone = run(a)
    both = predictor.predict(pair.to(device), [tuple(a.shape[-2:]), tuple(b.shape[-2:])], score_threshold=0.0)[0]
    same = alone["scores"].shape == both["scores"].shape and torch.equal(alone["labels"], both["labels"])
    diff = 0.0
    if same and len(alone["scores"]):
        diff = max(float((alone[k] - both[k]).abs().max()) for k in ("boxes", "scores", "mask_probs"))
    print(f"alone vs batched with another shape: {'same detections' if same else 'DIFFERENT detections'}, "
          f"max abs difference {diff:.3g}")
    print("NaN check: " + ("PASS (all outputs finite)" if bad == 0 else f"FAIL ({bad} images with non-finite outputs)"))
    return 0 if bad == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ic = sub.add_parser("infer-check")
    ic.add_argument("--device", default="cuda")
    ic.add_argument("--size", type=int, default=1024)
    ic.add_argument("--images", type=int, default=20)
    ic.add_argument("--backbone", default="eva02_large")
    ic.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ic.add_argument("--num-classes", type=int, default=1203)
    args = parser.parse_args()
    return infer_check(args)


if __name__ == "__main__":
    sys.exit(main())
