"""A torch Dataset over a validated LVIS/COCO annotation file and its image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import tv_tensors

from slsd_cli.data.images import load_image
from slsd_cli.data.lvis import Annotations, annotation_mask
from slsd_cli.errors import InputError


class InstanceDataset(torch.utils.data.Dataset):
    """One sample per image:

    `{"image": tv_tensors.Image uint8 [3,H,W], "boxes": tv_tensors.BoundingBoxes XYXY float [G,4],
    "masks": tv_tensors.Mask uint8 [G,H,W], "labels": LongTensor [G] (contiguous class index),
    "image_id": int, "orig_size": (h, w) of the file, "scale": float}` — then `transform(sample)`,
    whose result (a sample, or a (weak, strong) pair) is returned as is.

    An image without annotations (an images-only json such as `unlabeled.json`) gives G = 0.
    Crowd annotations (`iscrowd: 1`, COCO only) are left out unless `include_crowd`; their number
    is `num_crowd_skipped`. A missing or unreadable image file, or one whose size disagrees with its
    record, is an `InputError` naming the file and the image id.
    """

    def __init__(self, annotations: Annotations, images_dir: str | Path, transform: Callable | None = None,
                 image_ids: list[int] | None = None, include_crowd: bool = False):
        self.annotations = annotations
        self.images_dir = Path(images_dir)
        self.transform = transform
        self.include_crowd = include_crowd
        if image_ids is None:
            self.image_ids = annotations.image_ids
        else:
            self.image_ids = [int(i) for i in image_ids]
            for image_id in self.image_ids:
                if image_id not in annotations.images:
                    raise InputError(f"unknown image id {image_id}", path=annotations.path, record="image_ids")
        self._anns = {}
        self.num_crowd_skipped = 0
        for image_id in self.image_ids:
            anns = annotations.anns_by_image.get(image_id, [])
            if not include_crowd:
                kept = [a for a in anns if not a.get("iscrowd", 0)]
                self.num_crowd_skipped += len(anns) - len(kept)
                anns = kept
            self._anns[image_id] = anns

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, i: int) -> Path:
        return self.annotations.image_file(self.image_ids[i], self.images_dir)

    def load(self, i: int) -> dict:
        """The untransformed sample of the i-th image."""
        image_id = self.image_ids[i]
        record = self.annotations.images[image_id]
        path = self.image_path(i)
        where = f"image id {image_id}"
        image = load_image(path, record=where)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if (h, w) != (record["height"], record["width"]):
            raise InputError(f"image is {w}x{h} but its record in {self.annotations.path} says "
                             f"{record['width']}x{record['height']}", path=path, record=where)
        anns = self._anns[image_id]
        if anns:
            masks = torch.from_numpy(np.stack([annotation_mask(a, h, w) for a in anns]))
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            labels = torch.tensor([self.annotations.category_index[a["category_id"]] for a in anns],
                                  dtype=torch.long)
        else:
            masks = torch.zeros(0, h, w, dtype=torch.uint8)
            boxes = torch.zeros(0, 4)
            labels = torch.zeros(0, dtype=torch.long)
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "image_id": int(image_id),
            "orig_size": (h, w),
            "scale": 1.0,
        }

    def __getitem__(self, i: int):
        sample = self.load(i)
        return self.transform(sample) if self.transform is not None else sample
