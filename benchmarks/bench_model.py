"""Model benchmarks (print figures; not a test).

  python benchmarks/bench_model.py cpu [--threads N] [--repeats R]
      CPU forward+backward seconds per image, random data:
      - the tiny recipe detector (ResNet-18-FPN, 64-ch pyramid, 256-d box head, 64 RoIs) at 128^2
        batch 4 (the step docs/design.md §4 quotes) and at 256^2 batch 2,
      - EVA-02-B Cascade Mask R-CNN (random init, published head widths) at 512^2,
      each against its bare backbone (forward+backward of the trunk alone) measured in the same run.

  python benchmarks/bench_model.py train-check --device cuda --size 1024 --iters 20 \
      --backbone eva02_large --dtype bf16
      A training loop on random LVIS-like data (1203 classes, 20 boxes/image, federated sigmoid
      loss): images/s, peak GPU memory per image, and a NaN check (exit code 1 on a non-finite
      loss). `benchmarks/gpu_check.sh` runs it on a GPU; on CPU it is a smoke test:
      `--device cpu --size 256 --iters 1 --backbone eva02_tiny`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

from slsd_cli.model import ModelConfig, build_model, tiny_cnn_config  # noqa: E402


def random_batch(batch: int, size: int, num_classes: int, boxes_per_image: int, device: str,
                 generator: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    images = torch.rand(batch, 3, size, size, generator=generator) * 255
    targets = []
    for _ in range(batch):
        side = torch.exp(torch.empty(boxes_per_image, 2).uniform_(math.log(size / 64), math.log(size / 2.5),
                                                                  generator=generator))
        xy = torch.rand(boxes_per_image, 2, generator=generator) * (size - side)
        boxes = torch.cat([xy, xy + side], 1).floor().clamp(0, size)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        masks = torch.zeros(boxes_per_image, size, size, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[j, y1:y2, x1:x2] = True
        targets.append({"boxes": boxes.to(device), "masks": masks.to(device),
                        "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=generator).to(device)})
    return images.to(device), targets


def time_fwd_bwd(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_cpu(args) -> None:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU, {torch.get_num_threads()} thread(s), load average {load:.1f}; best of {args.repeats}; "
          "8 boxes per image")
    g = torch.Generator().manual_seed(0)
    cases = [  # name, config, image size, classes, batch
        ("tiny recipe (resnet18-FPN 64ch)", tiny_cnn_config(), 128, 80, 4),  # docs/design.md §4's step
        ("tiny recipe (resnet18-FPN 64ch)", tiny_cnn_config(), 256, 80, 2),
        ("EVA-02-B Cascade (random init)", ModelConfig(backbone="eva02_base", image_size=512, drop_path=0.1),
         512, 1203, 2),
    ]
    if args.quick:
        cases = cases[:2]
    for name, cfg, size, num_classes, batch in cases:
        torch.manual_seed(0)
        model = build_model(cfg, num_classes).train()
        images, targets = random_batch(batch, size, num_classes, 8, "cpu", g)
        sizes = [(size, size)] * batch

        def detector_step():
            losses = model(images, sizes, targets)
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)

        def backbone_step():
            x = model.preprocess(images, sizes)
            out = model.backbone.trunk(x)
            (out.float().mean() if torch.is_tensor(out) else sum(o.float().mean() for o in out)).backward()
            model.zero_grad(set_to_none=True)

        det = time_fwd_bwd(detector_step, args.repeats) / batch
        trunk = time_fwd_bwd(backbone_step, args.repeats) / batch
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:34s} {size}^2 batch {batch}: {det:6.3f} s/image fwd+bwd ({det * batch:.2f} s/step) | "
              f"trunk alone {trunk:6.3f} s/image | detector/trunk {det / trunk:4.1f}x | {params:.1f} M params")


def train_check(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    cfg = ModelConfig(backbone=args.backbone, image_size=args.size, grad_checkpointing=args.grad_checkpointing,
                      drop_path=args.drop_path)
    if args.backbone == "eva02_tiny":  # small enough for a CPU smoke run
        cfg = dataclasses.replace(cfg, fpn_channels=64, box_head_conv_dim=64, box_head_fc_dim=256,
                                  mask_head_channels=64, rois_per_image=128)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    counts = (1 + 5000 * torch.rand(args.num_classes, generator=g) ** 4).long().tolist()  # long-tailed
    model = build_model(cfg, args.num_classes, counts).to(device).train()
    from slsd_cli.engine.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, layer_decay=0.8)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.backbone} Cascade Mask R-CNN, {params:.1f} M params, {args.num_classes} classes, "
          f"{args.size}^2, batch {args.batch}, {args.dtype}, grad checkpointing {cfg.grad_checkpointing}, "
          f"device {torch.cuda.get_device_name() if device == 'cuda' else device}", flush=True)
    batches = [random_batch(args.batch, args.size, args.num_classes, args.boxes, device, g) for _ in range(2)]
    sizes = [(args.size, args.size)] * args.batch
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = min(2, max(args.iters - 1, 0))
    start = None
    bad = 0
    for it in range(args.iters):
        if it == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, targets = batches[it % 2]
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            losses = model(images, sizes, targets)
        loss = sum(losses.values())
        finite = bool(torch.isfinite(loss))
        if not finite:
            bad += 1
            print(f"iteration {it}: non-finite loss " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        opt.zero_grad(set_to_none=True)
        if finite:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if it < 2 or it == args.iters - 1:
            print(f"iteration {it}: loss {loss.item():.4f} (" +
                  ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()) + ")", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    timed = args.iters - warmup
    elapsed = time.perf_counter() - start
    print(f"throughput: {timed * args.batch / elapsed:.2f} images/s over {timed} iterations "
          f"({elapsed / timed:.2f} s/iteration)")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory: {peak:.2f} GiB total, {peak / args.batch:.2f} GiB per image "
              f"({peak * 2**30 / 1e9 / args.batch:.2f} GB per image; target <= 24.9 GB)")
    print("NaN check: " + ("PASS (all losses finite)" if bad == 0 else f"FAIL ({bad} non-finite iterations)"))
    return 0 if bad == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--threads", type=int, default=1)
    cpu.add_argument("--repeats", type=int, default=3)
    cpu.add_argument("--quick", action="store_true", help="tiny recipe only (skip EVA-02-B)")
    tc = sub.add_parser("train-check")
    tc.add_argument("--device", default="cuda")
    tc.add_argument("--size", type=int, default=1024)
    tc.add_argument("--iters", type=int, default=20)
    tc.add_argument("--backbone", default="eva02_large")
    tc.add_argument("--batch", type=int, default=2)
    tc.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    tc.add_argument("--num-classes", type=int, default=1203)
    tc.add_argument("--boxes", type=int, default=20)
    tc.add_argument("--drop-path", type=float, default=0.4)
    tc.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    return bench_cpu(args) or 0 if args.mode == "cpu" else train_check(args)


if __name__ == "__main__":
    sys.exit(main())
