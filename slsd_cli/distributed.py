"""torchrun in a few functions: one process is world size 1, the same code path.

Every heavy command runs its work inside `with distributed.session(device) as dist:` (the one place
that joins and leaves the process group, also on errors). Under `torchrun` the process group is
created from the environment (gloo on CPU, nccl on CUDA); alone, nothing is created and the helpers
below become no-ops. Results are exchanged as per-rank shard files or small reduced tensors, never gathered.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        backend = "nccl" if use_cuda else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After a torchrun --max-restarts restart the agent's store still holds the previous
            # attempt's process-group keys (peer addresses); without a per-attempt prefix a new
            # process can read a dead peer's address and fail to connect.
            store = dist.PrefixStore(f"slsd/attempt_{attempt}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                timeout=timeout))
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small python object (a path, a flag) from `src` to every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shard_indices(n: int, rank_: int | None = None, world_size_: int | None = None) -> range:
    """Contiguous block of `range(n)` owned by a rank (blocks keep shard files in input order)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    per_rank = (n + w - 1) // w
    return range(min(n, r * per_rank), min(n, (r + 1) * per_rank))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto", timeout_minutes: int = 30) -> Iterator[DistInfo]:
    """`init()` on entry, `cleanup()` on exit (normal or not): the one init/cleanup site of a command.
    A process group that existed before the session (a caller's) is left alone."""
    owned = not is_distributed()
    info = init(device, timeout_minutes)
    try:
        yield info
    finally:
        if owned:
            cleanup()
