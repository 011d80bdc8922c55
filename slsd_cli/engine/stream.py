"""The data stream of a training process: an endless, resumable sequence of micro-batches.

`StepLoader(dataset, collate, *, seed, rank, world_size, micro_batch, factors, num_workers, device)`
    .next()          -> the next micro-batch (`micro_batch` samples collated by `collate`, on `device`)
    .state_dict()    -> {"consumed": samples this process has consumed}; `.load_state_dict` restarts there
    .close()         -> stop the worker processes
`to_device(obj, device)` moves tensors inside dicts / lists / tuples / objects with `.to`.

`data.sampling.RepeatFactorSampler` draws one global stream of dataset indices (repeat-factor
sampling, reshuffled per epoch from the seed); process r of W takes global positions j*W + r, so the
same images are seen whatever W is. Each sample's augmentation is seeded from (seed, global stream
position), so it depends neither on the process, nor on the worker, nor on what came before.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from slsd_cli import interrupts
from slsd_cli.data.sampling import RepeatFactorSampler
from slsd_cli.engine.seeding import AUGMENT, STREAM, sample_seed
from slsd_cli.errors import InputError, unwrap_worker_error


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
        self.sampler = RepeatFactorSampler(weights, seed=sample_seed(seed, STREAM), rank=rank, world_size=world_size)
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
        s = sample_seed(self.seed, AUGMENT, position)
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
            prefetch_factor=4 if self.num_workers > 0 else None, persistent_workers=False,
            worker_init_fn=interrupts.worker_init)  # workers stop when this process decides (safe point)
        self._iter = iter(loader)

    def next(self) -> Any:
        if self._iter is None:
            self._start()
        try:
            batch = next(self._iter)
        except InputError as exc:  # a worker's error comes back wrapped with its traceback
            raise unwrap_worker_error(exc) from None
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
