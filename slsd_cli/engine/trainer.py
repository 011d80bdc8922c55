"""The one training loop of slsd: every phase (teacher, distillation) runs through `train()`.

Read `train()` top to bottom like nanoGPT's train.py: set up (optimizer, precision, resume), then a
plain `for iteration in range(start, total)` loop. What differs between phases lives behind a small,
explicit interface, `Phase`:

    class Phase(Protocol):
        def modules(self) -> dict[str, nn.Module]
            # Everything that is checkpointed, by name, e.g. {"model": det} (teacher) or
            # {"student": s, "teacher": ema} (distillation). Already on the training device.
        trainable: nn.Module
            # The module the optimizer updates (one of modules()). The trainer wraps it in DDP when
            # world size > 1 and passes the wrapped module back to `losses`; periodic evaluation
            # (engine.periodic_eval) runs its `predict`.
        def next_batch(self) -> Any
            # One *micro-batch* for this process (already on the device). The trainer calls it
            # `accumulation` times per iteration (= images per process / images per micro-batch);
            # use `engine.stream.StepLoader` for the data stream (repeat-factor sampling, exact resume).
        def losses(self, model: nn.Module, batch: Any) -> dict[str, Tensor]
            # Scalar losses of one micro-batch, called under autocast with the (DDP-wrapped)
            # trainable module. The trainer sums them (weights belong inside the phase), scales
            # by 1/accumulation, checks finiteness on every rank, and back-propagates.
        def after_step(self, iteration: int) -> None
            # After each *successful* optimizer step (EMA update of a teacher, ...).
        def log_stats(self) -> dict[str, float]
            # Extra scalars for metrics.jsonl since the last call (pseudo-labels per image, ...).
        def state_dict(self) -> dict
        def load_state_dict(self, state: dict) -> None
            # The phase's own resumable state, plain types and tensors only (checkpoints load
            # with weights_only=True); the data position is usually `loader.state_dict()`.
        def export(self, out_dir: Path) -> None
            # Write the shareable weights in the run-directory layout (slsd_cli.run_dir): RUN at the
            # end, RUN/best when periodic evaluation finds a better model. Called on rank 0 only.
        def close(self) -> None
            # Stop data workers (called by engine.launch once the run ends).
        categories: list[dict]
            # The exported model's categories (engine.launch checks the evaluation set against them).
        # optional: `find_unused_parameters: bool` (passed to DDP)

Engine API (this module):

    setup(phase, cfg, run_dir, dist, *, resume) -> Setup
        optimizer, precision and, with `resume` and RUN/ckpt/last.pt, the checkpoint loaded into the
        phase and the optimizer. An unfit checkpoint raises InputError here, before anything is written.
    train(phase, cfg, run_dir, dist, *, resume=False, recipe=None, evaluator=None, ready=None)
        -> TrainResult(run_dir, iterations, skipped, final_loss, images_per_s)
        raises NonFiniteLossError (an InputError: exit code 2) after train.max_nonfinite bad steps
    summary(result) -> the figures a command reports

Around it: engine.launch (validate inputs, prepare the run dir, train, for both phases),
engine.stream (the data stream), engine.seeding (derived seeds), engine.logbook (metrics.jsonl,
log.txt, console lines), engine.periodic_eval (eval.jsonl, RUN/best), engine.checkpoint,
engine.optim (AdamW groups, schedule), slsd_cli.run_dir (the run-directory layout).

Per iteration: lr from the schedule -> `accumulation` micro-batches (next_batch, seed, autocast
forward, backward; DDP syncs gradients on the last) -> unscale (fp16), clip, global non-finite check
(loss and gradient norm; one all-reduce) -> optimizer step or skip -> after_step -> log every
`train.log_every` -> evaluate every `eval.every` -> checkpoint every `train.checkpoint_every` and at
the end -> export on rank 0. SIGINT / SIGTERM (`slsd_cli.interrupts`) never cut an iteration: the
one-element non-finite all-reduce carries a second flag, "a rank received a signal", so every rank
completes the same iteration (its evaluation included), rank 0 checkpoints and all raise
`Interrupted` (exit 130 / 143); `--resume` then continues exactly as an unbroken run would.

What makes runs exact and world-size independent:
- The data stream (engine.stream) gives process r of W the global stream positions j*W + r, each
  sample's augmentation seeded from (seed, stream position); each micro-batch's model randomness
  (RPN/RoI sampling, drop path) is seeded from (seed, global micro-batch index), so one process with
  two images and two processes with one image each compute the same thing.
- Losses are averaged over micro-batches and processes, and DDP averages the gradients. With
  `train.micro_batch: 1` every micro-batch is one image, so this is the mean over the global batch
  of per-image losses whatever the number of processes (BatchNorm statistics too are per image);
  a larger micro-batch is faster, but normalises losses per micro-batch, hence per process.
- A checkpoint stores model(s), optimizer, grad scaler, iteration, phase/data position, the best
  evaluation so far and each rank's torch/numpy/python RNG states as plain tensors and lists
  (loadable with weights_only=True); it is written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from slsd_cli import distributed, interrupts
from slsd_cli import run_dir as runs
from slsd_cli.distributed import DistInfo
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.engine.logbook import TrainLog, format_terms, truncate_jsonl
from slsd_cli.engine.optim import build_optimizer, lr_factor, set_lr
from slsd_cli.engine.periodic_eval import PeriodicEval
from slsd_cli.engine.seeding import MODEL, sample_seed
from slsd_cli.errors import InputError
from slsd_cli.precision import amp_dtype
from slsd_cli.progress import info, warn


class Phase(Protocol):
    """See the module docstring."""

    trainable: nn.Module

    def modules(self) -> dict[str, nn.Module]: ...
    def next_batch(self) -> Any: ...
    def losses(self, model: nn.Module, batch: Any) -> dict[str, Tensor]: ...
    def after_step(self, iteration: int) -> None: ...
    def log_stats(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def export(self, out_dir: Path) -> None: ...
    def close(self) -> None: ...


class NonFiniteLossError(InputError):
    """Too many consecutive non-finite losses: the CLI prints one line and exits with code 2."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    iterations: int           # iterations of the run (all completed)
    skipped: int              # steps skipped for a non-finite loss or gradient
    final_loss: float | None  # mean total loss of the last logging window
    images_per_s: float       # global images per second over this process's run


def summary(result: TrainResult) -> dict[str, Any]:
    """The figures a command prints after a run (any phase)."""
    return {"run_dir": str(result.run_dir), "iterations": result.iterations, "skipped_steps": result.skipped,
            "final_loss": result.final_loss, "images_per_s": round(result.images_per_s, 2)}


@dataclasses.dataclass
class Counters:
    """The loop's own resumable state (besides modules, optimizer, data position and RNGs)."""

    iteration: int = 0      # iterations completed
    skipped: int = 0        # non-finite steps skipped
    consecutive: int = 0    # ... in a row, up to now
    elapsed: float = 0.0    # training seconds before this process started (resumed segments)


@dataclasses.dataclass
class Setup:
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    counters: Counters
    resumed: bool = False
    eval_state: dict = dataclasses.field(default_factory=dict)  # the best evaluation so far


# ------------------------------------------------------------------------------ the loop


def train(phase: Phase, cfg: Any, run_dir: str | Path, dist: DistInfo, *, resume: bool = False,
          recipe: dict | None = None, evaluator: PeriodicEval | None = None, ready: Setup | None = None
          ) -> TrainResult:
    """Run `phase` for `cfg.iterations` iterations (`cfg` is a `recipe.TrainConfig`), checkpointing
    into `run_dir`; `recipe` (a plain dict) is stored in the checkpoints for the record. `ready`
    is `setup(...)`'s result when the caller made it (else made here, with `resume`). Every process
    calls this; rank 0 alone writes files."""
    run_dir = Path(run_dir)
    ready = ready or setup(phase, cfg, run_dir, dist, resume=resume)
    state, start = ready.counters, ready.counters.iteration
    accumulation = cfg.batch_per_process // cfg.micro_batch
    images = cfg.batch_per_process * dist.world_size
    _start_logs(run_dir, dist, ready, evaluator)
    model = _wrap_ddp(phase, dist)
    log = TrainLog(run_dir, cfg, dist, start=start, elapsed=state.elapsed, resumed=ready.resumed)
    final_loss, last_bad, run_started = None, "", time.perf_counter()
    phase.trainable.train()
    # SIGINT / SIGTERM stop the loop after the iteration they arrive in (every rank alike: `_step`
    # sums the flag with its non-finite check), with a checkpoint: --resume continues from there
    with log, interrupts.polled():
        for iteration in range(start, cfg.iterations):
            started = time.perf_counter()
            lr = set_lr(ready.optimizer, lr_factor(iteration, cfg.iterations, cfg.schedule, cfg.warmup_iters,
                                                   cfg.warmup_factor, cfg.min_lr_ratio))
            losses, data_time = _forward_backward(phase, model, ready, cfg, dist, iteration, accumulation)
            grad_norm, bad, interrupted = _step(ready, cfg, losses)
            if bad is None:
                state.consecutive = 0
                if not ready.scaler.is_enabled() or bool(torch.isfinite(grad_norm)):  # fp16: not an overflow
                    phase.after_step(iteration)
                log.add(losses, grad_norm)
            else:
                state.skipped, state.consecutive = state.skipped + 1, state.consecutive + 1
                last_bad = format_terms(bad) or "non-finite gradient"
                log.skipped(iteration + 1, bad, float(grad_norm))
            state.iteration = done = iteration + 1
            log.tick(time.perf_counter() - started, data_time, images)
            stop = state.consecutive >= cfg.max_nonfinite

            # ---- log, evaluate, checkpoint
            if log.due(done) or stop:
                record = log.write(done, lr, phase.log_stats())
                final_loss = record["loss"] if record["loss"] is not None else final_loss
            log.advance(done)
            if evaluator is not None and evaluator.due(done, cfg.iterations) and not stop:
                evaluator.run(phase.trainable, phase.export, run_dir, done, log.stamp)
            if stop or interrupted or done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                _save_checkpoint(phase, ready, evaluator, run_dir, dist, cfg.keep_last, log.elapsed(), recipe)
            if interrupted and done < cfg.iterations:
                raise interrupts.Interrupted(
                    interrupts.take() or signal.SIGTERM,
                    f"stopped after iteration {done}/{cfg.iterations}, checkpoint saved in "
                    f"{runs.last_checkpoint(run_dir)}; continue with the same command and --resume")
            if stop:
                raise NonFiniteLossError(
                    f"{state.consecutive} consecutive non-finite losses (last at iteration {done}: {last_bad}); "
                    f"stopped. The weights before them are in {runs.last_checkpoint(run_dir)}: lower train.lr, "
                    "raise train.warmup_iters or use train.amp=bf16, then rerun with --resume", path=run_dir)

        if dist.is_main:
            phase.export(run_dir)
        distributed.barrier()
    seconds = time.perf_counter() - run_started
    run_images = (cfg.iterations - start) * images
    return TrainResult(run_dir=run_dir, iterations=cfg.iterations, skipped=state.skipped, final_loss=final_loss,
                       images_per_s=run_images / seconds if run_images else 0.0)


def _forward_backward(phase: Phase, model: nn.Module, ready: Setup, cfg: Any, dist: DistInfo, iteration: int,
                      accumulation: int) -> tuple[dict[str, Tensor], float]:
    """One iteration's micro-batches, forward and backward: (mean losses, seconds waiting for data)."""
    step_losses: dict[str, Tensor] = {}
    data_time = 0.0
    for k in range(accumulation):
        data_started = time.perf_counter()
        batch = phase.next_batch()
        data_time += time.perf_counter() - data_started
        # model randomness (proposal sampling, drop path) per global micro-batch index
        torch.manual_seed(sample_seed(cfg.seed, MODEL, (iteration * accumulation + k) * dist.world_size + dist.rank))
        sync = k == accumulation - 1 or dist.world_size == 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(dist.device.type, dtype=ready.dtype or torch.float32, enabled=ready.dtype is not None):
                losses = phase.losses(model, batch)
            ready.scaler.scale(sum(losses.values()) / accumulation).backward()
        for name, value in losses.items():
            step_losses[name] = step_losses.get(name, 0.0) + value.detach().float() / accumulation
    return step_losses, data_time


def _step(ready: Setup, cfg: Any, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, str] | None, bool]:
    """Clip and step, or skip the step on every rank alike when any rank's loss or gradient is not
    finite. Returns (gradient norm, None or {loss name: 'nan' / 'inf'} if skipped, whether any rank
    received SIGINT / SIGTERM: the same all-reduce carries both, so the ranks stop together)."""
    optimizer, scaler = ready.optimizer, ready.scaler
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if cfg.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = (~torch.isfinite(sum(losses.values()))).float()
    if not scaler.is_enabled():  # with fp16 the scaler handles overflowing gradients itself
        bad = bad + (~torch.isfinite(grad_norm)).float()
    signalled = torch.tensor(0.0 if interrupts.pending() is None else 1.0, device=bad.device)
    flags = distributed.all_reduce_sum(torch.stack([bad.reshape(()), signalled])).tolist()
    interrupted = flags[1] > 0
    if flags[0] > 0:
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()
        return grad_norm, {n: str(float(v)) for n, v in losses.items() if not math.isfinite(float(v))}, interrupted
    scaler.step(optimizer)  # with fp16, skips the update itself when gradients overflowed
    if scaler.is_enabled():
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, None, interrupted


# ------------------------------------------------------------------------------ set-up and checkpoints


def setup(phase: Phase, cfg: Any, run_dir: str | Path, dist: DistInfo, *, resume: bool) -> Setup:
    """Optimizer and precision for `phase`; with `resume` and a checkpoint in `run_dir`, its state
    loaded into the phase's modules, the optimizer, the scaler and the RNGs. Writes nothing: an
    unfit checkpoint raises InputError with the run untouched."""
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes (collate pads to data.image_size)
    optimizer = build_optimizer(phase.trainable, cfg.lr, cfg.weight_decay, cfg.layer_decay, tuple(cfg.betas))
    dtype = amp_dtype(cfg.amp, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    ready = Setup(optimizer, scaler, dtype, Counters())
    path = runs.last_checkpoint(run_dir)
    if resume and path.is_file():
        _restore(ready, phase, ckpt.load(path, map_location="cpu"), path, dist)
        if dist.is_main:
            info(f"resuming {run_dir} at iteration {ready.counters.iteration}/{cfg.iterations}")
    return ready


def _restore(ready: Setup, phase: Phase, state: dict, path: Path, dist: DistInfo) -> None:
    modules = phase.modules()
    if set(state["modules"]) != set(modules):
        raise InputError(f"checkpoint holds {sorted(state['modules'])}, this phase trains {sorted(modules)}",
                         path=path)
    try:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        ready.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"the checkpoint does not fit this recipe's model ({str(exc).splitlines()[0]})",
                         path=path) from exc
    if state.get("scaler") and ready.scaler.is_enabled():
        ready.scaler.load_state_dict(state["scaler"])
    phase.load_state_dict(state["phase"])
    trainer = state["trainer"]
    ready.counters = Counters(int(state["iteration"]), int(trainer["skipped"]),
                              int(trainer["consecutive_nonfinite"]), float(trainer.get("elapsed", 0.0)))
    ready.eval_state = dict(trainer.get("eval") or {})
    ready.resumed = True
    rng = state["rng"]
    if len(rng) == dist.world_size:
        ckpt.set_rng_state(rng[dist.rank])
    elif dist.is_main:
        warn(f"resuming with {dist.world_size} processes from a checkpoint of {len(rng)}: RNG states not restored")


def _start_logs(run_dir: Path, dist: DistInfo, ready: Setup, evaluator: PeriodicEval | None) -> None:
    """Restore the best evaluation so far; on rank 0 remove a dead writer's temporary files and cut
    eval.jsonl back to the checkpoint (a fresh run starts it afresh)."""
    if evaluator is not None:
        evaluator.load_state_dict(ready.eval_state)
    if dist.is_main:
        ckpt.remove_stale_temps(runs.last_checkpoint(run_dir))
        if ready.resumed:
            truncate_jsonl(runs.eval_path(run_dir), ready.counters.iteration)
        else:
            runs.eval_path(run_dir).unlink(missing_ok=True)


def _wrap_ddp(phase: Phase, dist: DistInfo) -> nn.Module:
    if dist.world_size == 1:
        return phase.trainable
    return nn.parallel.DistributedDataParallel(
        phase.trainable, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=bool(getattr(phase, "find_unused_parameters", False)))


def _save_checkpoint(phase: Phase, ready: Setup, evaluator: PeriodicEval | None, run_dir: Path, dist: DistInfo,
                     keep_last: int, elapsed: float, recipe: dict | None) -> None:
    """RUN/ckpt/last.pt (rank 0; every rank contributes its RNG state), and with `keep_last` N a
    kept copy ckpt/iter_<iteration, 7 digits>.pt of which the newest N stay."""
    rngs = _gather_objects(ckpt.rng_state(), dist.world_size)
    if not dist.is_main:
        return
    counters, path = ready.counters, runs.last_checkpoint(run_dir)
    ckpt.save({"iteration": counters.iteration, "world_size": dist.world_size, "recipe": recipe or {},
               "modules": {name: m.state_dict() for name, m in phase.modules().items()},
               "optimizer": ready.optimizer.state_dict(),
               "scaler": ready.scaler.state_dict() if ready.scaler.is_enabled() else None,
               "phase": phase.state_dict(),
               "trainer": {"skipped": counters.skipped, "consecutive_nonfinite": counters.consecutive,
                           "elapsed": elapsed, "eval": evaluator.state_dict() if evaluator is not None else {}},
               "rng": rngs}, path)
    if keep_last > 0:
        ckpt.keep_copy(path, runs.periodic_checkpoint(run_dir, counters.iteration))
        for _, old in runs.periodic_checkpoints(run_dir)[:-keep_last]:
            old.unlink()


def _gather_objects(obj: Any, world: int) -> list:
    if world == 1 or not distributed.is_distributed():
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
