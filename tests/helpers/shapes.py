"""Shared helpers for the model tests (no tests here): coloured shapes on noise, COCO AP50."""

from __future__ import annotations

import contextlib
import io

import torch

COLOURS = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 80, 230]], dtype=torch.float32)


def draw_shapes(n: int = 8, size: int = 128, seed: int = 0, min_side: int = 24, max_side: int = 56
                ) -> tuple[torch.Tensor, list[dict]]:
    """n images [n, 3, size, size] (0..255) of 1-3 non-overlapping shapes on noise; class 0 red
    rectangle, 1 green ellipse, 2 blue triangle; exact masks and tight boxes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for i in range(n):
        img = torch.rand(3, size, size, generator=g) * 80 + 60
        boxes, labels, masks = [], [], []
        for _ in range(100):
            if len(boxes) == 1 + i % 3:
                break
            w, h = torch.randint(min_side, max_side, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            if any(not (x0 >= b[2] + 2 or x0 + w + 2 <= b[0] or y0 >= b[3] + 2 or y0 + h + 2 <= b[1]) for b in boxes):
                continue
            c = int(torch.randint(0, 3, (1,), generator=g))
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            if c == 1:
                cx, cy = x0 + w / 2 - 0.5, y0 + h / 2 - 0.5
                inside = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            elif c == 2:
                depth = h - 1 - (yy - y0)
                inside = inside & ((xx - x0) * h >= depth * w / 2) & ((x0 + w - 1 - xx) * h >= depth * w / 2)
            img[:, inside] = COLOURS[c].view(3, 1)
            ys, xs = torch.nonzero(inside, as_tuple=True)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
            labels.append(c)
            masks.append(inside.to(torch.uint8))
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "masks": torch.stack(masks)})
    return torch.stack(images), targets


def coco_gt(targets: list[dict], size: int, num_classes: int = 3) -> dict:
    gt = {"images": [{"id": i + 1, "height": size, "width": size, "file_name": f"{i + 1}.png"}
                     for i in range(len(targets))],
          "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)], "annotations": []}
    for i, t in enumerate(targets):
        for b, lab, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": lab + 1,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float(m.sum()), "iscrowd": 0,
                "segmentation": [[float(xs.min()), float(ys.min()), float(xs.max()), float(ys.min()),
                                  float(xs.max()), float(ys.max()), float(xs.min()), float(ys.max())]]})
    return gt


def box_ap50(dets: list[dict], targets: list[dict], size: int, num_classes: int = 3) -> float:
    """COCO box AP at IoU 0.5 (pycocotools) of predict() outputs on the drawn images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    res = [{"image_id": i + 1, "category_id": int(lab) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "score": float(s)}
           for i, d in enumerate(dets)
           for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    if not res:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = coco_gt(targets, size, num_classes)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])
