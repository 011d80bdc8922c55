"""Distillation step cost against a supervised step (issue 7): goal <= 1.6x.

The tiny recipe on the CPU, in one process, in the same run and on the same synth data:

- supervised: `synthetic_tiny` (the teacher phase), 4 labeled images per step in one forward;
- distill: `synthetic_tiny_distill`, 2 labeled + 2 unlabeled images per step in one student forward,
  plus the EMA teacher's inference on the 2 weak views, pseudo-label building and the EMA update;
- reference: the supervised phase at 2 labeled images per step.

"The same per-process batch" is read as the same number of images through the student per step
(4 = 2 + 2); the ratio against 2 labeled images is printed too. Both phases run through the one
training loop (`engine.trainer.train`); a step is timed from one `next_batch` call to the next
(data loading, forward, backward, optimiser, EMA, logging), as wall and as CPU seconds (robust to
other processes' load: use `--threads 1`, the default), the median over the steps after `--warmup`. The runs alternate (supervised, distill,
reference, supervised, ...) for `--rounds` rounds so that load from other processes hits all alike.

The teacher is the tiny detector at random init with its classifier biased towards one class, so
that every unlabeled image gets `--pseudo-labels` pseudo-labels (a trained teacher's typical count on
these images); a random-init teacher would find none and make distillation look cheaper than it is.
The distill step is broken down into teacher inference + pseudo-labels, and the EMA update.

    python benchmarks/bench_distill.py [--iterations 12] [--rounds 2] [--threads 1] [--work /tmp/slsd_bench_distill]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(work: Path, pseudo_labels: int) -> dict:
    import torch

    from slsd_cli import recipe as recipes
    from slsd_cli.typed_yaml import to_dict
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.data.synthetic import generate
    from slsd_cli.model.weights import build_detector, save_detector

    data = work / "synth"
    if not (data / "pool.json").exists():
        generate(data, classes=10, train_images=255, val_images=50, pool_images=64, image_size=128, seed=0,
                 force=True)
    train_json = data / "train.json"
    recipe = recipes.load("synthetic_tiny", [f"data.train_json={train_json}"])
    annotations = load_annotations(train_json)
    torch.manual_seed(0)
    teacher = build_detector(recipe.model, annotations.categories)
    with torch.no_grad():
        for stage in teacher.roi_heads.stages:
            stage.cls_score.bias[0] = 3.0
    save_detector(teacher, work / "teacher", annotations.categories, recipe.model,
                  extra={"phase": "teacher", "recipe": to_dict(recipe)})
    return {"train_json": train_json, "pool": data / "pool.json", "teacher": work / "teacher",
            "pseudo_labels": pseudo_labels}


def steady(run: Path, warmup: int) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "step_s" in x][warmup:]
    out = {"step_s": statistics.median(x["step_s"] for x in lines), "steps": len(lines)}
    if lines and "pl_per_image" in lines[0]:
        out["pl_per_image"] = statistics.mean(x["pl_per_image"] for x in lines)
    return out


def run_supervised(setup: dict, out: Path, batch: int, iterations: int) -> None:
    from slsd_cli import recipe as recipes
    from slsd_cli.engine import teacher

    recipe = recipes.load("synthetic_tiny", [
        f"data.train_json={setup['train_json']}", f"train.iterations={iterations}",
        f"train.batch_per_process={batch}", f"train.micro_batch={batch}", "train.log_every=1",
        "train.checkpoint_every=100000"])
    teacher.run(recipe, out, force=True)


def run_distill(setup: dict, out: Path, iterations: int) -> None:
    from slsd_cli import recipe as recipes
    from slsd_cli.engine import distill

    recipe = recipes.load("synthetic_tiny_distill", [
        f"distill.teacher={setup['teacher']}", f"distill.unlabeled={setup['pool']}", "distill.lam=0",
        f"model.max_detections={setup['pseudo_labels']}", f"train.iterations={iterations}",
        "train.batch_per_process=2", "train.micro_batch=2", "train.log_every=1", "train.checkpoint_every=100000"])
    distill.run(recipe, out, force=True)


class Timers:
    """Per-step wall and CPU seconds of both phases (step boundaries = `next_batch` calls, one per step
    as each step is one micro-batch), and the distill phase's extra work (teacher inference +
    pseudo-labels, EMA update)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []
        self.extra = {"teacher_and_pseudo_labels": [], "ema_update": []}

    def steps(self, warmup: int) -> tuple[float, float]:
        """Median (wall, cpu) seconds per step after `warmup` steps, then reset."""
        deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])][warmup:]
        self.marks = []
        return statistics.median(d[0] for d in deltas), statistics.median(d[1] for d in deltas)

    def install(self) -> None:
        from slsd_cli.engine.distill import DistillPhase
        from slsd_cli.engine.teacher import TeacherPhase

        timers = self

        def marking(method):
            def wrapped(self, *a):
                timers.marks.append((time.perf_counter(), time.process_time()))
                return method(self, *a)
            return wrapped

        def timed(name, method):
            def wrapped(self, *a):
                started = time.perf_counter()
                try:
                    return method(self, *a)
                finally:
                    timers.extra[name].append(time.perf_counter() - started)
            return wrapped

        TeacherPhase.next_batch = marking(TeacherPhase.next_batch)
        DistillPhase.next_batch = marking(DistillPhase.next_batch)
        DistillPhase.pseudo_labels = timed("teacher_and_pseudo_labels", DistillPhase.pseudo_labels)
        DistillPhase.after_step = timed("ema_update", DistillPhase.after_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first iterations of each run left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pseudo-labels", type=int, default=4, help="pseudo-labels per unlabeled image")
    parser.add_argument("--work", default="/tmp/slsd_bench_distill")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time per step stays meaningful on a shared machine)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare(work, args.pseudo_labels)
    timers = Timers()
    timers.install()
    print(f"tiny recipe (ResNet-18-FPN, 128 px) on CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"thread(s), load average {os.getloadavg()[0]:.1f} at start; {args.iterations} iterations per run "
          f"(first {args.warmup} left out), {args.rounds} round(s)")
    names = ("supervised 4", "distill 2+2", "supervised 2")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    pl = []
    for r in range(args.rounds):
        for name in names:
            if name == "distill 2+2":
                run_distill(setup, work / "distill", args.iterations)
                pl.append(steady(work / "distill", args.warmup).get("pl_per_image", 0.0))
            else:
                run_supervised(setup, work / "sup", int(name[-1]), args.iterations)
            w, c = timers.steps(args.warmup)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"round {r + 1}: " + ", ".join(f"{k} {wall[k][-1]:.3f} s wall / {cpu[k][-1]:.3f} s CPU per step"
                                             for k in names) + f" (load {os.getloadavg()[0]:.1f})")
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    teacher_s = statistics.median(timers.extra["teacher_and_pseudo_labels"])
    ema_s = statistics.median(timers.extra["ema_update"])
    print()
    print(f"{'':42s}{'wall s/step':>12s}{'CPU s/step':>12s}")
    print(f"{'supervised, 4 labeled images/step':42s}{w[names[0]]:12.3f}{c[names[0]]:12.3f}")
    print(f"{'distill, 2 labeled + 2 unlabeled/step':42s}{w[names[1]]:12.3f}{c[names[1]]:12.3f}"
          f"   ({statistics.mean(pl):.1f} pseudo-labels per unlabeled image)")
    print(f"{'supervised, 2 labeled images/step':42s}{w[names[2]]:12.3f}{c[names[2]]:12.3f}")
    print(f"  in a distill step (median wall): teacher inference + pseudo-labels {teacher_s:.3f} s "
          f"({teacher_s / w[names[1]]:.0%}), EMA update {ema_s * 1000:.1f} ms ({ema_s / w[names[1]]:.1%})")
    print()
    print(f"RATIO distill / supervised, same images per step (2+2 vs 4): {w[names[1]] / w[names[0]]:.2f}x wall, "
          f"{c[names[1]] / c[names[0]]:.2f}x CPU  (goal <= 1.6x)")
    print(f"ratio distill / supervised, same labeled images per step (2+2 vs 2): "
          f"{w[names[1]] / w[names[2]]:.2f}x wall, {c[names[1]] / c[names[2]]:.2f}x CPU")


if __name__ == "__main__":
    main()
