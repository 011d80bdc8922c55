"""How well a class similarity S (prototypes, Eq. 1) agrees with a known one.

On the synthetic benchmark `slsd synth` writes the true class similarity to `classes.json`
(`similarity`: the fraction of shared attributes — shape, colour, texture — per pair of classes,
rows in the order of `classes`). The agreement is the Spearman rank correlation between S and that
similarity over the pairs of distinct classes that both have a prototype (instance count > 0), each
pair once (upper triangle). Ties get average ranks, as the true similarity takes only 4 values.

A random-init backbone gives S ~ 0.98 for every pair (Spearman ~ 0.1-0.2): similarity smoothing
then is uniform smoothing. Pretrained features should rank same-attribute pairs higher.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slsd_cli.errors import InputError
from slsd_cli.io import read_json


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array; tied values share the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long 1-d arrays (NaN if either is constant or
    shorter than 2)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"need two arrays of the same length, got {a.shape} and {b.shape}")
    if a.size < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (a.size + 1) / 2.0, average_ranks(b) - (b.size + 1) / 2.0
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def similarity_spearman(similarity: torch.Tensor | np.ndarray, reference: np.ndarray,
                        counts: torch.Tensor | np.ndarray | None = None) -> float:
    """Spearman between two [C, C] similarities over the pairs i < j of classes with counts > 0."""
    s = np.asarray(similarity, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if s.shape != r.shape or s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"need two [C, C] matrices, got {s.shape} and {r.shape}")
    present = np.ones(s.shape[0], dtype=bool) if counts is None else np.asarray(counts).reshape(-1) > 0
    keep = np.flatnonzero(present)
    rows, cols = np.triu_indices(len(keep), k=1)
    return spearman(s[keep[rows], keep[cols]], r[keep[rows], keep[cols]])


def true_similarity(classes_json: str | Path, category_ids: list[int]) -> np.ndarray:
    """The `[C, C]` attribute similarity of `classes.json`, in the order of `category_ids`."""
    data = read_json(classes_json)
    if not isinstance(data, dict) or "similarity" not in data or "classes" not in data:
        raise InputError("not a classes.json from slsd synth (needs 'classes' and 'similarity')", path=classes_json)
    ids = [int(c["id"]) for c in data["classes"]]
    sim = np.asarray(data["similarity"], dtype=np.float64)
    if sim.shape != (len(ids), len(ids)):
        raise InputError(f"similarity is {sim.shape}, expected {len(ids)} x {len(ids)}", path=classes_json)
    missing = sorted(set(category_ids) - set(ids))
    if missing:
        raise InputError(f"{len(missing)} category ids are not in this file (e.g. {missing[:5]})", path=classes_json)
    index = [ids.index(i) for i in category_ids]
    return sim[np.ix_(index, index)]


def prototypes_spearman(prototypes_file: str | Path, classes_json: str | Path) -> float:
    """Spearman of a prototypes file's S against the true similarity of `classes.json`."""
    from slsd_cli.labels.smoothing import load_prototypes

    protos = load_prototypes(prototypes_file)
    reference = true_similarity(classes_json, protos["category_ids"])
    return similarity_spearman(protos["similarity"].double().numpy(), reference, protos["counts"].numpy())


def row_spearman(s_prime: torch.Tensor | np.ndarray, reference: np.ndarray,
                 counts: torch.Tensor | np.ndarray | None = None) -> float:
    """Mean over classes i of the Spearman between row i of `S′` (Eq. 2) and row i of the true
    similarity, over the other classes j ≠ i with counts > 0: does the smoothing mass of a class go
    to the classes that really resemble it? (NaN when no row has 2 such classes.)"""
    s = np.asarray(s_prime, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if s.shape != r.shape or s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"need two [C, C] matrices, got {s.shape} and {r.shape}")
    present = np.ones(s.shape[0], dtype=bool) if counts is None else np.asarray(counts).reshape(-1) > 0
    values = []
    for i in np.flatnonzero(present):
        others = present.copy()
        others[i] = False
        value = spearman(s[i, others], r[i, others])
        if value == value:
            values.append(value)
    return float(np.mean(values)) if values else float("nan")


def smoothing_vs_uniform(similarity_table: torch.Tensor, uniform_table: torch.Tensor) -> float:
    """Mean over classes of the total variation between the similarity-smoothing target of a class
    (a row of Eq. 3's table) and its uniform-smoothing target: 0 = the two smoothings are the same
    thing, ε at most (all the smoothing mass moved)."""
    a, b = similarity_table.double(), uniform_table.double()
    if a.shape != b.shape:
        raise ValueError(f"need two tables of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(0.5 * (a - b).abs().sum(dim=1).mean())


def smoothing_quality(prototypes_file: str | Path, classes_json: str | Path, epsilon: float, gamma: float,
                      temperature: float = 1.0) -> dict[str, float]:
    """What similarity smoothing does at a setting, against the truth of `classes.json`:
    'tv_uniform' (`smoothing_vs_uniform`), 'row_spearman' (`row_spearman` of S′) and 'spearman'
    (of S itself, `similarity_spearman`)."""
    from slsd_cli.labels.smoothing import frequency_modulated_similarity, load_prototypes, smoothed_targets, \
        uniform_targets

    protos = load_prototypes(prototypes_file)
    reference = true_similarity(classes_json, protos["category_ids"])
    s_prime = frequency_modulated_similarity(protos["similarity"], protos["counts"], gamma, temperature)
    table = smoothed_targets(s_prime, epsilon)
    counts = protos["counts"].numpy()
    return {"tv_uniform": smoothing_vs_uniform(table, uniform_targets(table.shape[0], epsilon)),
            "row_spearman": row_spearman(s_prime.numpy(), reference, counts),
            "spearman": similarity_spearman(protos["similarity"].double().numpy(), reference, counts)}
