"""Faiss search over L2-normalised vectors (inner product = cosine similarity).

* `flat`: exact search. In `slsd retrieve` it streams the embedding cache chunk by chunk through
  `ExactTopK` (each torchrun rank its own chunks, on its GPU when there is one), so memory is the
  queries and their results only; cost N·D multiply-adds per query. (`Index` also wraps an
  in-memory `IndexFlatIP`, the benchmark's exact baseline.)
* `ivfpq`: `IndexIVFPQ` (inner product) with an exact-ish re-ranking stage, `IndexRefine`:
  the inverted file scans `nprobe` of `nlist` lists, ranks candidates by their PQ code
  (`m` sub-quantizers x 8 bits), and the best `k_factor · k` of them are re-scored with a finer
  copy of the vectors (`refine`: `sq8` = 1 byte per dimension, `fp16`, `flat` = float32, or `none`).
  Defaults: nlist ≈ 4·sqrt(N) (a power of two), m = D/4 (4 dimensions per sub-quantizer),
  refine sq8. Memory per vector: m (code) + 8 (id in its list) + refine (D for sq8).
  `nprobe` and `k_factor` are tuned on a sample of the queries against exact neighbours so that
  recall@k reaches a target (`tune_search`); the choice is by a deterministic cost model, not by
  wall time, so a run is repeatable.
* `auto`: flat up to `AUTO_FLAT_MAX` vectors; above that, flat whenever exact search costs no more
  than building the IVF index: Q·N·D multiply-adds against D·(N·nlist + train·nlist·iters) for
  assigning the pool to its lists and the coarse k-means (`ivf_build_macs`). That is the paper's
  case — a few thousand rare-class queries: at N = 1e8, D = 1024 the break-even is ~37k queries. Otherwise
  ivfpq. (Measured in `benchmarks/bench_retrieve.py`, 1M x 256-d: exact search of 10k queries took
  231 s, building the IVF-PQ index 336 s — the model's break-even there is 10.8k queries.)

On a machine with faiss-gpu and a CUDA device (`faiss.get_num_gpus() > 0`) the flat index and
the IVF-PQ stage move to the GPU(s) for search (`to_gpu`); the re-ranking stays on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import faiss
import numpy as np

from slsd_cli.errors import InputError

AUTO_FLAT_MAX = 200_000
REFINE_KINDS = ("sq8", "fp16", "flat", "none")
K_FACTORS = (1, 2, 4, 8)


@dataclass
class IndexSpec:
    kind: str                      # "flat" | "ivfpq"
    dim: int
    nlist: int = 0
    m: int = 0
    nbits: int = 8
    refine: str = "sq8"
    train_size: int = 0
    kmeans_iters: int = 10
    seed: int = 0

    def describe(self) -> dict:
        return asdict(self)


def default_nlist(n: int) -> int:
    """A power of two near 4·sqrt(n), with at least 39 training points per list (faiss's minimum)."""
    target = 4.0 * math.sqrt(max(n, 1))
    nlist = 2 ** int(round(math.log2(max(target, 1.0))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(nlist, 1)


def default_m(dim: int) -> int:
    """PQ sub-quantizers: D/4 (4 dimensions each), falling back to the largest divisor of D <= D/4."""
    for m in range(max(dim // 4, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def exact_macs(n: int, dim: int, num_queries: int) -> float:
    return float(num_queries) * n * dim


def ivf_build_macs(n: int, dim: int, nlist: int, kmeans_iters: int = 10) -> float:
    """Multiply-adds to train the coarse quantizer (40 points per list) and assign the pool to it."""
    train = min(n, max(40 * nlist, 10_000))
    return float(dim) * (train * nlist * kmeans_iters + n * nlist)


def choose_spec(n: int, dim: int, kind: str = "auto", nlist: int | None = None, m: int | None = None,
                refine: str = "sq8", train_size: int | None = None, seed: int = 0,
                num_queries: int | None = None) -> IndexSpec:
    if kind not in ("auto", "flat", "ivfpq"):
        raise InputError(f"--index must be auto, flat or ivfpq, got {kind!r}")
    if refine not in REFINE_KINDS:
        raise InputError(f"--ivf-refine must be one of {', '.join(REFINE_KINDS)}, got {refine!r}")
    if kind == "auto":
        lists = default_nlist(n) if nlist is None else int(nlist)
        cheap_exact = num_queries is not None and exact_macs(n, dim, num_queries) <= ivf_build_macs(n, dim, lists)
        kind = "flat" if n <= AUTO_FLAT_MAX or cheap_exact else "ivfpq"
    if kind == "flat":
        return IndexSpec("flat", dim, seed=seed)
    nlist = default_nlist(n) if nlist is None else int(nlist)
    m = default_m(dim) if m is None else int(m)
    if nlist < 1 or m < 1:
        raise InputError(f"--nlist and --pq-m must be >= 1 (got {nlist}, {m})")
    if dim % m:
        raise InputError(f"--pq-m {m} must divide the embedding dimension {dim}")
    if n < max(nlist, 256):
        raise InputError(f"an IVF-PQ index needs at least max(nlist, 256) = {max(nlist, 256)} vectors to train; "
                         f"the pool has {n} (use --index flat)")
    # 40 points per list for the coarse k-means, and >= 10k for the 256-centroid PQ codebooks
    train = min(n, max(40 * nlist, 10_000) if train_size is None else max(int(train_size), nlist, 256))
    return IndexSpec("ivfpq", dim, nlist=nlist, m=m, refine=refine, train_size=train, seed=seed)


class Index:
    """A faiss index plus the knobs `search` uses; faiss ids are row numbers 0..ntotal-1."""

    def __init__(self, spec: IndexSpec):
        self.spec = spec
        self.nprobe = 1
        self.k_factor = 1
        self.gpu = False
        self._keep: list = []  # python references to sub-indexes faiss does not own
        d = spec.dim
        if spec.kind == "flat":
            self.base = self.index = faiss.IndexFlatIP(d)
            return
        quantizer = faiss.IndexFlatIP(d)
        base = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits, faiss.METRIC_INNER_PRODUCT)
        base.cp.niter = spec.kmeans_iters
        base.cp.seed = spec.seed
        base.pq.cp.seed = spec.seed
        # `choose_spec` sizes the training sample (40 points per list, >= 10k for the codebooks) for
        # pools that have them; on smaller pools faiss would print one warning per sub-quantizer
        base.cp.min_points_per_centroid = 1
        base.pq.cp.min_points_per_centroid = 1
        self._keep.append(quantizer)
        self.base = base
        if spec.refine == "none":
            self.index = base
        elif spec.refine == "flat":
            self.index = faiss.IndexRefineFlat(base)
        else:
            qtype = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[spec.refine]
            refine = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
            self._keep.append(refine)
            self.index = faiss.IndexRefine(base, refine)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def train(self, vectors: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def set_search(self, nprobe: int, k_factor: int) -> None:
        self.nprobe, self.k_factor = int(nprobe), int(k_factor)
        if self.spec.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self.base) if not self.gpu else None
            if ivf is not None:
                ivf.nprobe = self.nprobe
            else:
                faiss.GpuParameterSpace().set_index_parameter(self.base, "nprobe", self.nprobe)
            if self.spec.refine != "none":
                self.index.k_factor = float(self.k_factor)

    def search(self, queries: np.ndarray, k: int, batch: int = 4096, progress=None, task=None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, rows [Q, k] int64; -1 where fewer than k were found)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, max(self.ntotal, 1))
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for s in range(0, len(queries), batch):
            scores[s:s + batch], rows[s:s + batch] = self.index.search(queries[s:s + batch], k)
            if progress is not None:
                progress.advance(task, min(batch, len(queries) - s))
        return scores, rows

    def code_bytes_per_vector(self) -> float:
        """Bytes per stored vector: PQ code + list id + refine copy (ivfpq), or the raw floats (flat)."""
        d = self.spec.dim
        if self.spec.kind == "flat":
            return 4.0 * d
        refine = {"none": 0, "sq8": d, "fp16": 2 * d, "flat": 4 * d}[self.spec.refine]
        return self.spec.m * self.spec.nbits / 8 + 8 + refine

    def serialized_bytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def to_gpu(self) -> bool:
        """Move search to all visible GPUs when faiss-gpu and CUDA are present; False otherwise."""
        if self.gpu or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() < 1:
            return False
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True            # flat: fp16 storage; ivfpq: fp16 lookup tables (large m)
        options.useFloat16LookupTables = True
        options.shard = True                 # split the vectors over the GPUs rather than replicating
        gpu_base = faiss.index_cpu_to_all_gpus(self.base, co=options)
        if self.spec.kind == "flat" or self.spec.refine == "none":
            self.base = self.index = gpu_base
        else:
            refine_index = self.index.refine_index
            self._keep.extend([self.index, refine_index])
            self.base = gpu_base
            self.index = faiss.IndexRefine(gpu_base, refine_index)
            self.index.own_fields = False
        self.gpu = True
        self.set_search(self.nprobe, self.k_factor)
        return True


def normalize(vectors: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


class ExactTopK:
    """Exact top-k inner-product neighbours of a set of queries, accumulated over a stream of
    vector blocks, each with the ids of its rows. Memory is the queries and Q x k results, never
    the pool: this is `slsd retrieve --index flat` (every rank streams its own cache chunks) and
    the ground truth of the IVF-PQ tuning. The scores are computed with faiss's BLAS kernel on the
    CPU, or with a float32 matmul on a CUDA device when one is given; `merge` combines the
    partial results of several ranks."""

    def __init__(self, queries: np.ndarray, k: int, device=None, query_block: int = 8192):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        self.device = None
        self.query_block = query_block
        if device is not None and str(device).startswith("cuda"):
            import torch

            self.device = torch.device(device)
            self._queries_dev = torch.from_numpy(self.queries).to(self.device)

    def add(self, vectors: np.ndarray, ids: np.ndarray | int) -> None:
        """A block of vectors [n, D] with their ids [n] (an int = the id of the first row, the
        others following)."""
        if len(vectors) == 0 or len(self.queries) == 0:
            return
        ids = np.arange(ids, ids + len(vectors), dtype=np.int64) if np.isscalar(ids) else np.asarray(ids, np.int64)
        kk = min(self.k, len(vectors))
        if self.device is None:
            scores, rows = faiss.knn(self.queries, np.ascontiguousarray(vectors, dtype=np.float32), kk,
                                     metric=faiss.METRIC_INNER_PRODUCT)
        else:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
            parts_s, parts_i = [], []
            for s in range(0, len(self.queries), self.query_block):
                top = torch.topk(self._queries_dev[s:s + self.query_block] @ x.T, kk, dim=1)
                parts_s.append(top.values.cpu())
                parts_i.append(top.indices.cpu())
            scores = torch.cat(parts_s).numpy()
            rows = torch.cat(parts_i).numpy().astype(np.int64)
        self.heap.add_result(scores, np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1))

    def add_results(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in another partial result (e.g. another rank's) for the same queries."""
        self.heap.add_result(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first; ids of -1 where the stream held fewer than k vectors."""
        self.heap.finalize()
        return self.heap.D, self.heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (truth rows of -1 ignored)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        total += len(t)
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=False))
    return hits / total if total else 1.0


@dataclass
class Tuning:
    nprobe: int
    k_factor: int
    recall: float
    target: float
    reached: bool
    tried: list[dict] = field(default_factory=list)


def search_cost(index: Index, nprobe: int, k_factor: int, k: int) -> float:
    """Relative per-query cost: PQ codes scanned (m byte look-ups each) + coarse assignment +
    vectors re-scored (D multiply-adds each)."""
    spec = index.spec
    per_list = index.ntotal / max(spec.nlist, 1)
    refine = 0.0 if spec.refine == "none" else k_factor * k * spec.dim
    return nprobe * per_list * spec.m + spec.nlist * spec.dim + refine


def tune_search(index: Index, queries: np.ndarray, truth: np.ndarray, k: int, target: float = 0.95) -> Tuning:
    """The cheapest (nprobe, k_factor) — by `search_cost` — whose recall@k on `queries` against the
    exact `truth` reaches `target`; the most accurate setting tried if none does."""
    if index.spec.kind == "flat":
        return Tuning(1, 1, 1.0, target, True)
    nlist = index.spec.nlist
    probes = [p for p in (2 ** i for i in range(0, 20)) if p <= nlist]
    if probes[-1] != nlist:
        probes.append(nlist)
    factors = (1,) if index.spec.refine == "none" else K_FACTORS
    tried = []
    best: tuple[float, int, int, float] | None = None
    fallback: tuple[float, int, int] = (-1.0, probes[-1], factors[-1])
    for kf in factors:
        for nprobe in probes:
            index.set_search(nprobe, kf)
            _, rows = index.search(queries, k)
            recall = recall_at_k(rows, truth)
            cost = search_cost(index, nprobe, kf, k)
            tried.append({"nprobe": nprobe, "k_factor": kf, "recall": round(recall, 4), "cost": cost})
            if recall > fallback[0]:
                fallback = (recall, nprobe, kf)
            if recall >= target:
                if best is None or cost < best[0]:
                    best = (cost, nprobe, kf, recall)
                break  # more probes only cost more for this k_factor
    if best is not None:
        _, nprobe, kf, recall = best
        index.set_search(nprobe, kf)
        return Tuning(nprobe, kf, recall, target, True, tried)
    recall, nprobe, kf = fallback
    index.set_search(nprobe, kf)
    return Tuning(nprobe, kf, recall, target, False, tried)


def build(spec: IndexSpec, blocks: Iterable[tuple[int, np.ndarray]], train_vectors: np.ndarray | None = None,
          exact: ExactTopK | None = None, on_block=None) -> Index:
    """Train (ivfpq) on `train_vectors`, then add the (first_row, vectors) blocks in row order,
    feeding each block to `exact` (tuning ground truth) on the way."""
    index = Index(spec)
    if index.needs_training:
        if train_vectors is None or len(train_vectors) < max(spec.nlist, 1):
            raise ValueError("IVF-PQ needs training vectors (at least nlist)")
        index.train(train_vectors)
    expected = 0
    for first_row, vectors in blocks:
        if first_row != expected:
            raise ValueError(f"blocks out of order: got row {first_row}, expected {expected}")
        index.add(vectors)
        if exact is not None:
            exact.add(vectors, first_row)  # ids = index rows
        expected += len(vectors)
        if on_block is not None:
            on_block(len(vectors))
    return index
