"""Overhead of training-time logging and periodic evaluation (issue 13), on the tiny recipe.

Three configurations of `slsd train-teacher synthetic_tiny` on the same synth data and seed,
interleaved over the repeats (in rotating order) so that a busy machine slows them alike:

    base   train.log_every = iterations (one log record), eval.every = 0
    log    train.log_every = 1 (a metrics record, a log.txt line and a stderr line every iteration)
    eval   train.log_every = 1 and eval.every = iterations / 2 over a small held-out set

Training images/s = images / (seconds in `engine.trainer.train` - seconds in `PeriodicEval.run`):
the whole loop with its logging, checkpoint and export, the evaluations themselves (inference and
scoring) excluded as the issue asks. Both wall-clock and CPU seconds (one thread, data loading in
the process) are measured: on a machine shared with other jobs the CPU figure is the steadier one.
Printed: the median of each configuration and the overhead of `log` and `eval` against `base` in
the same run (goal: <= 2%).

    python benchmarks/bench_train_overhead.py [--iterations 20] [--repeats 6] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synth(work: Path, size: int) -> tuple[Path, Path]:
    """A 16-image training set and an 8-image held-out set of the synth benchmark."""
    from slsd_cli.data.lvis import recount_categories
    from slsd_cli.data.synthetic import generate

    root = work / "synth"
    generate(root, classes=4, train_images=255, val_images=20, pool_images=1, image_size=size, seed=0)
    for name, count, out in (("train.json", 16, "train16.json"), ("val.json", 8, "val8.json")):
        data = json.loads((root / name).read_text())
        keep = set(sorted({a["image_id"] for a in data["annotations"]})[:count])
        subset = recount_categories({**data, "images": [i for i in data["images"] if i["id"] in keep],
                                     "annotations": [a for a in data["annotations"] if a["image_id"] in keep]})
        (root / out).write_text(json.dumps(subset))
    return root / "train16.json", root / "val8.json"


class Clock:
    """Wall and CPU seconds of `trainer.train` and of `PeriodicEval.run` within it (wrapped)."""

    def __init__(self) -> None:
        from slsd_cli.engine import periodic_eval, trainer

        self.train = [0.0, 0.0]
        self.eval = [0.0, 0.0]
        self.evals = 0
        for owner, name, slot in ((trainer, "train", self.train), (periodic_eval.PeriodicEval, "run", self.eval)):
            setattr(owner, name, self._timed(getattr(owner, name), slot, count=slot is self.eval))

    def _timed(self, fn, slot: list[float], count: bool):
        clock = self

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                slot[0] += time.perf_counter() - wall
                slot[1] += time.process_time() - cpu
                clock.evals += count
        return timed

    def reset(self) -> None:
        self.train[:] = [0.0, 0.0]
        self.eval[:] = [0.0, 0.0]
        self.evals = 0


def run(config: str, train: Path, val: Path, out: Path, iterations: int, size: int, clock: Clock) -> dict:
    from slsd_cli.cli import main

    extra = {"base": [f"train.log_every={iterations}"],
             "log": ["train.log_every=1"],
             "eval": ["train.log_every=1", f"eval.every={iterations // 2}", f"eval.annotations={val}",
                      "eval.metric=bbox/AP", "eval.max_dets=100"]}[config]
    args = ["train-teacher", "synthetic_tiny", f"data.image_size={size}", f"model.image_size={size}",
            "train.batch_per_process=2", "train.micro_batch=2", "train.warmup_iters=2", "data.num_workers=0",
            "train.checkpoint_every=100000", *extra, "--train-json", str(train), "--iterations", str(iterations),
            "--out-dir", str(out), "--force"]
    clock.reset()
    if main(args) != 0:
        raise SystemExit(f"{config}: training failed")
    images = iterations * 2
    return {"images_per_s": images / (clock.train[0] - clock.eval[0]),
            "images_per_cpu_s": images / (clock.train[1] - clock.eval[1]),
            "eval_s": clock.eval[0], "evals": clock.evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="slsd_bench_overhead_"))
    train, val = synth(work, args.size)
    clock = Clock()
    figures: dict[str, list[dict]] = {"base": [], "log": [], "eval": []}
    names = list(figures)
    for repeat in range(args.repeats):
        for config in names[repeat % 3:] + names[:repeat % 3]:  # each configuration takes each slot in turn
            figures[config].append(run(config, train, val, work / config, args.iterations, args.size, clock))
            print(f"repeat {repeat + 1} {config}: {figures[config][-1]}", file=sys.stderr, flush=True)
    print(f"\ntiny recipe, {args.size} px, {args.iterations} iterations x 2 images, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved repeats:")
    for key, unit in (("images_per_s", "images/s (wall)"), ("images_per_cpu_s", "images/CPU-s")):
        median = {c: statistics.median(r[key] for r in runs) for c, runs in figures.items()}
        for config in figures:
            overhead = 100 * (median["base"] / median[config] - 1)
            eval_s = statistics.median(r["eval_s"] for r in figures[config])
            extra = f"  ({figures[config][0]['evals']} evaluations, median {eval_s:.1f} s, excluded)" \
                if config == "eval" else ""
            print(f"  {config:5s} {median[config]:7.3f} training {unit:16s} overhead vs base {overhead:+.2f}%{extra}")


if __name__ == "__main__":
    main()
