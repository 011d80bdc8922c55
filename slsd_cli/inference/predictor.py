"""`Predictor`: the one way to run a trained detector (as SAM's `SamPredictor`).

Every user of a saved model goes through it: `slsd eval / calibrate / predict --checkpoint`, class
prototypes from a checkpoint and the `slsd:RUN` retrieval embedder. (The distillation teacher does
not: it is the EMA model inside a training step and calls `CascadeMaskRCNN.predict` directly on the
weak views as collated for training; `engine/distill.py`, `DistillPhase.pseudo_labels`.) It owns
what must be the same everywhere:

- loading a run (`Predictor.from_run(RUN, kind="student"|"teacher")`: RUN/ or RUN/teacher/);
- the test input: images resized so the longest edge is `image_size` (default: the model's), then
  padded the way the model was trained — a ViT sees the square canvas of side
  max(model image_size, test image_size), a CNN a size-divisible box (`CascadeMaskRCNN.preprocess`);
  so an image's detections never depend on the other images of its batch;
- the score threshold (`predict(..., score_threshold=)`, default the model's `test_score_threshold`);
- the post-processing: the model's test keys, or per run `test_options` ({"test_soft_nms": "linear",
  "test_maskness": 0.5, ...}: `ModelConfig` keys, checked as a recipe's);
- precision: `amp` auto (bf16 autocast on CUDA, fp32 on CPU and for a checkpoint converted from the
  EVA-02 reference), fp32, bf16 or fp16; `precision_note` says what was chosen;
- backbone features (`features`) over the same canvas, with the valid extent of each image.

Tensor contract: `images` float/uint8 [B, 3, H, W] RGB 0..255, zero-padded at the bottom/right;
`image_sizes[i]` the valid (h, w) of image i. `predict` -> `CascadeMaskRCNN.predict`'s dicts.
Sharded results writing (a results json over an annotations file's images) is
`slsd_cli.inference.sharded.predict_to_results`.

`slsd predict` (`slsd_cli.inference.predict`) is `run_predict(PredictConfig(...))`: a run over a folder / glob / image list ->
`cfg.out` (results json, RLE masks) + `OUT.images.json` (the images and categories), optionally one
rendered PNG per image in `cfg.render`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from slsd_cli.errors import InputError
from slsd_cli.precision import AMP_CHOICES, inference_amp_dtype


def autocast_dtype(amp: str, device: torch.device, converted: bool = False) -> torch.dtype | None:
    """The inference autocast dtype (None: fp32). auto = bf16 on CUDA, fp32 elsewhere and for a
    `converted` checkpoint (`precision.inference_amp_dtype`)."""
    if amp not in AMP_CHOICES:
        raise InputError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")
    return inference_amp_dtype(amp, device, converted)[0]


class Predictor:
    """A detector ready for inference: eval mode, its categories, test size and precision."""

    def __init__(self, model: nn.Module, category_ids: list[int], *, categories: list[dict] | None = None,
                 image_size: int | None = None, amp: str = "auto", meta: dict[str, Any] | None = None,
                 test_options: dict[str, Any] | None = None):
        self.model = model.module if hasattr(model, "module") else model  # unwrap DDP
        self.category_ids = [int(c) for c in category_ids]
        if len(self.category_ids) != self.model.num_classes:
            raise InputError(f"the model has {self.model.num_classes} classes but {len(self.category_ids)} "
                             "category ids were given")
        self.categories = categories if categories is not None else [{"id": c} for c in self.category_ids]
        trained = int(self.model.cfg.image_size)
        self.image_size = int(image_size or trained)
        if self.image_size < 1:
            raise InputError(f"image size must be positive, got {self.image_size}")
        # the square a ViT sees: never smaller than the one it was trained on
        self.canvas = max(trained, self.image_size)
        self.meta = meta or {}
        self.amp = amp
        self.dtype = autocast_dtype(amp, self.device, converted=bool(self.meta.get("converted_from")))
        self.test_options = {k: v for k, v in (test_options or {}).items() if v is not None}
        self.options = self.model.cfg
        if self.test_options:
            from slsd_cli.typed_yaml import apply_flags

            self.options = apply_flags(self.model.cfg, self.test_options)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run: str | Path, kind: str = "student", device: str | torch.device | None = None,
                 image_size: int | None = None, amp: str = "auto",
                 test_options: dict[str, Any] | None = None) -> "Predictor":
        """Load a run's student (RUN/) or teacher (RUN/teacher/), or a model.safetensors file."""
        from slsd_cli import distributed
        from slsd_cli.run_dir import resolve_model
        from slsd_cli.model.weights import load_detector

        if device is None:
            device = distributed.init().device
        model, meta = load_detector(resolve_model(run, kind), device)
        return cls(model, [c["id"] for c in meta["categories"]], categories=meta["categories"],
                   image_size=image_size, amp=amp, meta=meta, test_options=test_options)

    def with_options(self, image_size: int | None = None, amp: str | None = None,
                     category_ids: list[int] | None = None) -> "Predictor":
        """The same model with another test size, precision or category ids (None: keep)."""
        if image_size is None and amp is None and (category_ids is None or list(category_ids) == self.category_ids):
            return self
        same_ids = category_ids is None or list(category_ids) == self.category_ids
        return Predictor(self.model, self.category_ids if same_ids else category_ids,
                         categories=self.categories if same_ids else None, image_size=image_size or self.image_size,
                         amp=amp or self.amp, meta=self.meta, test_options=self.test_options)

    def precision_note(self) -> str:
        """One line: the precision this predictor runs in, and why."""
        return inference_amp_dtype(self.amp, self.device, bool(self.meta.get("converted_from")))[1]

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield

    # ------------------------------------------------------------------ inference
    def transform(self):
        """The test transform: the reference's resize (shortest edge, capped so the longest is
        `image_size`; detectron2's rounding, Pillow's bilinear)."""
        from slsd_cli.data.transforms import test_transform

        return test_transform(self.image_size)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                score_threshold: float | None = None) -> list[dict]:
        """Detections per image (see `CascadeMaskRCNN.predict`); float32 outputs whatever the amp."""
        with self._precision():
            per_run = {"options": self.options} if self.test_options else {}  # else the model's own keys
            dets = self.model.predict(images.to(self.device), image_sizes, score_threshold=score_threshold,
                                      canvas=self.canvas, **per_run)
        return [{k: (v.float() if torch.is_floating_point(v) else v) for k, v in d.items()} for d in dets]

    @torch.no_grad()
    def features(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None
                 ) -> tuple[Tensor, int, list[tuple[int, int]]]:
        """Plain backbone map [B, D, h, w] (float32) over the padded canvas, its stride, and each
        image's valid extent (rows, cols) in feature cells."""
        if image_sizes is None:
            image_sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        was_training = self.model.training
        self.model.eval()  # no drop path
        try:
            with self._precision():
                feats, stride = self.model.backbone_feature_map(images.to(self.device), image_sizes,
                                                                canvas=self.canvas)
        finally:
            self.model.train(was_training)
        extents = [(min(-(-h // stride), feats.shape[-2]), min(-(-w // stride), feats.shape[-1]))
                   for h, w in image_sizes]
        return feats.float(), int(stride), extents

    @property
    def feature_dim(self) -> int:
        return int(self.model.backbone.feature_dim)

    def square_canvas(self) -> int | None:
        """The side of the square every input is padded to (a ViT backbone: `canvas`), or None for
        a backbone that pads only to its size divisibility (a CNN)."""
        return self.canvas if self.model.backbone.square_canvas else None


def load_predictor(run: str | Path, kind: str = "student", device: str | torch.device | None = None,
                   image_size: int | None = None, amp: str = "auto", test_options: dict[str, Any] | None = None):
    """A `Predictor` for a run's student (default) or teacher."""
    return Predictor.from_run(run, kind, device=device, image_size=image_size, amp=amp, test_options=test_options)
