"""The numbers that explain a demo result, read from the files the pipeline wrote.

- class-similarity quality: Spearman of the prototypes' S against the true attribute similarity
  of `classes.json` (`labels.similarity_check`);
- calibration: ECE and the mean CCECE Δ per r/c/f group of a `calibration.json` (the paper's premise:
  frequent classes over-confident, Δ < 0; rare classes under-confident, Δ > 0);
- pseudo-labels per unlabeled image, overall and per r/c/f group of the detected class, and what
  the calibration correction (Eq. 5) did to their targets, from a distillation run's `metrics.jsonl`;
- retrieval: own-class enrichment of the neighbours (`retrieval.quality`) and the share of retrieved
  images holding a rare class against the whole pool's share.
"""

from __future__ import annotations

import math
import resource
import statistics
from pathlib import Path

from slsd_cli.data.lvis import FREQUENCY_GROUPS as GROUPS
from slsd_cli.io import read_json, read_jsonl
_PSEUDO_KEYS = {"all": "pl_per_image", "r": "pl_per_image_r", "c": "pl_per_image_c", "f": "pl_per_image_f",
                "confidence": "pl_confidence"}


def pseudo_label_counts(metrics_path: str | Path) -> dict[str, float]:
    """Mean pseudo-labels per unlabeled image over a distillation run's log windows, overall and per
    r/c/f group of the detected class, and their mean confidence (NaN when nothing was logged)."""
    records = [r for r in read_jsonl(metrics_path) if "pl_per_image" in r]
    if not records:
        return {k: math.nan for k in _PSEUDO_KEYS}
    return {k: statistics.mean(float(r.get(key, 0.0)) for r in records) for k, key in _PSEUDO_KEYS.items()}


def correction_effect(metrics_path: str | Path) -> dict[str, float] | None:
    """What Eq. 5 did to the pseudo-labels of a distillation run, from its log windows (each weighted
    by its pseudo-labels): per r/c/f group of classes, the target mass per pseudo-label before the
    correction ('mass_{g}_before'), moved into and out of the group ('mass_{g}_in', 'mass_{g}_out')
    and after ('mass_{g}_after'); per r/c/f group of the detected class, the mean target of the
    detected class before and after ('top_{g}_before', 'top_{g}_after'; NaN without such a label)
    and its pseudo-labels per image ('pl_{g}'); masses are NaN when no pseudo-label was given. None
    for a run that logged none of it."""
    records = [r for r in read_jsonl(metrics_path) if "pl_mass_r_before" in r]
    if not records:
        return None

    def mean(key: str, weight_key: str = "pl_per_image") -> float:
        w = [float(r.get(weight_key, 0.0)) for r in records]
        total = sum(w)
        return sum(wi * float(r[key]) for wi, r in zip(w, records)) / total if total > 0 else math.nan

    out: dict[str, float] = {}
    for g in GROUPS:
        for part in ("before", "in", "out"):
            out[f"mass_{g}_{part}"] = mean(f"pl_mass_{g}_{part}")
        out[f"mass_{g}_after"] = out[f"mass_{g}_before"] + out[f"mass_{g}_in"] - out[f"mass_{g}_out"]
        for part in ("before", "after"):
            out[f"top_{g}_{part}"] = mean(f"pl_top_{g}_{part}", f"pl_per_image_{g}")
        out[f"pl_{g}"] = statistics.mean(float(r.get(f"pl_per_image_{g}", 0.0)) for r in records)
    return out


def calibration_summary(path: str | Path) -> dict[str, float]:
    """{'ece', 'delta_r', 'delta_c', 'delta_f'} of a calibration.json (mean Δ over the group's classes
    with detections; NaN for a group without any)."""
    data = read_json(path)
    out = {"ece": float(data["ece"])}
    for g in GROUPS:
        group = data.get("groups", {}).get(g, {})
        with_dets = group.get("classes_with_detections", 0)
        value = group.get("mean_delta")
        out[f"delta_{g}"] = float(value) if with_dets and value is not None else math.nan
    return out


def similarity_quality(prototypes: str | Path, classes_json: str | Path) -> float:
    from slsd_cli.labels.similarity_check import prototypes_spearman

    return prototypes_spearman(prototypes, classes_json)


def retrieval_quality(retrieval_dir: str | Path, pool_gt: str | Path) -> dict[str, float]:
    """Own-class enrichment of the neighbours, and the rare share of the retrieved images against the
    pool's ('rare_share', 'pool_rare_share', 'rare_enrichment', 'retrieved', 'pool')."""
    from slsd_cli.retrieval.quality import own_class_enrichment

    retrieval_dir = Path(retrieval_dir)
    out = dict(own_class_enrichment(retrieval_dir / "retrieval.jsonl", pool_gt))
    gt = read_json(pool_gt)
    rare = {c["id"] for c in gt["categories"] if c.get("frequency") == "r"}
    with_rare = {a["image_id"] for a in gt["annotations"] if a["category_id"] in rare}
    pool_ids = [img["id"] for img in gt["images"]]
    chosen = [img["id"] for img in read_json(retrieval_dir / "unlabeled.json")["images"]]
    share = sum(i in with_rare for i in chosen) / len(chosen) if chosen else math.nan
    base = sum(i in with_rare for i in pool_ids) / len(pool_ids) if pool_ids else math.nan
    out.update(rare_share=share, pool_rare_share=base, rare_enrichment=share / base if base else math.nan,
               retrieved=len(chosen), pool=len(pool_ids))
    return out


def peak_memory_mb() -> float:
    """Peak resident memory of this process or its children (the steps run in-process)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB
