"""The mean teacher: an exponential moving average of the student's weights.

After every optimiser step the teacher is moved towards the student,

    t <- d * t + (1 - d) * s

for every floating-point parameter *and* persistent buffer (running statistics included), with decay `d`
(the semi-supervised default is 0.9996, docs/design.md §3). Integer buffers (e.g. BatchNorm's
`num_batches_tracked`) are copied from the student. The teacher never receives gradients: its
parameters have `requires_grad=False` and it stays in eval mode.

The update uses the `torch._foreach_*` kernels (one launch per op for the whole model, not one per
tensor), which is what keeps the EMA's cost negligible next to a training step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _paired_tensors(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                      list[torch.Tensor], list[torch.Tensor]]:
    """(teacher floats, student floats, teacher non-floats, student non-floats), matched by name.

    The tensors are those of `state_dict()` (parameters and persistent buffers: what a checkpoint
    holds). Non-persistent buffers (constants such as the pixel mean, caches) are left alone: the
    EMA of two equal floats is not always bit-equal to them, and a resumed run rebuilds them from
    the config, so averaging them would make resumption inexact."""
    t_state = teacher.state_dict(keep_vars=True)
    s_state = student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))
        raise ValueError(f"teacher and student differ in their tensors (first: {missing[0]})")
    tf, sf, ti, si = [], [], [], []
    for name, t in t_state.items():
        s = s_state[name]
        if t.shape != s.shape:
            raise ValueError(f"teacher and student differ in the shape of {name}: {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.is_floating_point():
            tf.append(t.data)
            sf.append(s.data.to(dtype=t.dtype))
        else:
            ti.append(t.data)
            si.append(s.data)
    return tf, sf, ti, si


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: t <- decay * t + (1 - decay) * s for floating tensors; other buffers are copied."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    tf, sf, ti, si = _paired_tensors(unwrap(teacher), unwrap(student))
    if tf:
        torch._foreach_mul_(tf, decay)
        torch._foreach_add_(tf, sf, alpha=1.0 - decay)
    for t, s in zip(ti, si):
        t.copy_(s)


class EMATeacher:
    """Holds the teacher copy of a student and updates it after each optimiser step.

    `teacher` is a deep copy of the (unwrapped) student at construction, frozen (no gradients) and in
    eval mode; call `update(student)` after every step. `state_dict()` / `load_state_dict()` carry the
    teacher weights and the number of updates, so a resumed run continues bit-for-bit.
    """

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.teacher = copy.deepcopy(unwrap(student))
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.updates = 0

    def update(self, student: nn.Module) -> None:
        ema_update(self.teacher, student, self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.teacher.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.teacher.eval()
