"""Collating samples into padded batches."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """Images float [B,3,H,W] RGB 0..255, zero-padded at the bottom/right to a common size divisible
    by `size_divisibility`; `image_sizes[i]` is the valid (h, w) of image i. `targets[i]` holds
    `boxes` float [G,4] XYXY, `labels` long [G], `masks` uint8 [G,h,w] at the sample's (unpadded) size.
    `scales[i]` maps predictions back to the file: divide coordinates by it."""

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, torch.Tensor]]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    scales: list[float]

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()}
                                for t in self.targets])

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return replace(self, images=self.images.pin_memory(),
                       targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets])


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor)


def _round_up(value: int, divisor: int) -> int:
    return value if divisor <= 1 else -(-value // divisor) * divisor


def collate(samples: list[dict], size_divisibility: int = 32, pad_to: int | None = None) -> Batch:
    """Stack samples into a `Batch`. `pad_to` additionally pads to at least pad_to x pad_to (ViTDet's
    square padding)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = [(int(s["image"].shape[-2]), int(s["image"].shape[-1])) for s in samples]
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    if pad_to is not None:
        height, width = max(height, pad_to), max(width, pad_to)
    height, width = _round_up(height, size_divisibility), _round_up(width, size_divisibility)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.float32)
    targets = []
    for i, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = _plain(sample["image"])
        targets.append({"boxes": _plain(sample["boxes"]).float(),
                        "labels": _plain(sample["labels"]).long(),
                        "masks": _plain(sample["masks"]).to(torch.uint8)})
    return Batch(images=images, image_sizes=sizes, targets=targets,
                 image_ids=[int(s["image_id"]) for s in samples],
                 orig_sizes=[tuple(int(v) for v in s["orig_size"]) for s in samples],
                 scales=[float(s["scale"]) for s in samples])


def collate_pairs(pairs: list[tuple[dict, dict]], size_divisibility: int = 32,
                  pad_to: int | None = None) -> tuple[Batch, Batch]:
    """Collate (weak, strong) pairs from `WeakStrongTransform` into a weak and a strong batch."""
    weak = collate([p[0] for p in pairs], size_divisibility, pad_to)
    strong = collate([p[1] for p in pairs], size_divisibility, pad_to)
    return weak, strong
