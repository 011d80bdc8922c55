"""Numeric precision of a forward pass: which autocast dtype an `amp` setting means on a device.

One rule for training (`train.amp` in the recipe) and inference (`--amp` of eval, calibrate,
predict): `auto` = bf16 on CUDA, fp32 (no autocast) on the CPU; `bf16` / `fp16` autocast on any
device (training pairs fp16 with a gradient scaler); `fp32` never autocasts. One exception, at
inference: a checkpoint converted from the EVA-02 reference (`slsd convert`) runs in fp32 under
`auto` on CUDA too, the precision its published numbers were measured in (`inference_amp_dtype`).
"""

from __future__ import annotations

import torch

AMP_CHOICES = ("auto", "fp32", "bf16", "fp16")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: no autocast) of `amp` (one of AMP_CHOICES) on `device`."""
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def inference_amp_dtype(amp: str, device: torch.device, converted: bool) -> tuple[torch.dtype | None, str]:
    """The inference autocast dtype of `amp` on `device` (a `converted` checkpoint stays fp32 under
    auto), and one line saying what was chosen and why (commands print it for `--amp auto`)."""
    if amp == "auto" and converted:
        return None, ("precision: fp32 (--amp auto: a converted EVA-02 checkpoint runs in the reference's "
                      "fp32; --amp bf16 is faster on a GPU)")
    dtype = amp_dtype(amp, device)
    name = "fp32" if dtype is None else "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast"
    why = {"auto": "--amp auto on CUDA" if device.type == "cuda" else f"--amp auto on {device.type}"}.get(amp, f"--amp {amp}")
    hint = "; --amp fp32 for the reference's numbers" if dtype is not None else ""
    return dtype, f"precision: {name} ({why}{hint})"
