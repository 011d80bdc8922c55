"""How much of an AP is the evaluation set's luck: a bootstrap over evaluation images.

Each replicate draws the evaluation images with replacement; an image drawn k times enters k times
(copy j of the draw becomes image id j + 1, with the image's ground truth, its LVIS negative /
not-exhaustive lists and every model's detections on it), and `evaluation.evaluate` scores the
resampled set exactly as `slsd eval` scores the real one. Every model is scored on the *same*
draws, so the difference of two models in one replicate is a paired bootstrap sample of their
difference: its spread is the evaluation-set noise of that difference, which is smaller than the
noise of either AP when the models err on the same images.

Input: `Annotations` of the evaluation set and, per model name, its validated `results.Detections`
(RLE masks for segm). Output: per model name, a float array [replicates, len(keys)] of AP values in
[0, 1] (NaN where a replicate leaves a value undefined, e.g. no rare ground truth drawn).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from slsd_cli.data.lvis import Annotations
from slsd_cli.evaluation.metrics import evaluate
from slsd_cli.data.results import Detections
from slsd_cli.stats import bootstrap_indices

DEFAULT_KEYS = ("AP", "APr", "APc", "APf")


def _members(image_index: np.ndarray, num_images: int) -> list[np.ndarray]:
    """Per image position, the indices of the records on it."""
    order = np.argsort(image_index, kind="stable")
    bounds = np.searchsorted(image_index[order], np.arange(num_images + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(num_images)]


class Resampler:
    """Builds resampled evaluation sets of one `Annotations` and the detections of several models."""

    def __init__(self, annotations: Annotations, detections: Mapping[str, Detections]) -> None:
        self.annotations = annotations
        self.image_ids = annotations.image_ids  # sorted: Detections.image_index points into it
        self.detections = dict(detections)
        self._members = {name: _members(d.image_index, len(self.image_ids)) for name, d in self.detections.items()}

    def __call__(self, draw: Sequence[int]) -> tuple[Annotations, dict[str, Detections]]:
        """The set made of image positions `draw` (repeats allowed) and each model's detections."""
        images, anns = [], []
        for new_id, position in enumerate(draw, start=1):
            old_id = self.image_ids[position]
            images.append({**self.annotations.images[old_id], "id": new_id})
            for ann in self.annotations.anns_by_image.get(old_id, ()):
                anns.append({**ann, "id": len(anns) + 1, "image_id": new_id})
        data = {**self.annotations.data, "images": images, "annotations": anns}
        sample = Annotations(path=self.annotations.path, data=data, protocol=self.annotations.protocol)
        out = {}
        for name, dets in self.detections.items():
            members = self._members[name]
            parts = [members[p] for p in draw]
            index = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            new_index = np.repeat(np.arange(len(draw), dtype=np.int64), [p.size for p in parts])
            out[name] = dataclasses.replace(dets.take(index), image_ids=new_index + 1, image_index=new_index)
        return sample, out


def bootstrap_metrics(annotations: Annotations, detections: Mapping[str, Detections], *,
                      replicates: int = 200, seed: int = 0, iou_type: str = "segm",
                      keys: Sequence[str] = DEFAULT_KEYS, max_dets: int = 300, workers: int = 1) -> dict[str, np.ndarray]:
    """Per model, [replicates, len(keys)] AP values over image resamples (the same draws for every
    model, from `seed`). `workers` > 1 scores the replicates in that many forked processes (fork, not
    spawn: spawn re-runs the caller's main module, e.g. `python -m slsd_cli`; the children run only
    numpy and pycocotools, never torch's thread pools). The result does not depend on `workers`."""
    resampler = Resampler(annotations, detections)
    draws = bootstrap_indices(len(resampler.image_ids), replicates, seed)
    job = _Job(resampler, iou_type, tuple(keys), max_dets)
    if workers > 1 and replicates > 1:
        import multiprocessing

        chunks = np.array_split(np.arange(replicates), min(workers, replicates))
        pool = multiprocessing.get_context("fork").Pool(len(chunks), initializer=_worker_signals)
        try:
            parts = pool.map(job, [draws[chunk] for chunk in chunks])
            pool.close()  # workers finish and exit on their own; terminate() is only for a failure
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:
        parts = [job(draws)]
    return {name: np.concatenate([part[name] for part in parts]) for name in detections}


def _worker_signals() -> None:
    """A forked worker inherits slsd's SIGINT / SIGTERM handlers, which leave a forked child's fate
    to its parent and so ignore the parent's own SIGTERM. Pool.terminate() drains the task queue, so
    an idle worker can lose its stop sentinel and relies on that SIGTERM: the pool then waited on it
    forever (the demo's closing bootstrap hung for minutes). Workers take the default actions
    instead, and ignore SIGINT: a terminal's Ctrl-C reaches the parent, which stops them."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Job:
    """Scores a block of draws (a picklable callable, so worker processes can run it)."""

    def __init__(self, resampler: Resampler, iou_type: str, keys: tuple[str, ...], max_dets: int) -> None:
        self.resampler, self.iou_type, self.keys, self.max_dets = resampler, iou_type, keys, max_dets

    def __call__(self, draws: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: np.full((len(draws), len(self.keys)), np.nan) for name in self.resampler.detections}
        for r, draw in enumerate(draws):
            sample, sample_dets = self.resampler(draw.tolist())
            for name, dets in sample_dets.items():
                metrics = evaluate(sample, dets, iou_types=(self.iou_type,), max_dets=self.max_dets)[self.iou_type]
                out[name][r] = [metrics[k] if metrics.get(k, -1) > -1 else np.nan for k in self.keys]
        return out
