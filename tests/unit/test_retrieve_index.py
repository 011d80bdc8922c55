"""Faiss search, tuning and selection helpers of `slsd retrieve` (small, CPU)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from slsd_cli.errors import InputError
from slsd_cli.retrieval import index as rindex
from slsd_cli.retrieval.images import PoolListing, crop_window
from slsd_cli.retrieval.pipeline import collapse_near_duplicates, exclusion_plan, parse_groups


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((clusters, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_choose_spec():
    assert rindex.choose_spec(200_000, 256).kind == "flat"
    # above 200k, exact search when it costs less than building the IVF index
    assert rindex.choose_spec(1_000_000, 256, num_queries=5_000).kind == "flat"
    assert rindex.choose_spec(1_000_000, 256, num_queries=50_000).kind == "ivfpq"
    assert rindex.choose_spec(100_000_000, 1024, num_queries=5_257).kind == "flat"   # LVIS v1 rare instances
    assert rindex.choose_spec(100_000_000, 1024, num_queries=1_270_141).kind == "ivfpq"  # all instances
    spec = rindex.choose_spec(1_000_000, 256)
    assert spec.kind == "ivfpq" and spec.nlist == 4096 and spec.m == 64 and spec.train_size == 163_840
    assert rindex.choose_spec(100_000_000, 1024).nlist == 32768
    assert rindex.default_m(1024) == 256 and rindex.default_m(108) == 27 and 384 % rindex.default_m(384) == 0
    small = rindex.choose_spec(2_000, 32, "ivfpq")
    assert small.nlist * 39 <= 2_000 and small.train_size == 2_000
    with pytest.raises(InputError, match="at least"):
        rindex.choose_spec(100, 32, "ivfpq")
    with pytest.raises(InputError, match="divide"):
        rindex.choose_spec(10_000, 32, "ivfpq", m=5)
    with pytest.raises(InputError, match="--index"):
        rindex.choose_spec(10, 32, "hnsw")


def test_exact_top_k_over_blocks_equals_flat_search():
    xb = _clustered(3_000, 16, 20, 1)
    xq = _clustered(50, 16, 20, 2)
    exact = rindex.ExactTopK(xq, 10)
    for s in range(0, len(xb), 700):
        exact.add(xb[s:s + 700], s)
    scores, rows = exact.result()
    flat = faiss.IndexFlatIP(16)
    flat.add(xb)
    ref_scores, ref_rows = flat.search(xq, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert rindex.recall_at_k(rows, ref_rows) > 0.999  # ties aside, the same neighbours


def test_ivfpq_tuning_reaches_the_target_recall_on_unseen_queries():
    d = 16
    xb = _clustered(6_000, d, 30, 1)
    tune_q, test_q = _clustered(200, d, 30, 2), _clustered(200, d, 30, 3)
    k = 10
    spec = rindex.choose_spec(len(xb), d, "ivfpq", seed=0)
    assert (spec.nlist, spec.m, spec.train_size) == (128, 4, 6_000)
    exact = rindex.ExactTopK(tune_q, k)
    index = rindex.build(spec, ((s, xb[s:s + 2000]) for s in range(0, len(xb), 2000)), train_vectors=xb,
                         exact=exact)
    assert index.ntotal == len(xb)
    tuning = rindex.tune_search(index, tune_q, exact.result()[1], k, target=0.95)
    assert tuning.reached and tuning.recall >= 0.95
    reaching = [t for t in tuning.tried if t["recall"] >= 0.95]
    assert rindex.search_cost(index, tuning.nprobe, tuning.k_factor, k) == min(t["cost"] for t in reaching)
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    _, truth = flat.search(test_q, k)
    _, rows = index.search(test_q, k)
    assert rindex.recall_at_k(rows, truth) >= 0.9
    # the IVF-PQ stage alone at one probe is clearly worse: the tuning did something
    index.set_search(1, 1)
    _, rows1 = index.search(test_q, k)
    assert rindex.recall_at_k(rows1, truth) < rindex.recall_at_k(rows, truth)
    assert index.code_bytes_per_vector() == 4 + 8 + 16  # PQ code + id + sq8 copy


def test_near_duplicates_collapse_greedily_in_order():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 8)).astype(np.float32)
    x = np.stack([base[0], base[1], base[0] + 1e-3, base[2], base[1] + 1e-3, base[0] + 2e-3, base[3]])
    faiss.normalize_L2(x)
    dup = collapse_near_duplicates(x, 0.999)
    assert dup.tolist() == [-1, -1, 0, -1, 1, 0, -1]
    assert collapse_near_duplicates(x, 1.0 + 1e-6).tolist() == [-1] * 7  # nothing is that similar


def _pool(names):
    return PoolListing.from_names(Path("/x"), names, ids=np.arange(len(names)) + 100)


def test_exclusion_plan():
    h = lambda v: np.full(16, v, dtype=np.uint8)  # noqa: E731
    pool = _pool(["a.png", "b.png", "c.png", "d/e.png", "train_1.png", "g.png", "h.png"])
    hashes = np.stack([h(1), h(2), h(1), h(3), h(4), h(9), h(2)])
    ok = np.array([True, True, True, True, True, False, True])
    plan = exclusion_plan(pool, ok, hashes, np.stack([h(3)]), {"train_1.png"})
    assert plan["labeled_by_hash"].tolist() == [False, False, False, True, False, False, False]
    assert plan["labeled_by_name"].tolist() == [False, False, False, False, True, False, False]
    assert plan["duplicate_of"].tolist() == [-1, -1, 0, -1, -1, -1, 1]
    assert plan["keep"].tolist() == [True, True, False, False, False, False, False]
    # two files whose hashes share the first 8 bytes but differ after are not duplicates
    a, b = h(7), h(7)
    b[15] = 8
    plan = exclusion_plan(_pool(["x.png", "y.png"]), np.array([True, True]), np.stack([a, b]),
                          np.zeros((0, 16), np.uint8), set())
    assert plan["keep"].tolist() == [True, True]


def test_crop_window_and_groups():
    assert crop_window((10, 10, 20, 10), 100, 100, 0.25) == (5, 0, 30, 30)   # square of 20 * 1.5, kept inside
    assert crop_window((0, 0, 90, 40), 100, 50, 0.5) == (0, 0, 100, 50)      # larger than the image: clipped
    assert crop_window((90, 90, 10, 10), 100, 100, 0.0) == (90, 90, 10, 10)
    assert parse_groups("all") == ["r", "c", "f"] and parse_groups("common, rare") == ["r", "c"]
    with pytest.raises(InputError):
        parse_groups("rare,weird")
