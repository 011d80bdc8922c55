"""Overhead of the signal rule and the output locks on training (issue 24), on the tiny recipe.

Two configurations of `engine.teacher.run` (what `slsd train-teacher synthetic_tiny` runs) on the same
synth data and seed, interleaved over the repeats (alternating order) so a busy machine slows them alike:

    bare      no signal handlers installed, no lock taken (`io.locks.acquire` a no-op)
    guarded   as the CLI runs it: `interrupts.handling()` installed, the run directory locked

Measured in the same run, in CPU seconds of `engine.trainer.train` per iteration (one thread, data
loading in the process; the CPU figure is the steady one on a shared machine), and wall seconds.
Printed: the medians, the overhead of `guarded` against `bare`, and two costs taken apart:
- the per-step signal check: the extra flag in the step's all-reduce (building a 2-element tensor,
  `.tolist()`) against the 1-element `.item()` it replaced, timed over 20000 calls, as a share of
  one step's CPU seconds;
- one lock: `acquire` + release (`flock` on a new lock file, its holder record written, removed),
  once per run, as a share of the run's CPU seconds.

    python benchmarks/bench_interrupts.py [--iterations 20] [--repeats 6] [--size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train_overhead import synth  # noqa: E402  (the same 16-image training set)


def _timed_train(clock: list[float]):
    """`engine.trainer.train` wrapped to add its CPU and wall seconds to `clock`."""
    from slsd_cli.engine import trainer

    real = trainer.train

    def train(*args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            clock[0] += time.process_time() - cpu
            clock[1] += time.perf_counter() - wall

    trainer.train = train
    return real


def run_once(mode: str, train_json: Path, work: Path, iterations: int, size: int, k: int) -> tuple[float, float]:
    """(CPU, wall) seconds of `trainer.train` for one run of `mode`."""
    from slsd_cli import interrupts, recipe as recipes
    from slsd_cli.engine import teacher, trainer
    from slsd_cli.io import locks

    recipe = recipes.load("synthetic_tiny", [f"data.image_size={size}", f"model.image_size={size}",
                                             "train.batch_per_process=2", "train.micro_batch=1",
                                             f"train.log_every={iterations}", "data.num_workers=0",
                                             f"train.iterations={iterations}", f"data.train_json={train_json}"])
    clock = [0.0, 0.0]
    real_train, real_acquire = _timed_train(clock), locks.acquire
    try:
        if mode == "bare":
            locks.acquire = lambda output: None
            teacher.run(recipe, work / f"{mode}{k}")
        else:
            with interrupts.handling():
                teacher.run(recipe, work / f"{mode}{k}")
    finally:
        trainer.train, locks.acquire = real_train, real_acquire
    return clock[0], clock[1]


def flag_cost(calls: int = 20000) -> tuple[float, float]:
    """CPU seconds per call of the step's reduction with the signal flag, and without (the old one)."""
    import torch

    from slsd_cli import distributed, interrupts

    bad = torch.zeros(())
    timings = []
    for with_flag in (True, False, True, False):
        start = time.process_time()
        for _ in range(calls):
            if with_flag:
                signalled = torch.tensor(0.0 if interrupts.pending() is None else 1.0, device=bad.device)
                distributed.all_reduce_sum(torch.stack([bad.reshape(()), signalled])).tolist()
            else:
                bool(distributed.all_reduce_sum(bad.reshape(1)).item() > 0)
        timings.append(((time.process_time() - start) / calls, with_flag))
    flagged = min(t for t, f in timings if f)
    plain = min(t for t, f in timings if not f)
    return flagged, plain


def lock_cost(work: Path, rounds: int = 2000) -> float:
    """CPU seconds of one lock acquire + release."""
    from slsd_cli.io import locks

    start = time.process_time()
    for i in range(rounds):
        with locks.scope():
            locks.acquire(work / f"run{i % 7}")
    return (time.process_time() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_json, _ = synth(work, args.size)
        results: dict[str, list[tuple[float, float]]] = {"bare": [], "guarded": []}
        run_once("bare", train_json, work, 2, args.size, -1)  # warm-up (imports, allocator)
        for k in range(args.repeats):
            for mode in (("bare", "guarded") if k % 2 == 0 else ("guarded", "bare")):
                results[mode].append(run_once(mode, train_json, work, args.iterations, args.size, k))
        flagged, plain = flag_cost()
        lock = lock_cost(work)
    per_iter = {m: (statistics.median(c for c, _ in r) / args.iterations,
                    statistics.median(w for _, w in r) / args.iterations) for m, r in results.items()}
    print(f"tiny teacher, {args.size}px, 2 images/iteration, {args.iterations} iterations x {args.repeats} repeats, "
          f"1 thread (torch {torch.__version__})")
    for mode, (cpu, wall) in per_iter.items():
        print(f"  {mode:8s} {cpu * 1e3:8.2f} ms CPU / iteration   {wall * 1e3:8.2f} ms wall / iteration")
    bare_cpu, guarded_cpu = per_iter["bare"][0], per_iter["guarded"][0]
    print(f"  guarded / bare (CPU per iteration): {guarded_cpu / bare_cpu:.4f}  "
          f"(overhead {100 * (guarded_cpu / bare_cpu - 1):+.2f} %, run-to-run noise included)")
    step = bare_cpu
    print(f"  signal check per step: {flagged * 1e6:.1f} us with the flag vs {plain * 1e6:.1f} us before "
          f"-> +{(flagged - plain) * 1e6:.1f} us = {(flagged - plain) / step * 1e6:.1f} us per CPU-second of training")
    run_cpu = step * args.iterations
    print(f"  one lock (acquire + release): {lock * 1e6:.1f} us once per run = {lock / run_cpu * 1e6:.2f} us per "
          f"CPU-second of a {args.iterations}-iteration run")


if __name__ == "__main__":
    main()
