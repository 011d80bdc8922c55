"""Training-engine benchmarks (issue 5).

cpu       Images/s of the tiny recipe (synthetic_tiny: ResNet-18-FPN, 128 px) on the CPU with one
          process (batch 4; all cores' threads, then one thread) against two torchrun processes
          (2 + 2 images, one thread each) in the same run, on the same synth data. Figures are the mean over the log
          windows after the first (warm-up).

              python benchmarks/bench_train.py cpu [--iterations 20] [--work /tmp/slsd_bench_train]

gpu-check The EVA-02-L teacher (recipe lvis_eva02_L_teacher, random init) at 1024 px, bf16, batch 2,
          for 50 iterations on synth images upscaled by LSJ: images/s, peak GPU memory and the share
          of step time spent waiting for data (goal < 5%). `benchmarks/gpu_train_check.sh` runs it;
          `--smoke` runs the same code on the CPU with a tiny EVA in seconds.

              python benchmarks/bench_train.py gpu-check [--smoke] [--iterations 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synth_data(work: Path, image_size: int, classes: int, train_images: int) -> Path:
    from slsd_cli.data.synthetic import generate

    root = work / f"synth_{image_size}_{classes}_{train_images}"
    if not (root / "train.json").exists():
        generate(root, classes=classes, train_images=train_images, val_images=max(5 * classes, 20), pool_images=1,
                 image_size=image_size, seed=0, force=True)
    return root / "train.json"


def window_stats(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "event" not in x]
    steady = lines[1:] or lines  # the first window holds the warm-up
    out = {"images_per_s": statistics.mean(x["images_per_s"] for x in steady),
           "step_s": statistics.mean(x["step_s"] for x in steady),
           "data_time_share": statistics.mean(x["data_time_share"] for x in steady),
           "final_loss": lines[-1]["loss"], "windows": len(steady)}
    if "max_mem_gib" in lines[-1]:
        out["max_mem_gib"] = max(x.get("max_mem_gib", 0.0) for x in lines)
    return out


# ------------------------------------------------------------------------------ cpu


def cpu(args: argparse.Namespace) -> None:
    work = Path(args.work)
    train_json = synth_data(work, 128, 10, 255)
    cores = os.cpu_count() or 1
    common = ["train-teacher", "synthetic_tiny", "--train-json", str(train_json), "--iterations",
              str(args.iterations), f"train.log_every={args.log_every}", "train.checkpoint_every=100000",
              "--force"]
    runs = {
        f"1 process, batch 4, {cores} threads": (
            [sys.executable, "-m", "slsd_cli.cli", *common, "--out-dir", str(work / "run1"),
             "train.batch_per_process=4", "train.micro_batch=4"], {"OMP_NUM_THREADS": str(cores)}, work / "run1"),
        "1 process, batch 4, 1 thread": (
            [sys.executable, "-m", "slsd_cli.cli", *common, "--out-dir", str(work / "run1t"),
             "train.batch_per_process=4", "train.micro_batch=4"], {"OMP_NUM_THREADS": "1"}, work / "run1t"),
        "2 processes (torchrun, gloo), 2 + 2 images, 1 thread each": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
             "slsd_cli.cli", *common, "--out-dir", str(work / "run2"), "train.batch_per_process=2",
             "train.micro_batch=2"], {"OMP_NUM_THREADS": "1"}, work / "run2"),
    }
    print(f"tiny recipe on CPU ({cores} cores, load average {os.getloadavg()[0]:.1f} at start), "
          f"{args.iterations} iterations of 4 images, 128 px")
    results = {}
    for name, (cmd, env, run) in runs.items():
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stats = window_stats(run)
        results[name] = stats
        print(f"  {name}: {stats['images_per_s']:.2f} images/s, {stats['step_s']:.2f} s/step, data "
              f"{100 * stats['data_time_share']:.1f}% of step time (wall {time.perf_counter() - started:.0f} s "
              f"incl. start-up)")
    one, one_thread, two = results.values()
    print(f"  2 processes / 1 process ({cores} threads): {two['images_per_s'] / one['images_per_s']:.2f}x images/s; "
          f"2 processes / 1 process (1 thread): {two['images_per_s'] / one_thread['images_per_s']:.2f}x")
    print(f"  load average at end: {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------------------ gpu check


TINY_EVA = ["model.backbone=eva02_tiny", "model.image_size=128", "model.window_size=4", "model.global_blocks=[1,3]",
            "model.vit_embed_dim=64", "model.vit_depth=4", "model.vit_num_heads=2", "model.fpn_channels=32",
            "model.anchor_sizes=[16,32,64,128,256]", "model.rpn_post_nms_topk_train=128",
            "model.rois_per_image=32", "model.box_head_conv_dim=32", "model.box_head_fc_dim=64",
            "model.mask_head_channels=32", "data.image_size=128", "train.amp=fp32", "train.device=cpu",
            "data.num_workers=2"]


def gpu_check(args: argparse.Namespace) -> None:
    import torch

    from slsd_cli import recipe as recipes
    from slsd_cli.engine import teacher

    work = Path(args.work)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs CUDA (use --smoke for a CPU run of the same code)")
    train_json = synth_data(work, 64 if smoke else 256, 10 if smoke else 40, 255 if smoke else 500)
    overrides = [f"data.train_json={train_json}", "model.pretrained=false", "smoothing.mode=uniform",
                 f"train.iterations={args.iterations}", "train.warmup_iters=10", f"train.log_every={args.log_every}",
                 "train.checkpoint_every=100000", f"data.num_workers={args.workers}"]
    if smoke:
        overrides += TINY_EVA
    recipe = recipes.load("lvis_eva02_L_teacher", overrides)
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"{recipe.model.backbone} at {recipe.data.image_size}px, batch {recipe.train.batch_per_process} "
          f"(micro-batch {recipe.train.micro_batch}), amp {recipe.train.amp}, {recipe.train.iterations} iterations, "
          f"{recipe.data.num_workers} loader workers, synth images from {train_json.parent}")
    started = time.perf_counter()
    result = teacher.run(recipe, work / "run", force=True)
    wall = time.perf_counter() - started
    stats = window_stats(work / "run")
    print(f"images/s (after the first {args.log_every}-iteration window): {stats['images_per_s']:.2f}")
    print(f"step time: {stats['step_s']:.3f} s; waiting for data: {100 * stats['data_time_share']:.2f}% "
          f"of step time (goal < 5%)")
    if "max_mem_gib" in stats:
        print(f"peak GPU memory (allocated): {stats['max_mem_gib']:.2f} GiB "
              f"({stats['max_mem_gib'] / recipe.train.batch_per_process:.2f} GiB per image)")
    print(f"final loss {stats['final_loss']:.4f}; skipped steps {result.skipped}; wall {wall:.0f} s "
          "(model build, data, final checkpoint and export included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--work", default="/tmp/slsd_bench_train")
    p = sub.add_parser("gpu-check")
    p.add_argument("--smoke", action="store_true", help="tiny EVA on the CPU, a few iterations")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--work", default="/tmp/slsd_gpu_train_check")
    args = parser.parse_args()
    if args.cmd == "gpu-check" and args.smoke and args.iterations == 50:
        args.iterations, args.log_every = 4, 2
    {"cpu": cpu, "gpu-check": gpu_check}[args.cmd](args)


if __name__ == "__main__":
    main()
