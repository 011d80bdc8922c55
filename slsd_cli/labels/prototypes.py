"""Instance embeddings and class prototypes (paper Eq. 1) for `slsd prototypes`.

Whole images go through a backbone in batches (resized so the longest edge is `image_size`,
aspect kept, padded to a square `image_size` canvas); each instance's embedding is the RoIAlign of
the backbone feature map over its box (`spatial_scale = 1 / stride`, `pool_size` x `pool_size`
bins, averaged), or, with `mask_weighted`, the bins' average weighted by the instance mask's
coverage of each bin. Embeddings are summed per class in float64 (`PrototypeAccumulator`); under
torchrun each rank takes a contiguous shard of the images and the sums are all-reduced.

Backbones: any timm model (`features_only=True`, one feature level) with pretrained weights by name
(online; `efficientnet_lite0` offline from its pip package, see `timm_models.PACKAGED`), from a
local file, or random init; or the backbone of an slsd detector run
(`slsd_cli.inference.predictor.Predictor.features`: padded as the detector was trained).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from slsd_cli import distributed, interrupts
from slsd_cli.data.images import load_image
from slsd_cli.data.lvis import Annotations, annotation_mask
from slsd_cli.errors import InputError
from slsd_cli.labels.smoothing import PrototypeAccumulator, cosine_similarity
from slsd_cli.model.timm_models import create_timm_model, is_timm_model

SAMPLING_RATIO = 2


# ------------------------------------------------------------------ backbones


@dataclass
class Extractor:
    """A backbone as a feature-map function of padded RGB 0..255 float batches."""

    module: nn.Module
    forward: Callable[[Tensor, list[tuple[int, int]]], tuple[Tensor, int]]
    dim: int
    stride: int
    metadata: dict[str, Any] = field(default_factory=dict)


class _TimmFeatures(nn.Module):
    """timm `features_only` model at one level; normalises with the model's mean/std, then zeroes
    the padding (detectron2's convention: pad after normalising)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
        x = (images - self.mean) / self.std
        x = x * _valid_mask(x, image_sizes)
        return self.model(x)[0]


def _valid_mask(x: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    h_max, w_max = x.shape[-2:]
    hs = torch.tensor([h for h, _ in image_sizes], device=x.device).view(-1, 1, 1, 1)
    ws = torch.tensor([w for _, w in image_sizes], device=x.device).view(-1, 1, 1, 1)
    rows = torch.arange(h_max, device=x.device).view(1, 1, -1, 1)
    cols = torch.arange(w_max, device=x.device).view(1, 1, 1, -1)
    return ((rows < hs) & (cols < ws)).to(x.dtype)


class _MissingKeys(logging.Handler):
    """Collects the keys timm reports missing while loading pretrained weights. timm loads
    features_only models non-strictly (their classifier is dropped) and only logs what it missed;
    we turn a missing backbone tensor into an error."""

    PREFIX, SUFFIX = "Missing keys (", ") discovered"

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self._logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX) and self.SUFFIX in message:
            inner = message[len(self.PREFIX):message.rfind(self.SUFFIX)]
            self.missing.extend(k for k in inner.split(", ") if k)

    def __enter__(self) -> "_MissingKeys":
        self._saved = self._logger.level, self._logger.propagate
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


def timm_extractor(name: str, weights: str | Path | None = None, random_init: bool = False,
                   feature_level: int = -1, image_size: int = 1024) -> Extractor:
    """A timm backbone at one feature level (`feature_level` indexes timm's feature_info; -1 = last).

    Weights: `weights` (a local safetensors or torch file, loaded with weights_only=True and passed
    through timm's checkpoint filter), else `random_init`, else pretrained weights by name, which
    needs the network (or the HF_HUB_OFFLINE cache; `efficientnet_lite0` is packaged); offline without
    --weights is an InputError.
    ViT-like models are built for `image_size` inputs (timm resamples position embeddings).
    """
    import timm

    if not is_timm_model(name):
        raise InputError(f"unknown timm model {name!r}", record="--backbone")
    capture = _MissingKeys()
    with capture:
        try:
            model, kind = create_timm_model(name, weights=weights, random_init=random_init, image_size=image_size,
                                            option="--backbone", features_only=True, out_indices=(feature_level,))
        except IndexError as exc:
            raise InputError(f"{name!r} has no feature level {feature_level}", record="--feature-level") from exc
    source = f"file:{weights}" if kind == "file" else kind
    model.eval()
    if weights is not None:
        base_cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
        classifier = getattr(base_cfg, "classifier", None) or "head"
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        missing = [k for k in capture.missing if not any(k == h or k.startswith(h + ".") for h in heads)]
        if missing:
            raise InputError(f"{len(missing)} tensors of {name!r} are missing from the weights file (e.g. "
                             f"{', '.join(missing[:3])}); is it a checkpoint of this model?", path=weights)
    info = model.feature_info
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    module = _TimmFeatures(model, mean, std)
    stride = int(info.reduction()[-1])
    dim = int(info.channels()[-1])
    meta = {"backbone": name, "weights": source, "feature_level": feature_level, "stride": stride, "dim": dim,
            "mean": list(mean), "std": list(std)}
    return Extractor(module, lambda x, sizes: (module(x, sizes), stride), dim, stride, meta)


def checkpoint_extractor(path: str | Path, annotations: Annotations | None = None) -> Extractor:
    """The plain backbone map of an slsd detector run (model dir, model.safetensors or model.json)."""
    try:
        from slsd_cli.inference.predictor import Predictor
    except ImportError as exc:  # the model package is optional at import time
        raise InputError(f"slsd detector checkpoints are not available ({exc})", path=path) from exc
    # the predictor pads as the model was trained (a ViT's square canvas), in fp32
    predictor = Predictor.from_run(path, device="cpu", amp="fp32")
    model, meta = predictor.model, predictor.meta
    dim, stride = predictor.feature_dim, int(model.backbone.feature_stride)
    categories = [c["id"] for c in meta.get("categories", [])]
    info = {"backbone": f"checkpoint:{path}", "weights": f"checkpoint:{path}", "stride": int(stride), "dim": dim,
            "model_backbone": meta.get("model", {}).get("backbone"),
            "checkpoint_categories_match": annotations is not None and categories == annotations.category_ids}
    return Extractor(model, lambda x, sizes: predictor.features(x, sizes)[:2], dim, stride, info)


# ------------------------------------------------------------------ data


@dataclass
class _Item:
    image: Tensor          # float [3, h, w] 0..255, resized
    size: tuple[int, int]  # (h, w) after resizing
    boxes: Tensor          # [G, 4] xyxy in resized pixels
    labels: Tensor         # [G] contiguous class index
    weights: Tensor | None  # [G, k, k] mask coverage of each RoIAlign bin (mask-weighted pooling)


class InstanceImages(torch.utils.data.Dataset):
    """The images of a shard with their (non-crowd) instances, resized for the backbone."""

    def __init__(self, annotations: Annotations, images_dir: str | Path, image_ids: list[int], image_size: int,
                 pool_size: int = 7, mask_weighted: bool = False):
        self.annotations = annotations
        self.images_dir = Path(images_dir)
        self.image_ids = image_ids
        self.image_size = image_size
        self.pool_size = pool_size
        self.mask_weighted = mask_weighted

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> _Item:
        image_id = self.image_ids[index]
        record = self.annotations.images[image_id]
        anns = [a for a in self.annotations.anns_by_image.get(image_id, []) if not a.get("iscrowd", 0)]
        image = load_image(self.annotations.image_file(image_id, self.images_dir), record=f"image id {image_id}")
        height, width = image.shape[-2:]
        if (height, width) != (record["height"], record["width"]):
            raise InputError(f"image is {height}x{width} but the annotations say {record['height']}x{record['width']}",
                             path=self.annotations.image_file(image_id, self.images_dir), record=f"image id {image_id}")
        image, (h, w) = resize_longest(image, self.image_size)
        sx, sy = w / width, h / height
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] *= sx
        boxes[:, 1::2] *= sy
        labels = torch.tensor([self.annotations.category_index[a["category_id"]] for a in anns], dtype=torch.int64)
        weights = None
        if self.mask_weighted:
            weights = torch.stack([mask_bin_weights(annotation_mask(a, height, width), a["bbox"], self.pool_size)
                                   for a in anns]) if anns else torch.zeros(0, self.pool_size, self.pool_size)
        return _Item(image, (h, w), boxes.to(torch.float32), labels, weights)


def resize_longest(image: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    """uint8 [3, H, W] -> float [3, h, w] (0..255) with max(h, w) = size, aspect kept (bilinear,
    antialiased)."""
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    x = image.float().unsqueeze(0)
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp_(0, 255), (h, w)


def mask_bin_weights(mask: np.ndarray, bbox: list[float], pool_size: int) -> Tensor:
    """Fraction of each of the `pool_size` x `pool_size` RoIAlign bins of an instance's box that its
    mask covers (the same bins, same sampling points as the feature RoIAlign). [k, k] float32."""
    x, y, w, h = bbox
    height, width = mask.shape
    x0, y0 = max(0, int(math.floor(x)) - 1), max(0, int(math.floor(y)) - 1)
    x1, y1 = min(width, int(math.ceil(x + w)) + 1), min(height, int(math.ceil(y + h)) + 1)
    crop = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])).float()[None, None]
    box = torch.tensor([[0.0, x - x0, y - y0, x + w - x0, y + h - y0]])
    return roi_align(crop, box, output_size=pool_size, spatial_scale=1.0, sampling_ratio=SAMPLING_RATIO,
                     aligned=True)[0, 0]


def collate(items: list[_Item]) -> dict[str, Any]:
    """Pad a list of items into one batch [B, 3, S, S] (S = the largest edge in the batch)."""
    side_h = max(item.size[0] for item in items)
    side_w = max(item.size[1] for item in items)
    side = max(side_h, side_w)
    images = torch.zeros(len(items), 3, side, side)
    for i, item in enumerate(items):
        images[i, :, :item.size[0], :item.size[1]] = item.image
    batch_index = torch.cat([torch.full((item.boxes.shape[0],), i, dtype=torch.float32)
                             for i, item in enumerate(items)])
    boxes = torch.cat([item.boxes for item in items])
    rois = torch.cat([batch_index[:, None], boxes], dim=1)
    weights = None
    if items[0].weights is not None:
        weights = torch.cat([item.weights for item in items])
    return {"images": images, "sizes": [item.size for item in items], "rois": rois,
            "labels": torch.cat([item.labels for item in items]), "weights": weights}


# ------------------------------------------------------------------ embeddings


def pool_instances(features: Tensor, rois: Tensor, stride: int, pool_size: int = 7,
                   weights: Tensor | None = None) -> Tensor:
    """Instance embeddings [K, D] from a feature map [B, D, h, w] and rois [K, 5] (batch index,
    x1, y1, x2, y2 in input pixels): RoIAlign, then the mean over bins (or the mask-weighted mean;
    an instance whose mask covers no bin falls back to the plain mean)."""
    pooled = roi_align(features, rois.to(features), output_size=pool_size, spatial_scale=1.0 / stride,
                       sampling_ratio=SAMPLING_RATIO, aligned=True)
    if weights is None:
        return pooled.mean(dim=(2, 3))
    w = weights.to(pooled).unsqueeze(1)
    total = w.sum(dim=(2, 3))
    weighted = (pooled * w).sum(dim=(2, 3)) / total.clamp(min=1e-12)
    return torch.where(total > 0, weighted, pooled.mean(dim=(2, 3)))


def prototype_image_ids(annotations: Annotations) -> tuple[list[int], int]:
    """Images with at least one non-crowd instance (sorted), and the number of crowd annotations
    left out (COCO `iscrowd`: a crowd box is not one instance)."""
    crowd = sum(1 for a in annotations.annotations if a.get("iscrowd", 0))
    ids = sorted(i for i, anns in annotations.anns_by_image.items() if any(not a.get("iscrowd", 0) for a in anns))
    return ids, crowd


def accumulate_prototypes(extractor: Extractor, annotations: Annotations, images_dir: str | Path,
                          image_ids: list[int], image_size: int = 1024, batch_size: int = 8, pool_size: int = 7,
                          mask_weighted: bool = False, workers: int = 0, device: torch.device | str = "cpu",
                          progress_task: Callable[[int], None] | None = None) -> PrototypeAccumulator:
    """Embed every instance of `image_ids` and sum them per class (this process's share only)."""
    dataset = InstanceImages(annotations, images_dir, image_ids, image_size, pool_size, mask_weighted)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, worker_init_fn=interrupts.worker_init)
    acc = PrototypeAccumulator(annotations.num_classes, extractor.dim, device="cpu")
    extractor.module.to(device).eval()
    with torch.inference_mode():
        for batch in loader:
            images = batch["images"].to(device)
            features, stride = extractor.forward(images, batch["sizes"])
            if batch["rois"].shape[0]:
                weights = batch["weights"].to(device) if batch["weights"] is not None else None
                emb = pool_instances(features.float(), batch["rois"].to(device), stride, pool_size, weights)
                acc.add(emb.cpu(), batch["labels"])
            if progress_task is not None:
                progress_task(images.shape[0])
    return acc


def compute_prototypes(extractor: Extractor, annotations: Annotations, images_dir: str | Path,
                       image_size: int = 1024, batch_size: int = 8, pool_size: int = 7, mask_weighted: bool = False,
                       workers: int = 0, device: torch.device | str = "cpu",
                       progress_task: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Prototypes of all classes, sharded over the torchrun ranks (all ranks get the result).

    Returns prototypes [C, D] float64, counts [C], similarity [C, C] float64, category_ids,
    images (total), crowd_skipped. An InputError on any rank stops every rank (the others raise
    "another rank failed") instead of leaving them waiting in the all-reduce.
    """
    image_ids, crowd = prototype_image_ids(annotations)
    shard = [image_ids[i] for i in distributed.shard_indices(len(image_ids))]
    failure: Exception | None = None
    acc = PrototypeAccumulator(annotations.num_classes, extractor.dim)
    try:
        acc = accumulate_prototypes(extractor, annotations, images_dir, shard, image_size, batch_size, pool_size,
                                    mask_weighted, workers, device, progress_task)
    except InputError as exc:
        failure = exc
    flag = torch.tensor([0.0 if failure is None else 1.0], device=_reduce_device())
    distributed.all_reduce_sum(flag)
    if failure is not None:
        raise failure
    if flag.item() > 0:
        raise InputError("another rank failed while embedding its images (see its error)")
    acc.all_reduce()
    prototypes = acc.prototypes()
    return {"prototypes": prototypes, "counts": acc.counts, "similarity": cosine_similarity(prototypes),
            "category_ids": list(annotations.category_ids), "images": len(image_ids), "crowd_skipped": crowd,
            "instances": int(acc.counts.sum())}


def _reduce_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo and single processes use the CPU."""
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class PrototypesConfig:
    """What `slsd prototypes` was asked for (one field per option; see its `--help`)."""

    annotations: Path
    images: Path
    out: Path
    backbone: str | None = None
    weights: Path | None = None
    random_init: bool = False
    checkpoint: Path | None = None
    feature_level: int = -1
    image_size: int = 1024
    batch_size: int = 8
    pool_size: int = 7
    mask_weighted: bool = False
    workers: int = 0
    seed: int = 0
    force: bool = False


def run_prototypes(cfg: PrototypesConfig, progress=None) -> tuple[dict, int, int] | None:
    """The whole `slsd prototypes` step: check the inputs, embed every instance (each process a shard
    of the images, sums all-reduced), write `cfg.out` on rank 0. Returns (result, embedding dim,
    world size) on rank 0, None on other ranks. `progress` is a `slsd_cli.progress.progress()` bar."""
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.io import check_output
    from slsd_cli.labels.smoothing import save_prototypes

    if (cfg.backbone is None) == (cfg.checkpoint is None):
        raise InputError("give exactly one of --backbone TIMM_NAME or --checkpoint RUN")
    if cfg.checkpoint is not None and (cfg.weights is not None or cfg.random_init):
        raise InputError("--weights and --random-init go with --backbone, not --checkpoint")
    if not Path(cfg.images).is_dir():
        raise InputError("images folder not found", path=cfg.images)
    check_output(cfg.out, cfg.force)
    ann = load_annotations(cfg.annotations)
    with distributed.session() as dist:
        torch.manual_seed(cfg.seed)
        if cfg.backbone is not None:
            extractor = timm_extractor(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init,
                                       feature_level=cfg.feature_level, image_size=cfg.image_size)
        else:
            extractor = checkpoint_extractor(cfg.checkpoint, ann)
        image_ids, _ = prototype_image_ids(ann)
        shard = len(distributed.shard_indices(len(image_ids)))
        task = progress.add_task("prototypes", total=shard, status=f"rank 0 of {dist.world_size}") \
            if progress is not None else None
        result = compute_prototypes(
            extractor, ann, cfg.images, image_size=cfg.image_size, batch_size=cfg.batch_size,
            pool_size=cfg.pool_size, mask_weighted=cfg.mask_weighted, workers=cfg.workers, device=dist.device,
            progress_task=(lambda k: progress.advance(task, k)) if progress is not None else None)
        metadata = {
            **extractor.metadata, "annotations": str(cfg.annotations), "image_size": cfg.image_size,
            "pool_size": cfg.pool_size, "mask_weighted": cfg.mask_weighted, "images": result["images"],
            "instances": result["instances"], "crowd_skipped": result["crowd_skipped"],
            "world_size": dist.world_size, "seed": cfg.seed,
        }
        if dist.is_main:
            save_prototypes(cfg.out, result["prototypes"], result["counts"], result["similarity"],
                            result["category_ids"], metadata)
        distributed.barrier()
        return (result, extractor.dim, dist.world_size) if dist.is_main else None
