"""The option checks of `slsd eval` and `slsd calibrate`, made once in their configs
(`EvalConfig`, `CalibrateConfig`): the first wrong combination is an InputError naming the option,
before any file is read (no files exist here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slsd_cli.errors import InputError
from slsd_cli.evaluation.pipeline import EvalConfig
from slsd_cli.labels.calibrate_pipeline import CalibrateConfig

ANN, DETS, RUN, IMAGES = Path("gt.json"), Path("dets.json"), Path("run"), Path("images")
ONE_SOURCE = "give exactly one of --detections FILE or --checkpoint RUN (with --images)"


@pytest.mark.parametrize("make,images_are", [
    (lambda **kw: EvalConfig(annotations=ANN, out_dir=Path("out"), **kw), "the annotations' images"),
    (lambda **kw: CalibrateConfig(annotations=ANN, out=Path("cal.json"), **kw), "the held-out images"),
], ids=["eval", "calibrate"])
def test_exactly_one_source_and_a_checkpoint_needs_images(make, images_are):
    for kw in ({}, {"detections": DETS, "checkpoint": RUN, "images": IMAGES}):
        with pytest.raises(InputError) as caught:
            make(**kw)
        assert caught.value.message == ONE_SOURCE
    with pytest.raises(InputError) as caught:
        make(checkpoint=RUN)
    assert caught.value.message == f"--checkpoint needs --images (the folder of {images_are})"
    assert make(detections=DETS).detections == DETS
    assert make(checkpoint=RUN, images=IMAGES).checkpoint == RUN


def _eval(**kw) -> EvalConfig:
    return EvalConfig(annotations=ANN, out_dir=Path("out"), detections=DETS, **kw)


def _calibrate(**kw) -> CalibrateConfig:
    return CalibrateConfig(annotations=ANN, out=Path("cal.json"), detections=DETS, **kw)


@pytest.mark.parametrize("make,kw,message", [
    (_eval, {"protocol": "voc"}, "--protocol must be lvis or coco, got 'voc'"),
    (_eval, {"iou_type": "keypoints"}, "--iou-type must be bbox, segm or bbox,segm, got 'keypoints'"),
    (_eval, {"iou_type": " , "}, "--iou-type must be bbox, segm or bbox,segm, got ' , '"),
    (_eval, {"iou_type": "bbox,mask"}, "--iou-type must be bbox, segm or bbox,segm, got 'bbox,mask'"),
    (_calibrate, {"iou": 0.0}, "--iou must be > 0, got 0.0"),
    (_calibrate, {"iou": -0.5}, "--iou must be > 0, got -0.5"),
    (_calibrate, {"model": "ema"}, "--model must be student or teacher, got 'ema'"),
    (_calibrate, {"iou_type": "bbox,segm"}, "--iou-type must be bbox or segm, got 'bbox,segm'"),
], ids=["eval-protocol", "eval-iou-type", "eval-iou-type-empty", "eval-iou-type-one-bad", "calibrate-iou-zero",
        "calibrate-iou-negative", "calibrate-model", "calibrate-iou-type"])
def test_option_messages(make, kw, message):
    with pytest.raises(InputError) as caught:
        make(**kw)
    assert caught.value.message == message


def test_eval_iou_types_and_outputs():
    cfg = _eval(iou_type="segm, bbox,segm")
    assert cfg.iou_types == ("segm", "bbox")  # the order given, repeats dropped
    assert _eval().iou_types is None  # decided later
    assert (cfg.detections_out, cfg.metrics_out) == (Path("out/detections.json"), Path("out/metrics.json"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.protocol = "voc"  # a checked config stays checked


def test_the_source_is_checked_first():
    """Several wrong options: the source is named (as the command always did)."""
    with pytest.raises(InputError, match="exactly one of"):
        CalibrateConfig(annotations=ANN, out=Path("cal.json"), iou=0.0, model="ema")
    with pytest.raises(InputError, match="exactly one of"):
        EvalConfig(annotations=ANN, out_dir=Path("out"), protocol="voc")
