"""Numeric precision of a forward pass: which autocast dtype an `amp` setting means on a device.

One rule for training (`train.amp` in the recipe) and inference (`--amp` of eval, calibrate,
predict): `auto` = bf16 on CUDA, fp32 (no autocast) on the CPU; `bf16` / `fp16` autocast on any
device (training pairs fp16 with a gradient scaler); `fp32` never autocasts.
"""

from __future__ import annotations

import torch

AMP_CHOICES = ("auto", "fp32", "bf16", "fp16")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: no autocast) of `amp` (one of AMP_CHOICES) on `device`."""
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16
