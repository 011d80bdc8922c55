"""`slsd split`: train / held-out split and nested label fractions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer



def split(
    annotations: Path = typer.Argument(..., help="LVIS v1 or COCO instances json to split."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for train.json, holdout.json, train_frac*.json."),
    holdout: float = typer.Option(0.15, "--holdout", help="Share of the images held out (paper: 0.15)."),
    fraction: Optional[List[float]] = typer.Option(
        None, "--fraction", help="Also write train_frac{F}.json with this share of the training images "
        "(repeatable; subsets are nested)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image permutation."),
    stratify: bool = typer.Option(
        False, "--stratify", help="Move the fewest images needed so that holdout.json holds an image of every class "
        "with at least 2 images (so that slsd calibrate can measure its Delta) and train.json keeps one of every "
        "class; the held-out share stays the same."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
) -> None:
    """Split annotations by image into train.json and holdout.json, plus nested label fractions.

    Example: slsd split lvis_v1_train.json --stratify --fraction 0.01 --fraction 0.1 --out-dir splits
    """
    from slsd_cli.data.split import split_dataset

    summary = split_dataset(annotations, out_dir, holdout=holdout, fractions=fraction or [], seed=seed,
                            force=force, stratify=stratify)
    for out in summary["outputs"]:
        freq = out["frequency"]
        typer.echo(f"{out['path']}: {out['images']} images, {out['annotations']} annotations, "
                   f"{out['categories_present']} categories present (r/c/f {freq['r']}/{freq['c']}/{freq['f']})")
    strata = summary["stratify"]
    if strata is not None:
        uncovered = strata["uncovered"]
        typer.echo(f"stratified: {strata['moved']} images moved; {strata['classes_needing']} classes with >= 2 images, "
                   f"{len(uncovered)} of them without a held-out image"
                   + (f" (ids {', '.join(map(str, uncovered[:20]))}{' ...' if len(uncovered) > 20 else ''})"
                      if uncovered else "")
                   + f"; {len(strata['untrained'])} classes without a training image")
