"""`slsd synth OUT_DIR`: write the embedded long-tail benchmark (slsd_cli/data/synthetic.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slsd_cli.progress import info, progress, show


def synth(
    out_dir: Path = typer.Argument(..., help="Output folder: train/val/pool/pool_gt/classes/calib json + images/."),
    classes: int = typer.Option(40, "--classes", help="Number of classes (3-256; shape x colour x texture)."),
    train_images: Optional[int] = typer.Option(
        None, "--train-images", help="Labeled images (default: 500 for 40 classes, scaled with --classes)."),
    val_images: Optional[int] = typer.Option(
        None, "--val-images", help="Validation images (default: 100 for 40 classes, scaled with --classes)."),
    pool_images: Optional[int] = typer.Option(
        None, "--pool-images", help="Unlabeled pool images (default: 300 for 40 classes, scaled with --classes)."),
    calib_images: Optional[int] = typer.Option(
        None, "--calib-images", help="Images of the calibration split calib.json, for slsd calibrate: disjoint "
        "from the others, >= 5 images of every class (default: as many as --val-images)."),
    image_size: int = typer.Option(128, "--image-size", help="Square image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs in OUT_DIR."),
) -> None:
    """Write a small LVIS-format long-tail instance-segmentation benchmark with exact masks.

    Training image counts per class follow the LVIS v1 long tail (r <= 10, c 11-100, f > 100).

    Classes are shape x colour x texture families, so similar classes look alike.

    Other commands take --images OUT_DIR/images (file_name in every json is relative to it).

    calib.json is a calibration split (>= 5 images of every class) for slsd calibrate --annotations.

    Example: slsd synth data/synth --classes 40 --seed 0
    """
    from slsd_cli.data import synthetic

    with progress(transient=True) as bar:
        summary = synthetic.generate(out_dir, classes=classes, train_images=train_images, val_images=val_images,
                                     pool_images=pool_images, image_size=image_size, seed=seed, force=force,
                                     progress=bar, calib_images=calib_images)
    print_summary(summary)


def print_summary(summary: dict) -> None:
    from rich.table import Table

    from slsd_cli.data.lvis import FREQUENCY_GROUPS

    groups = summary["groups"]
    table = Table(title=f"slsd synth -> {summary['out_dir']}  ({summary['classes']} classes: "
                        f"{groups['r']} rare, {groups['c']} common, {groups['f']} frequent; "
                        f"{summary['image_size']}px, seed {summary['seed']}, {summary['seconds']:.1f} s)")
    for column in ("split", "images", "empty", "instances", "in r classes", "in c classes", "in f classes"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in summary["splits"].items():
        by_group = split["instances_by_group"]
        total = max(split["instances"], 1)
        table.add_row(name, str(split["images"]), str(split["empty_images"]), str(split["instances"]),
                      *(f"{by_group[g]} ({100 * by_group[g] / total:.1f}%)" for g in FREQUENCY_GROUPS))
    show(table)
    info(f"images: {summary['images_dir']}  (pass --images {summary['images_dir']})")
