"""`slsd predict`: a trained (or converted) detector on any images -> a results json with RLE masks."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info
from slsd_cli.recipe import flag_help

# the post-processing flags of eval and predict: model test keys for one run (the run's own by default)
SOFT_NMS_HELP = flag_help("model.test_soft_nms", "Class-wise soft-NMS instead of hard NMS (EVA-02's 'sys' "
                          "evaluation: linear, with --soft-nms-iou 0.6); none turns it off.")
SOFT_NMS_IOU_HELP = flag_help("model.test_soft_nms_iou", "Linear soft-NMS: a box's score decays by 1 - IoU when "
                              "its IoU with a better box of its class is at least this.")
SOFT_NMS_SIGMA_HELP = flag_help("model.test_soft_nms_sigma", "Gaussian soft-NMS: scores decay by exp(-IoU^2 / sigma).")
MASKNESS_HELP = flag_help("model.test_maskness", "Rescore each detection by its mask quality: score x the mean mask "
                          "probability over the pixels above this (EVA-02's 'sys' evaluation: 0.5).")


def predict(
    images: List[str] = typer.Argument(..., help="Image folders, glob patterns ('data/*.jpg', quoted), image "
                                                 "files or image-list jsons (a list of paths, or "
                                                 "{\"images\": [{\"id\", \"file_name\"}]})."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="The trained model: an slsd run directory (train-teacher, "
                                                   "distill or convert) or its model.safetensors. Required (the "
                                                   "older form 'slsd predict RUN IMAGES...' still works)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output results json (LVIS/COCO results format, RLE masks); "
                                                      "OUT.images.json beside it lists the image ids and files."),
    model: str = typer.Option("student", "--model", help="Of a distillation run: student (RUN/, default) or "
                                                         "teacher (RUN/teacher)."),
    images_dir: Optional[Path] = typer.Option(None, "--images-dir", help="Folder that an image-list json's file "
                                                                         "names are relative to (default: the "
                                                                         "json's folder)."),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold", min=0.0, max=1.0,
                                                    help="Keep detections scoring above this (default: the "
                                                         "model's test_score_threshold)."),
    score_alias: Optional[float] = typer.Option(None, "--score", min=0.0, max=1.0, hidden=True,
                                                help="Old spelling of --score-threshold."),
    max_dets: int = typer.Option(300, "--max-dets", min=1, help="Detections per image (top by score)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1,
                                             help="Test size: longest image edge (default: the model's image_size)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per forward pass."),
    amp: str = typer.Option("auto", "--amp", help="Precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    render: Optional[Path] = typer.Option(None, "--render", help="Also draw each image with its masks, boxes and "
                                                                 "labels into this folder (PNG)."),
    render_score_threshold: Optional[float] = typer.Option(None, "--render-score-threshold", min=0.0, max=1.0,
                                                           help="Draw only detections scoring at least this "
                                                                "(default 0.5)."),
    render_score_alias: Optional[float] = typer.Option(None, "--render-score", min=0.0, max=1.0, hidden=True,
                                                       help="Old spelling of --render-score-threshold."),
    workers: int = typer.Option(0, "--workers", min=0, help="Image-loading worker processes per rank."),
    soft_nms: Optional[str] = typer.Option(None, "--soft-nms", help=SOFT_NMS_HELP),
    soft_nms_iou: Optional[float] = typer.Option(None, "--soft-nms-iou", help=SOFT_NMS_IOU_HELP),
    soft_nms_sigma: Optional[float] = typer.Option(None, "--soft-nms-sigma", help=SOFT_NMS_SIGMA_HELP),
    maskness: Optional[float] = typer.Option(None, "--maskness", help=MASKNESS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
) -> None:
    """Run a detector over a folder, a glob or an image list and write LVIS/COCO results (RLE masks).

    Sharded under torchrun (each rank writes a shard, rank 0 merges them):
    torchrun --nproc_per_node 8 --no-python slsd predict --checkpoint RUN images/ --out results.json

    --soft-nms and --maskness change the post-processing for this run (the run's model test keys
    otherwise); --amp auto says on one line which precision it chose.

    Example: slsd predict --checkpoint runs/student photos/ --out photos_results.json --render photos_drawn
    """
    from slsd_cli.commands._options import renamed
    from slsd_cli.errors import InputError
    from slsd_cli.inference.predict import PredictConfig, run_predict

    score = renamed(score_threshold, score_alias, "--score-threshold", "--score")
    render_score = renamed(render_score_threshold, render_score_alias, "--render-score-threshold", "--render-score")
    if checkpoint is None:  # the first form of the command: slsd predict RUN IMAGES...
        if len(images) < 2:
            raise InputError("give the model with --checkpoint RUN (a run directory or its model.safetensors)")
        checkpoint, images = Path(images[0]), images[1:]
    drawn = {} if render_score is None else {"render_score": render_score}  # None: PredictConfig's default
    cfg = PredictConfig(checkpoint=checkpoint, images=list(images), out=out, model=model, images_dir=images_dir,
                        score=score, max_dets=max_dets, image_size=image_size, batch_size=batch_size, amp=amp,
                        render=render, workers=workers, force=force, soft_nms=soft_nms,
                        soft_nms_iou=soft_nms_iou, soft_nms_sigma=soft_nms_sigma, maskness=maskness, **drawn)
    summary = run_predict(cfg)
    if summary is None:  # not rank 0
        return
    message = f"predictions -> {summary['results']} (images: {summary['images_index']}), {summary['predict_s']:.1f} s"
    if cfg.render is not None:
        message += f"; {summary['drawings']} drawings -> {cfg.render} ({summary['render_s']:.1f} s)"
    info(message)
