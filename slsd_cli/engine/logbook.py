"""What a training run reports while it runs, and where.

`TrainLog(run_dir, cfg, dist, start=, elapsed=, resumed=)` (a context manager; every process makes one)
    .tick(step_s, data_s, images)   after every iteration (timings of the log window)
    .add(losses, grad_norm)         after every successful optimizer step (loss sums of the window)
    .skipped(iteration, terms, norm) a step skipped for a non-finite loss or gradient
    .due(done) / .write(done, lr, extra) -> record   a log window's record (all ranks: reduces losses)
    .elapsed()                      seconds of training so far, over every resumed segment
and `append_json(path, record)`, `truncate_jsonl(path, iteration)` for the run's jsonl logs.

Files (rank 0):
- RUN/metrics.jsonl: one json record per log window {"iter", "loss", "losses": {name: mean},
  "grad_norm", "lr", "images_per_s", "data_time_share", "step_s", ["max_mem_gib" on CUDA],
  the phase's `log_stats()`, "time" (unix seconds), "elapsed" (training seconds)}, and one
  {"iter", "event": "nonfinite", ...} per skipped step. On resume, records after the checkpoint
  are cut (they are about to be redone).
- RUN/log.txt: one plain line per log window (iteration/total, losses, lr, img/s, data-wait share,
  elapsed, ETA, CUDA memory), appended across resumes. The same lines go to stderr when stderr is
  not a terminal (batch jobs, nohup); on a terminal a progress bar shows them instead.
- RUN/tensorboard/ with `train.tensorboard`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slsd_cli import distributed
from slsd_cli import run_dir as runs
from slsd_cli.distributed import DistInfo
from slsd_cli.io import append_text, atomic_write_text, make_dirs
from slsd_cli.progress import duration, progress, warn


class Window:
    """Loss sums and timings between two log lines; `flush` reduces them over processes."""

    def __init__(self) -> None:
        self.losses: dict[str, Tensor] = {}
        self.steps = 0
        self.grad_norm: Tensor | float = 0.0
        self.finite_norms: Tensor | float = 0.0
        self.step_time = self.data_time = 0.0
        self.images = self.ticks = 0

    def add(self, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value
        # with fp16 an overflowing step (skipped by the grad scaler) has an infinite norm: not averaged
        finite = torch.isfinite(grad_norm)
        self.grad_norm = self.grad_norm + torch.where(finite, grad_norm.detach().float(), 0.0)
        self.finite_norms = self.finite_norms + finite.float()
        self.steps += 1

    def tick(self, step_time: float, data_time: float, images: int) -> None:
        self.step_time += step_time
        self.data_time += data_time
        self.images += images
        self.ticks += 1

    def flush(self, world: int) -> dict:
        names = sorted(self.losses)
        record: dict[str, Any] = {}
        if names and self.steps:
            device = self.losses[names[0]].device
            values = torch.stack([torch.as_tensor(self.losses[n], device=device) for n in names])
            values = distributed.all_reduce_sum(values) / (world * self.steps)
            terms = {n: float(v) for n, v in zip(names, values.tolist())}
            record["loss"] = sum(terms.values())
            record["losses"] = terms
            norms = float(self.finite_norms)
            record["grad_norm"] = float(self.grad_norm) / norms if norms else None
        else:
            record["loss"] = None
        record["images_per_s"] = self.images / self.step_time if self.step_time > 0 else None
        record["data_time_share"] = self.data_time / self.step_time if self.step_time > 0 else None
        record["step_s"] = self.step_time / max(self.ticks, 1)
        self.__init__()
        return record


class TrainLog:
    """See the module docstring."""

    def __init__(self, run_dir: Path, cfg: Any, dist: DistInfo, *, start: int, elapsed: float, resumed: bool):
        self.metrics_file, self.log_file = runs.metrics_path(run_dir), run_dir / runs.LOG
        self.total, self.start, self.log_every = cfg.iterations, start, cfg.log_every
        self.dist, self.window = dist, Window()
        self.elapsed_before, self.started = elapsed, time.perf_counter()
        self.plain = not sys.stderr.isatty()
        self.writer = None
        if dist.is_main:
            if resumed:
                truncate_jsonl(self.metrics_file, start)
            else:
                self.metrics_file.unlink(missing_ok=True)
                self.log_file.unlink(missing_ok=True)
            if cfg.tensorboard:
                self.writer = _tensorboard(run_dir / runs.TENSORBOARD)

    def __enter__(self) -> TrainLog:
        self._bar = progress(lines=False)  # batch jobs: `write` prints the richer training lines
        self._bar.__enter__()
        self._task = self._bar.add_task("train", total=self.total, completed=self.start, status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)
        if self.writer is not None:
            self.writer.close()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def tick(self, step_time: float, data_time: float, images: int) -> None:
        self.window.tick(step_time, data_time, images)

    def add(self, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
        self.window.add(losses, grad_norm)

    def skipped(self, iteration: int, terms: dict[str, str], grad_norm: float) -> None:
        if self.dist.is_main:
            warn(f"iteration {iteration}: non-finite loss or gradient "
                 f"({format_terms(terms) or 'gradient norm ' + str(grad_norm)}); step skipped")
            append_json(self.metrics_file, {"iter": iteration, "event": "nonfinite", "skipped": True,
                                            "nonfinite": terms,
                                            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                                            **self.stamp()})

    def stamp(self) -> dict[str, float]:
        """{"time": unix seconds, "elapsed": training seconds}: every jsonl record carries them."""
        return {"time": round(time.time(), 3), "elapsed": round(self.elapsed(), 3)}

    def due(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total

    def write(self, done: int, lr: float, extra: dict[str, Any]) -> dict[str, Any]:
        """The record of the window ending at iteration `done` (every rank calls this)."""
        record = self.window.flush(self.dist.world_size)
        record.update({"iter": done, "lr": lr, **extra})
        if self.dist.device.type == "cuda":
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        record.update(self.stamp())
        if self.dist.is_main:
            append_json(self.metrics_file, record)
            if self.writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key not in ("iter", "time"):
                        self.writer.add_scalar(key, value, done)
            line = self.line(record)
            append_text(self.log_file, line + "\n")
            if self.plain:
                print(line, file=sys.stderr, flush=True)
            self._bar.update(self._task, status=_status(record))
        return record

    def advance(self, done: int) -> None:
        self._bar.update(self._task, completed=done)

    def line(self, record: dict[str, Any]) -> str:
        """'2026-01-02 03:04:05 iter 120/30000 loss 1.2345 (rpn_cls 0.1, ...) lr 4.00e-05 ...'"""
        done = record["iter"]
        session = time.perf_counter() - self.started
        eta = session / (done - self.start) * (self.total - done) if done > self.start else None
        parts = [datetime.fromtimestamp(record["time"]).strftime("%Y-%m-%d %H:%M:%S"),
                 f"iter {done}/{self.total}"]
        if record.get("loss") is not None:
            terms = ", ".join(f"{n} {v:.4f}" for n, v in record["losses"].items())
            parts.append(f"loss {record['loss']:.4f} ({terms})")
        else:
            parts.append("loss n/a (every step skipped)")
        parts.append(f"lr {record['lr']:.3e}")
        if record.get("images_per_s") is not None:
            parts.append(f"{record['images_per_s']:.2f} img/s")
        if record.get("data_time_share") is not None:
            parts.append(f"data {100 * record['data_time_share']:.0f}%")
        parts.append(f"elapsed {duration(record['elapsed'])}")
        parts.append(f"eta {duration(eta) if eta is not None else 'n/a'}")
        if "max_mem_gib" in record:
            parts.append(f"mem {record['max_mem_gib']:.1f} GiB")
        return "  ".join(parts)


def _status(record: dict) -> str:
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.1f} img/s")
    return "  ".join(parts)


def format_terms(terms: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in terms.items())


def append_json(path: Path, record: dict) -> None:
    """One json line appended (never through a symbolic link; disk full: the one-line error)."""
    make_dirs(path.parent)
    append_text(path, json.dumps(record, allow_nan=False) + "\n")


def truncate_jsonl(path: Path, iteration: int) -> None:
    """Keep the records up to the resumed iteration (later ones are about to be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("iter", 0) <= iteration:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("train.tensorboard is on but tensorboard is not installed (pip install 'slsd[tensorboard]'); "
             "metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(log_dir))
