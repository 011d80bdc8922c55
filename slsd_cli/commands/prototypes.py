"""`slsd prototypes`: class prototypes (paper Eq. 1) and their cosine similarity, from a backbone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from slsd_cli.progress import info, progress, warn


def prototypes(
    annotations: Path = typer.Option(..., "--annotations",
                                     help="Labeled LVIS/COCO json (the teacher's training split)."),
    images: Path = typer.Option(..., "--images", help="Folder holding the annotations' image files."),
    out: Path = typer.Option(..., "--out", help="Output prototypes.safetensors."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone",
        help="timm model name, e.g. eva02_large_patch14_224.mim_m38m (pretrained by name when online); "
             "efficientnet_lite0 loads ImageNet weights shipped with slsd, offline."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Local backbone weights for --backbone (safetensors, or a torch state dict)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random backbone weights (tests, demo)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Use the backbone of an slsd detector run instead of --backbone."),
    feature_level: int = typer.Option(-1, "--feature-level",
                                      help="timm feature level (index into feature_info; -1 = last)."),
    image_size: int = typer.Option(1024, "--image-size", min=16,
                                   help="Longest image edge after resizing (then padded square)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per backbone batch (per process)."),
    pool_size: int = typer.Option(7, "--pool-size", min=1, help="RoIAlign bins per side."),
    mask_weighted: bool = typer.Option(False, "--mask-weighted", help="Weight the RoIAlign bins by the instance mask."),
    workers: int = typer.Option(0, "--workers", min=0, help="Data loader worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seed (random-init weights)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Compute class prototypes (Eq. 1) and their cosine similarity, for similarity label smoothing.

    A prototype is the mean RoIAlign embedding of a class's instances on the backbone feature map.

    Under torchrun each process embeds a shard of the images; the sums are all-reduced.

    Example: slsd prototypes --annotations train.json --images synth/images --backbone resnet18 --random-init
    --out prototypes.safetensors
    """
    from slsd_cli.labels.prototypes import PrototypesConfig, run_prototypes

    cfg = PrototypesConfig(
        annotations=annotations, images=images, out=out, backbone=backbone, weights=weights,
        random_init=random_init, checkpoint=checkpoint, feature_level=feature_level, image_size=image_size,
        batch_size=batch_size, pool_size=pool_size, mask_weighted=mask_weighted, workers=workers, seed=seed,
        force=force)
    started = time.perf_counter()
    with progress() as bar:
        done = run_prototypes(cfg, progress=bar)
    if done is not None:
        result, dim, world_size = done
        _summary(result, dim, world_size, out, time.perf_counter() - started)

def _summary(result: dict, dim: int, world_size: int, out: Path, seconds: float) -> None:
    import torch

    counts = result["counts"]
    missing = int((counts == 0).sum())
    if missing:
        warn(f"{missing} of {counts.numel()} classes have no instance: zero prototype, no smoothing mass")
    if result["crowd_skipped"]:
        info(f"left out {result['crowd_skipped']} crowd annotations (iscrowd = 1)")
    sim = result["similarity"]
    present = counts > 0
    off = sim[present][:, present]
    off = off[~torch.eye(off.shape[0], dtype=torch.bool)]
    info(f"prototypes: {counts.numel()} classes x {dim} dims from {result['instances']} instances in "
         f"{result['images']} images ({world_size} process(es), {seconds:.1f} s); "
         f"off-diagonal similarity mean {off.mean().item() if off.numel() else 0:.3f}, "
         f"max {off.max().item() if off.numel() else 0:.3f} -> {out}")
