"""`slsd retrieve`: find unlabeled pool images for rare classes (DINOv2 crops -> faiss -> dedup)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slsd_cli.progress import console, info, progress, warn


def retrieve(
    annotations: Path = typer.Option(..., "--annotations", help="Labeled LVIS/COCO json (the queries come from it)."),
    images: Path = typer.Option(..., "--images", help="Folder holding the labeled images."),
    pool: Path = typer.Option(
        ..., "--pool", help="Unlabeled pool: a folder of images, a .txt list of file names, or an image-list json."),
    out: Path = typer.Option(
        ..., "--out", help="Output unlabeled.json (retrieval.jsonl and retrieval_summary.json go next to it)."),
    pool_images: Optional[Path] = typer.Option(
        None, "--pool-images", help="Folder a pool json/.txt's file names are relative to (default: --images)."),
    queries: str = typer.Option(
        "rare", "--queries", help="Query classes: rare, common, frequent, all, or a comma list."),
    k: int = typer.Option(64, "--k", help="Neighbours per query instance."),
    embedder: str = typer.Option(
        "vit_large_patch14_dinov2.lvd142m", "--embedder",  # retrieval.embedders.DEFAULT_EMBEDDER
        help="timm model name (default DINOv2 ViT-L/14; efficientnet_lite0 loads ImageNet weights shipped with slsd, "
             "offline), 'colorhist' (weight-free colour baseline), or slsd:RUN_DIR."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Local weights for a timm embedder (safetensors or torch state dict)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random embedder weights (tests)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Embedder input size (default: the model's)."),
    crop_margin: float = typer.Option(
        0.25, "--crop-margin", help="Context around a query box, per side, as a fraction of its longer side."),
    index: str = typer.Option("auto", "--index", help="auto (flat up to 200k images, else ivfpq), flat or ivfpq."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default ~4*sqrt(N), a power of two)."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="PQ sub-quantizers, bytes per code (default D/4)."),
    ivf_refine: str = typer.Option("sq8", "--ivf-refine", help="Re-ranking copy for ivfpq: sq8, fp16, flat or none."),
    target_recall: float = typer.Option(
        0.95, "--target-recall", help="ivfpq: recall@k the nprobe/k_factor tuning aims for."),
    dedup_threshold: float = typer.Option(
        0.97, "--dedup-threshold", help="Cosine at or above which retrieved images are near duplicates."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir",
        help="Embedding cache, shared by all ranks (default: retrieval_cache/ next to --out); runs resume from it."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Images per cache chunk file."),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Skip unreadable pool images (counted and reported) instead of stopping."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per embedder batch (per process)."),
    workers: int = typer.Option(4, "--workers", help="Data loader worker processes (per process)."),
    seed: int = typer.Option(0, "--seed", help="Seed (random-init weights, IVF training sample)."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
) -> None:
    """Retrieve unlabeled images for the chosen classes: every labeled instance (a context crop) queries
    the pool for its k nearest images; the union, without labeled images and duplicates, is written as
    an LVIS image list. Runs under torchrun (each process embeds a shard of the pool).

    Example: slsd retrieve --annotations synth/train.json --images synth/images --pool synth/pool.json --embedder colorhist --k 16 --out retrieved/unlabeled.json
    """
    from slsd_cli.retrieval.pipeline import RetrieveConfig, run_retrieve

    cfg = RetrieveConfig(
        annotations=annotations, images=images, pool=pool, out=out, pool_images=pool_images, queries=queries, k=k,
        embedder=embedder, weights=weights, random_init=random_init, image_size=image_size, crop_margin=crop_margin,
        index=index, nlist=nlist, pq_m=pq_m, ivf_refine=ivf_refine, target_recall=target_recall,
        dedup_threshold=dedup_threshold, cache_dir=cache_dir, chunk_size=chunk_size, skip_bad_images=skip_bad_images,
        batch_size=batch_size, workers=workers, seed=seed, force=force)
    with progress() as bar:  # run_retrieve joins and leaves the torchrun process group itself
        summary = run_retrieve(cfg, progress=bar)
    if summary is not None:
        print_summary(summary)


def print_summary(summary: dict) -> None:
    from rich.table import Table
    from slsd_cli import distributed

    table = Table(title="slsd retrieve", show_header=True, header_style="bold")
    table.add_column("query group")
    table.add_column("classes", justify="right")
    table.add_column("query instances", justify="right")
    table.add_column("images retrieved", justify="right")
    for group, images in summary["images_per_group"].items():
        table.add_row(group, str(summary["query_classes"][group]), str(summary["queries"][group]), str(images))
    table.add_row("[bold]all", str(sum(summary["query_classes"].values())), str(sum(summary["queries"].values())),
                  f"[bold]{summary['retrieved_images']}")
    if distributed.is_main():
        console.print(table)
    idx = summary["index"]
    tuned = ""
    if idx.get("tuning"):
        t = idx["tuning"]
        tuned = (f", nprobe {idx['nprobe']}, k_factor {idx['k_factor']}, tuned recall@{summary['k']} "
                 f"{t['recall']:.3f} (target {t['target']})")
    info(f"pool {summary['pool_images']} images: {summary['bad_images_skipped']} unreadable skipped, "
         f"{summary['labeled_excluded']} labeled excluded ({summary['labeled_excluded_by_content']} by content, "
         f"{summary['labeled_excluded_by_name']} by name), {summary['exact_duplicates_removed']} exact duplicates; "
         f"{summary['indexed']} indexed ({idx['kind']}{tuned}); {summary['selected']} selected, "
         f"{summary['near_duplicates_removed']} near duplicates (cos >= {summary['dedup_threshold']}) -> "
         f"{summary['retrieved_images']} images in {summary['outputs']['unlabeled']}")
    if idx.get("tuning") and not idx["tuning"]["reached"]:
        warn(f"the IVF-PQ tuning did not reach recall {idx['tuning']['target']} (best {idx['tuning']['recall']:.3f}); "
             "raise --pq-m, use --ivf-refine fp16/flat, or --index flat")
    for bad in summary["bad_images"][:5]:
        warn(f"skipped unreadable pool image {bad['file_name']}: {bad['error']}")
