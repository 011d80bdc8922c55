"""The one training loop of slsd: every phase (teacher, distillation) runs through `train()`.

Read it top to bottom like nanoGPT's train.py: set up (devices, optimizer, resume), then a plain
`for iteration in range(start, total)` loop. What differs between phases lives behind a small,
explicit interface, `Phase`:

    class Phase(Protocol):
        def modules(self) -> dict[str, nn.Module]
            # Everything that is checkpointed, by name, e.g. {"model": det} (teacher) or
            # {"student": s, "teacher": ema} (distillation). Already on the training device.
        trainable: nn.Module
            # The module the optimizer updates (one of modules()). The trainer wraps it in DDP when
            # world size > 1 and passes the wrapped module back to `losses`.
        def next_batch(self) -> Any
            # One *micro-batch* for this process (already on the device). The trainer calls it
            # `accumulation` times per iteration (= images per process / images per micro-batch);
            # use `StepLoader` below for the data stream (repeat-factor sampling, exact resume).
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
        def export(self, run_dir: Path) -> None
            # Write the final shareable weights (RUN/model.safetensors + RUN/model.json via
            # model.weights.save_detector). Called on rank 0 only, at the end.
        # optional: `find_unused_parameters: bool` (passed to DDP), `close()` (stop data workers;
        # called by `train_recipe` once the run ends).

    The model's own randomness (proposal sampling, drop path) needs nothing from a phase: the
    trainer seeds torch before every micro-batch.

Engine API (this module):

    train(phase, cfg: recipe.TrainConfig, run_dir, dist: DistInfo, *, resume=False, recipe=None)
        -> TrainResult(run_dir, iterations, skipped, final_loss, images_per_s)
        raises NonFiniteLossError (an InputError: exit code 2) after train.max_nonfinite bad steps
    train_recipe(phase, recipe, run_dir, dist, *, resume) -> train() with a whole Recipe, then phase.close()
    summary(result) -> the figures a command reports
    StepLoader(dataset, collate, *, seed, rank, world_size, micro_batch, factors, num_workers, device)
        .next() -> micro-batch on the device; .state_dict() / .load_state_dict(); .close()
    seed_everything(seed), sample_seed(seed, *keys), amp_dtype(amp, device)

Per iteration: lr from the schedule (engine.optim.lr_factor) -> `accumulation` micro-batches
(next_batch, seed, autocast forward, backward; DDP syncs gradients on the last) -> unscale (fp16),
clip, global non-finite check (loss and gradient norm; one all-reduce) -> optimizer step or skip
-> after_step -> log every `train.log_every` -> checkpoint every `train.checkpoint_every` and at
the end -> export on rank 0.

What makes runs exact and world-size independent:
- `data.sampling.RepeatFactorSampler` draws one global stream of dataset indices (repeat-factor
  sampling, reshuffled per epoch from the seed). Iteration t consumes stream positions [t*G, (t+1)*G) with G the global
  batch; process r takes positions (t*b + k)*W + r (b images per process, W processes), so the
  same images are seen whatever W is, and the stream position alone says where the run is.
- Each sample's augmentation is seeded from (seed, stream position); each micro-batch's model
  randomness (RPN/RoI sampling, drop path) from (seed, global micro-batch index), so one process
  with two images and two processes with one image each compute the same thing.
- Losses are averaged over micro-batches and processes, and DDP averages the gradients. With
  `train.micro_batch: 1` every micro-batch is one image, so this is the mean over the global batch
  of per-image losses whatever the number of processes (BatchNorm statistics too are per image);
  a larger micro-batch is faster, but normalises losses per micro-batch, hence per process.
- A checkpoint stores model(s), optimizer, grad scaler, schedule position, phase/data position and
  each rank's torch/numpy/python RNG states as plain tensors and lists (loadable with
  weights_only=True); it is written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from slsd_cli import distributed
from slsd_cli.config import to_dict
from slsd_cli.data.sampling import RepeatFactorSampler
from slsd_cli.distributed import DistInfo
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.engine.optim import build_optimizer, lr_factor, set_lr
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_text
from slsd_cli.progress import info, progress, warn

if TYPE_CHECKING:
    from slsd_cli.recipe import Recipe


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
    def export(self, run_dir: Path) -> None: ...


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


# ------------------------------------------------------------------------------ seeds


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from (seed, keys), the same on every machine and process."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]]).generate_state(2)
    return (int(words[0]) << 31 ^ int(words[1])) & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python with one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# keys of the derived seeds, so that augmentation, model randomness and streams never share one
_AUGMENT, _MODEL, _STREAM = 1, 2, 3


# ------------------------------------------------------------------------------ data stream


class _RankKeys(torch.utils.data.Sampler):
    """This process's share of the global sample stream as (dataset index, global position) keys.

    The stream is `data.sampling.RepeatFactorSampler`'s (epochs of repeat-factor sampled, shuffled
    indices; `factors=None` = each image once per epoch); process r of W takes global positions
    j*W + r for its local positions j = start, start + 1, ..."""

    def __init__(self, num_samples: int, factors: list[float] | None, seed: int, rank: int, world_size: int,
                 start: int):
        if num_samples <= 0:
            raise InputError("the training set has no images")
        weights = torch.ones(num_samples, dtype=torch.float64) if factors is None else torch.as_tensor(factors)
        self.sampler = RepeatFactorSampler(weights, seed=sample_seed(seed, _STREAM), rank=rank, world_size=world_size)
        self.sampler.load_state_dict(self.sampler.state_dict(consumed=start))
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for j, index in enumerate(self.sampler, start=self.start):
            yield index, j * self.world_size + self.rank


class _SeededDataset(torch.utils.data.Dataset):
    """Seeds torch / numpy / python from (seed, global stream position) before each sample, so a
    sample's augmentation does not depend on the process, the worker or what came before."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        s = sample_seed(self.seed, _AUGMENT, position)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        return self.dataset[index]


class StepLoader:
    """An endless, resumable stream of micro-batches for one process.

    `next()` returns the next micro-batch of `micro_batch` samples, collated by `collate` and moved
    to `device`. The position is the number of samples this process has consumed (`state_dict`);
    as every process consumes the same number per iteration it is the same on every rank, and
    loading it restarts the stream exactly there (worker prefetching never counts)."""

    def __init__(self, dataset: torch.utils.data.Dataset, collate: Callable, *, seed: int, rank: int = 0,
                 world_size: int = 1, micro_batch: int = 1, factors: list[float] | None = None,
                 num_workers: int = 0, device: torch.device | str = "cpu"):
        self.dataset, self.collate = dataset, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.micro_batch, self.factors, self.num_workers = micro_batch, factors, num_workers
        self.device = torch.device(device)
        self.consumed = 0
        self._iter: Iterator | None = None

    def _start(self) -> None:
        keys = _RankKeys(len(self.dataset), self.factors, self.seed, self.rank, self.world_size, self.consumed)
        loader = torch.utils.data.DataLoader(
            _SeededDataset(self.dataset, self.seed), batch_size=self.micro_batch, sampler=keys,
            collate_fn=self.collate, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None, persistent_workers=False)
        self._iter = iter(loader)

    def next(self) -> Any:
        if self._iter is None:
            self._start()
        try:
            batch = next(self._iter)
        except InputError as exc:
            if "DataLoader worker" not in exc.message:
                raise
            # a worker's InputError comes back wrapped with its traceback: keep the one-line message
            last = exc.message.strip().splitlines()[-1]
            raise InputError(last.split(": ", 1)[1] if last.startswith("slsd_cli.") else last) from None
        self.consumed += self.micro_batch
        return to_device(batch, self.device)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.consumed = int(state["consumed"])

    def close(self) -> None:
        """Stop the worker processes (a new `next()` restarts them at the current position)."""
        self._iter = None


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (inside objects with `.to`, dicts, lists, tuples) to `device`."""
    non_blocking = device.type == "cuda"
    if isinstance(obj, Tensor) or hasattr(obj, "to") and not isinstance(obj, nn.Module):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ------------------------------------------------------------------------------ precision


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: no autocast). `auto` = bf16 on CUDA, fp32 on CPU; an explicit
    `bf16` / `fp16` autocasts on any device (fp16 with a gradient scaler)."""
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


# ------------------------------------------------------------------------------ the loop


def train(phase: Phase, cfg: Any, run_dir: str | Path, dist: DistInfo, *, resume: bool = False,
          recipe: dict | None = None) -> TrainResult:
    """Run `phase` for `cfg.iterations` iterations (`cfg` is a `recipe.TrainConfig`), checkpointing
    into `run_dir`; `recipe` (a plain dict) is stored in the checkpoints for the record.

    With `resume`, continue from `run_dir/ckpt/last.pt` when it exists (else start afresh). Every
    process calls this; rank 0 alone writes files. Raises `NonFiniteLossError` (an InputError: exit
    code 2) after `cfg.max_nonfinite` consecutive non-finite steps, having saved a checkpoint."""
    run_dir = Path(run_dir)
    device = dist.device
    world, rank = dist.world_size, dist.rank
    is_main = dist.is_main
    accumulation = cfg.batch_per_process // cfg.micro_batch
    images_per_iteration = cfg.batch_per_process * world
    ckpt_file = ckpt.checkpoint_path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"

    # ---- optimiser, precision, DDP
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes (collate pads to data.image_size)
    model = phase.trainable
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, tuple(cfg.betas))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    # ---- resume
    start, skipped, consecutive, last_bad = 0, 0, 0, ""
    if is_main:
        ckpt.remove_stale_temps(ckpt_file)
    if resume and ckpt_file.is_file():
        state = ckpt.load(ckpt_file, map_location="cpu")
        modules = phase.modules()
        if set(state["modules"]) != set(modules):
            raise InputError(f"checkpoint holds {sorted(state['modules'])}, this phase trains {sorted(modules)}",
                             path=ckpt_file)
        try:
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"the checkpoint does not fit this recipe's model ({str(exc).splitlines()[0]})",
                             path=ckpt_file) from exc
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        phase.load_state_dict(state["phase"])
        start = int(state["iteration"])
        skipped = int(state["trainer"]["skipped"])
        consecutive = int(state["trainer"]["consecutive_nonfinite"])
        rng = state["rng"]
        if len(rng) == world:
            ckpt.set_rng_state(rng[rank])
        elif is_main:
            warn(f"resuming with {world} processes from a checkpoint of {len(rng)}: RNG states not restored")
        if is_main:
            _truncate_metrics(metrics_file, start)
            info(f"resuming {run_dir} at iteration {start}/{cfg.iterations}")
        del state
    elif is_main and metrics_file.exists():
        metrics_file.unlink()

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=bool(getattr(phase, "find_unused_parameters", False)))
    writer = _tensorboard(run_dir / "tensorboard") if cfg.tensorboard and is_main else None

    def save_checkpoint(iteration: int) -> None:
        rngs = _gather_objects(ckpt.rng_state(), world)
        if is_main:
            ckpt.save({"iteration": iteration, "world_size": world, "recipe": recipe or {},
                       "modules": {name: m.state_dict() for name, m in phase.modules().items()},
                       "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                       "phase": phase.state_dict(),
                       "trainer": {"skipped": skipped, "consecutive_nonfinite": consecutive},
                       "rng": rngs}, ckpt_file)

    # ---- the loop
    window = _Window()
    run_started, run_images = time.perf_counter(), 0
    final_loss = None
    model.train()
    with progress() as bar:
        task = bar.add_task("train", total=cfg.iterations, completed=start, status="")
        for iteration in range(start, cfg.iterations):
            step_started = time.perf_counter()
            lr = set_lr(optimizer, lr_factor(iteration, cfg.iterations, cfg.schedule, cfg.warmup_iters,
                                             cfg.warmup_factor, cfg.min_lr_ratio))
            step_losses: dict[str, Tensor] = {}
            data_time = 0.0
            for k in range(accumulation):
                data_started = time.perf_counter()
                batch = phase.next_batch()
                data_time += time.perf_counter() - data_started
                # model randomness (proposal sampling, drop path) per global micro-batch index
                torch.manual_seed(sample_seed(cfg.seed, _MODEL, (iteration * accumulation + k) * world + rank))
                sync = k == accumulation - 1 or world == 1
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        losses = phase.losses(ddp_model, batch)
                    total = sum(losses.values())
                    scaler.scale(total / accumulation).backward()
                for name, value in losses.items():
                    step_losses[name] = step_losses.get(name, 0.0) + value.detach().float() / accumulation
            step_total = sum(step_losses.values())

            # ---- skip a non-finite step on every rank alike, else update
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            if cfg.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            bad = (~torch.isfinite(step_total)).float()
            if not scaler.is_enabled():  # with fp16 the scaler handles overflowing gradients itself
                bad = bad + (~torch.isfinite(grad_norm)).float()
            if bool(distributed.all_reduce_sum(bad.reshape(1)).item() > 0):
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
                skipped += 1
                consecutive += 1
                bad_terms = {n: str(float(v)) for n, v in step_losses.items() if not math.isfinite(float(v))}
                if is_main:
                    warn(f"iteration {iteration + 1}: non-finite loss or gradient "
                         f"({_format_terms(bad_terms) or 'gradient norm ' + str(float(grad_norm))}); step skipped")
                    _append_json(metrics_file, {"iter": iteration + 1, "event": "nonfinite", "skipped": True,
                                                "nonfinite": bad_terms,
                                                "grad_norm": _finite_or_none(float(grad_norm))})
                last_bad = _format_terms(bad_terms) or "non-finite gradient"
            else:
                scaler.step(optimizer)  # with fp16, skips the update itself when gradients overflowed
                if scaler.is_enabled():
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                consecutive = 0
                if not scaler.is_enabled() or bool(torch.isfinite(grad_norm)):
                    phase.after_step(iteration)
                window.add(step_losses, grad_norm)

            run_images += images_per_iteration
            window.tick(time.perf_counter() - step_started, data_time, images_per_iteration)

            # ---- log, checkpoint
            done = iteration + 1
            if done % cfg.log_every == 0 or done == cfg.iterations or consecutive >= cfg.max_nonfinite:
                record = window.flush(world)
                record.update({"iter": done, "lr": lr, **phase.log_stats()})
                if device.type == "cuda":
                    record["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if record.get("loss") is not None:
                    final_loss = record["loss"]
                if is_main:
                    _append_json(metrics_file, record)
                    if writer is not None:
                        for key, value in record.items():
                            if isinstance(value, (int, float)) and key != "iter":
                                writer.add_scalar(key, value, done)
                    bar.update(task, status=_status(record))
            bar.update(task, completed=done)
            if consecutive >= cfg.max_nonfinite:
                save_checkpoint(done)
                raise NonFiniteLossError(
                    f"{consecutive} consecutive non-finite losses (last at iteration {done}: {last_bad}); "
                    f"stopped. The weights before them are in {ckpt_file}: lower train.lr, raise "
                    "train.warmup_iters or use train.amp=bf16, then rerun with --resume", path=run_dir)
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                save_checkpoint(done)

    if writer is not None:
        writer.close()
    if is_main:
        phase.export(run_dir)
    distributed.barrier()
    elapsed = time.perf_counter() - run_started
    return TrainResult(run_dir=run_dir, iterations=cfg.iterations, skipped=skipped, final_loss=final_loss,
                       images_per_s=run_images / elapsed if run_images else 0.0)


def train_recipe(phase: Phase, recipe: Recipe, run_dir: Path, dist: DistInfo, *, resume: bool) -> TrainResult:
    """`train` with a `recipe.Recipe`'s train section, storing the whole recipe in the checkpoints;
    the phase's data workers are stopped however the run ends."""
    try:
        return train(phase, recipe.train, run_dir, dist, resume=resume, recipe=to_dict(recipe))
    finally:
        close = getattr(phase, "close", None)  # optional in `Phase`
        if close is not None:
            close()


# ------------------------------------------------------------------------------ helpers


class _Window:
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


def _status(record: dict) -> str:
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.1f} img/s")
    return "  ".join(parts)


def _format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name}={value}" for name, value in terms.items())


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _append_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")
        handle.flush()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the log lines up to the resumed iteration (later ones are about to be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iter", 0) <= iteration:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _gather_objects(obj: Any, world: int) -> list:
    if world == 1 or not distributed.is_distributed():
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("train.tensorboard is on but tensorboard is not installed (pip install 'slsd[tensorboard]'); "
             "metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(log_dir))
