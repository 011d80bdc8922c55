"""Training-pipeline throughput on the real COCO photo (640x480, 6 polygon instances).

Measures, in one run and on the same thread budget:
  decode            PNG -> uint8 tensor (the baseline)
  decode+masks      the untransformed dataset sample (decode + 6 polygon rasterisations)
  train (LSJ 1024)  the training sample: decode + masks + flip + LSJ at 1024 (the issue's figure)
  weak+strong 1024  the semi-supervised pair: LSJ view + colour/grey/blur/erasing view
and prints images/s and each one's ratio to decode-only. One thread by default: DataLoader workers
run single-threaded, and that is how the pipeline runs in training.

    python benchmarks/bench_data.py [--iters 10] [--rounds 5] [--size 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from slsd_cli.data import transforms as T
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.images import load_image
from slsd_cli.data.lvis import load_annotations

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "coco_39769"


def rates(pipelines: list[tuple[str, callable]], iters: int, rounds: int) -> list[tuple[str, float]]:
    """Images/s of each pipeline: the median of `rounds` timed rounds of `iters` calls, the pipelines
    interleaved round by round so a noisy (shared) machine slows them alike."""
    for _, fn in pipelines:  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in pipelines}
    for _ in range(rounds):
        for name, fn in pipelines:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append(iters / (time.perf_counter() - start))
    return [(name, statistics.median(samples[name])) for name, _ in pipelines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as in a DataLoader worker)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    annotations = load_annotations(FIXTURE / "instances.json")
    image_path = annotations.image_file(annotations.image_ids[0], FIXTURE)
    plain = InstanceDataset(annotations, FIXTURE)
    train = InstanceDataset(annotations, FIXTURE, transform=T.lsj_transform(args.size))
    pair = InstanceDataset(annotations, FIXTURE, transform=T.WeakStrongTransform(args.size))

    results = rates([
        ("decode", lambda: load_image(image_path)),
        ("decode+masks", lambda: plain[0]),
        (f"train (LSJ {args.size})", lambda: train[0]),
        (f"weak+strong {args.size}", lambda: pair[0]),
    ], args.iters, args.rounds)
    base = results[0][1]
    print(f"image {image_path.name} 640x480, 6 instances; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.iters} calls")
    print(f"{'pipeline':<22}{'images/s':>10}{'ms/image':>10}{'vs decode':>11}")
    for name, r in results:
        print(f"{name:<22}{r:>10.1f}{1000 / r:>10.1f}{r / base:>10.2f}x")


if __name__ == "__main__":
    main()
