"""How good a retrieval is, where the pool's hidden ground truth is known (`slsd synth`'s pool_gt.json).

Own-class enrichment: for each query instance (one line of `retrieval.jsonl`), the share of its
neighbours that contain the query's class, averaged over queries, divided by the same class's share
of the whole pool averaged over the same queries (what a random sample would give). 1.0 = no better
than chance.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from slsd_cli.errors import InputError
from slsd_cli.io import read_json, read_jsonl


def own_class_enrichment(retrieval_jsonl: str | Path, pool_gt: str | Path) -> dict[str, float]:
    """{'precision': mean share of neighbours holding the query's class, 'base': mean pool share of
    the query classes, 'enrichment': precision / base, 'queries': number of queries}."""
    gt = read_json(pool_gt)
    if not isinstance(gt, dict) or "annotations" not in gt or "images" not in gt:
        raise InputError("not a pool ground-truth json (needs 'images' and 'annotations')", path=pool_gt)
    classes_of: dict[int, set[int]] = defaultdict(set)
    for ann in gt["annotations"]:
        classes_of[int(ann["image_id"])].add(int(ann["category_id"]))
    pool_ids = [int(img["id"]) for img in gt["images"]]
    share = {c: float(np.mean([c in classes_of[i] for i in pool_ids])) for c in
             {c for cs in classes_of.values() for c in cs}}
    hits, base = [], []
    for line in read_jsonl(retrieval_jsonl):
        neighbours = [int(n["image_id"]) for n in line.get("neighbours", [])]
        if not neighbours:
            continue
        c = int(line["category_id"])
        hits.append(np.mean([c in classes_of[i] for i in neighbours]))
        base.append(share.get(c, 0.0))
    if not hits:
        raise InputError("no query with neighbours", path=retrieval_jsonl)
    precision, chance = float(np.mean(hits)), float(np.mean(base))
    return {"precision": precision, "base": chance,
            "enrichment": precision / chance if chance > 0 else float("nan"), "queries": len(hits)}
