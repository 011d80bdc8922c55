"""`slsd retrieve` end to end: embed, index, search, select, write (paper §4.1); `_retrieve` runs
the five stages below, one function each (`_embed`, `_exclude`, `_search`, `_select`, `_write_outputs`).

1. Query embeddings: every (non-crowd) instance of the chosen frequency groups in the labeled
   annotations, as a context crop (`images.crop_window`). Pool embeddings: one per image. Both
   chunked, sharded over torchrun ranks and cached/resumable (`cache.embed_items`). Every input
   that can be checked without decoding images (options, annotations, pool listing, labeled image
   files, embedder weights) is checked before the cache is touched; a run refused later (an image
   that does not decode) takes back what it added to the cache except finished chunks
   (`cache.refused_run_cleanup`).
2. Before indexing (rank 0): unreadable pool images are an error naming the file, or with
   `skip_bad_images` counted and left out; pool images whose file content (blake2b-128) equals a
   labeled image's, or whose file name equals a labeled image's file name, are excluded; of exact
   duplicates within the pool (same content hash) only the first is indexed. So every query gets
   k neighbours that are new, distinct files.
3. Search (`index.py`), each query's k nearest neighbours among the remaining images: exact and
   streamed (every rank scans its own cache chunks, rank 0 merges the partial top-k), or IVF-PQ
   with re-ranking, built, tuned and searched on rank 0.
4. Selection: the union of all neighbour lists; near duplicates among them (cosine >= threshold)
   are collapsed greedily in pool order (an image is kept unless an earlier kept image is that
   similar to it).
5. Outputs (rank 0, atomic): `unlabeled.json` (LVIS format: images with id, file_name, width,
   height; the labeled set's categories; no annotations), `retrieval.jsonl` (one line per query:
   its neighbours, their scores, and which kept image a collapsed one duplicates) and
   `retrieval_summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsd_cli import distributed
from slsd_cli.data.lvis import FREQUENCY_GROUPS, GROUP_NAMES, image_file_name, load_annotations
from slsd_cli.errors import InputError
from slsd_cli.io import FileSet, atomic_path, atomic_write_json, check_output
from slsd_cli.retrieval import index as faiss_index
from slsd_cli.retrieval.cache import embed_items, first_error, refused_run_cleanup, sync_errors
from slsd_cli.retrieval.embedders import DEFAULT_EMBEDDER, build_embedder
from slsd_cli.retrieval.images import Item, PoolListing, file_content_hash, list_pool

SUMMARY_NAME = "retrieval_summary.json"
JSONL_NAME = "retrieval.jsonl"
KEEP_NAME = "keep.npy"  # stage 2's decision, for the other ranks (under torchrun)
MAX_LISTED_BAD = 100
SKIP_HINT = " (pass --skip-bad-images to skip unreadable pool images)"


@dataclass
class RetrieveConfig:
    annotations: Path
    images: Path
    pool: Path
    out: Path
    pool_images: Path | None = None
    queries: str = "rare"
    k: int = 64
    embedder: str = DEFAULT_EMBEDDER
    weights: Path | None = None
    random_init: bool = False
    image_size: int | None = None
    crop_margin: float = 0.25
    index: str = "auto"
    nlist: int | None = None
    pq_m: int | None = None
    ivf_refine: str = "sq8"
    target_recall: float = 0.95
    tune_queries: int = 256
    dedup_threshold: float = 0.97
    cache_dir: Path | None = None
    chunk_size: int = 4096
    skip_bad_images: bool = False
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    force: bool = False


def parse_groups(spec: str) -> list[str]:
    """'rare', 'rare,common', 'all', 'r,c' -> ['r', 'c', ...] in r, c, f order."""
    if spec.strip() == "all":
        return list(FREQUENCY_GROUPS)
    letters = {name: g for g, name in GROUP_NAMES.items()} | {g: g for g in FREQUENCY_GROUPS}
    groups = set()
    for part in spec.split(","):
        part = part.strip().lower()
        if part not in letters:
            raise InputError(f"--queries must be {', '.join(GROUP_NAMES.values())}, all or a comma list of them; "
                             f"got {spec!r}")
        groups.add(letters[part])
    return [g for g in FREQUENCY_GROUPS if g in groups]


def output_paths(out: Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    return out, out.with_name(JSONL_NAME), out.with_name(SUMMARY_NAME)


def validate_config(cfg: RetrieveConfig) -> list[str]:
    if cfg.k < 1:
        raise InputError(f"--k must be >= 1, got {cfg.k}")
    if not 0.0 < cfg.dedup_threshold <= 1.0:
        raise InputError(f"--dedup-threshold must be in (0, 1], got {cfg.dedup_threshold}")
    if not 0.0 < cfg.target_recall <= 1.0:
        raise InputError(f"--target-recall must be in (0, 1], got {cfg.target_recall}")
    if cfg.batch_size < 1 or cfg.chunk_size < 1 or cfg.workers < 0 or cfg.tune_queries < 1:
        raise InputError("--batch-size, --chunk-size and --tune-queries must be >= 1, --workers >= 0")
    if cfg.crop_margin < 0:
        raise InputError(f"--crop-margin must be >= 0, got {cfg.crop_margin}")
    if Path(cfg.out).suffix != ".json":
        raise InputError("the output must be a .json file (unlabeled.json)", path=cfg.out)
    faiss_index.choose_spec(10**6, 64, cfg.index, refine=cfg.ivf_refine)  # validates the names only
    return parse_groups(cfg.queries)


def select_queries(annotations, groups: list[str]) -> list[dict]:
    frequency = {c["id"]: c["frequency"] for c in annotations.categories}
    queries = [a for a in annotations.annotations
               if frequency[a["category_id"]] in groups and not a.get("iscrowd", 0)]
    if not queries:
        names = "/".join(GROUP_NAMES[g] for g in groups)
        raise InputError(f"empty query set: no (non-crowd) instances of {names} classes", path=annotations.path)
    return queries


def _hash_keys(hashes: np.ndarray) -> np.ndarray:
    """First 8 bytes of each 16-byte content hash as one uint64 (matches are verified on all 16)."""
    return np.ascontiguousarray(hashes[:, :8]).view(np.uint64).ravel()


def exclusion_plan(pool: PoolListing, ok: np.ndarray, hashes: np.ndarray, labeled_hashes: np.ndarray,
                   labeled_names: set[str]) -> dict[str, np.ndarray]:
    """Per pool image: bad, labeled (by content / by name), exact duplicate of an earlier pool image
    (`duplicate_of`, -1 if none), and `keep` = what gets indexed."""
    n = len(pool)
    keys = _hash_keys(hashes)
    labeled_keys = _hash_keys(labeled_hashes) if len(labeled_hashes) else np.zeros(0, np.uint64)
    by_hash = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(ok & np.isin(keys, labeled_keys))
    if len(candidates):
        full = {bytes(h) for h in labeled_hashes}
        for i in candidates:
            by_hash[i] = bytes(hashes[i]) in full
    names = np.fromiter((os.path.basename(pool.file_name(i)) in labeled_names for i in range(n)), dtype=bool, count=n)
    by_name = ok & ~by_hash & names
    duplicate_of = np.full(n, -1, dtype=np.int64)
    live = np.flatnonzero(ok & ~by_hash & ~by_name)
    if len(live):
        _, first, inverse = np.unique(keys[live], return_index=True, return_inverse=True)
        representative = live[first][inverse.ravel()]
        if not np.all(hashes[live] == hashes[representative]):
            # two different files share a 64-bit prefix (~1e-4 odds at 1e8 images): use full hashes
            first_of: dict[bytes, int] = {}
            representative = np.array([first_of.setdefault(bytes(hashes[i]), int(i)) for i in live], dtype=np.int64)
        dup = representative != live
        duplicate_of[live[dup]] = representative[dup]
    keep = ok & ~by_hash & ~by_name & (duplicate_of < 0)
    return {"bad": ~ok, "labeled_by_hash": by_hash, "labeled_by_name": by_name, "duplicate_of": duplicate_of,
            "keep": keep}


def collapse_near_duplicates(vectors: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """Greedy in row order: row i is kept unless an earlier kept row has cosine >= threshold with it.
    -> duplicate_of [n] (-1 for kept rows, else the kept row it duplicates)."""
    import faiss

    n = len(vectors)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return duplicate_of
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    removed = np.zeros(n, dtype=bool)
    for s in range(0, n, block):
        lims, _, found = flat.range_search(vectors[s:s + block], float(threshold))
        for r in range(min(block, n - s)):
            i = s + r
            if removed[i]:
                continue
            neighbours = found[lims[r]:lims[r + 1]]
            later = neighbours[(neighbours > i)]
            later = later[~removed[later]]
            removed[later] = True
            duplicate_of[later] = i
    return duplicate_of


def labeled_image_paths(annotations, images_dir: Path) -> tuple[list[dict], list[Path]]:
    """Every labeled image's record and file (a missing file is an InputError): checked before the
    cache is touched; whether a file decodes is only found while embedding (decoding is its first step)."""
    records = [annotations.images[i] for i in annotations.image_ids]
    paths = [Path(images_dir) / image_file_name(r) for r in records]
    for rec, path in zip(records, paths):
        if not path.is_file():
            raise InputError("labeled image file not found", path=path, record=f"image id {rec['id']}")
    return records, paths


def hash_labeled_images(annotations, images_dir: Path, workers: int = 8, progress=None) -> tuple[np.ndarray, set[str]]:
    """Content hashes and file names of every labeled image (a missing file is an InputError)."""
    records, paths = labeled_image_paths(annotations, images_dir)
    task = progress.add_task("hash labeled", total=len(paths), status="") if progress is not None else None
    out = np.zeros((len(paths), 16), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, digest in enumerate(pool.map(file_content_hash, paths, chunksize=64)):
            out[i] = np.frombuffer(digest, dtype=np.uint8)
            if progress is not None:
                progress.advance(task)
    return out, {Path(image_file_name(r)).name for r in records}


def run_retrieve(cfg: RetrieveConfig, progress=None) -> dict[str, Any] | None:
    """Run the whole step: check the options and outputs, then do the work inside one
    `distributed.session(cfg.device)` (joined and left here; a caller does not open one). Returns
    the summary on rank 0 (None on other ranks)."""
    started = time.perf_counter()
    groups = validate_config(cfg)
    for path in output_paths(cfg.out):
        check_output(path, cfg.force)
    with distributed.session(cfg.device) as info:
        return _retrieve(cfg, groups, info, started, progress)


@dataclass
class _Inputs:
    """What the run works on, loaded and checked on every rank (stage 1's inputs)."""

    annotations: Any                    # data.lvis.Annotations
    queries: list[dict]                 # the query annotations
    query_items: list[Item]             # their context crops
    frequency: dict[int, str]           # category id -> r / c / f
    images_dir: Path
    pool: PoolListing
    embedder: Any                       # embedders.Embedder
    cache_dir: Path


@dataclass
class _Found:
    """The search's result on rank 0: each query's k neighbours (pool rows, -1 = none) and scores,
    and how they were found (an IVF `index` with its `tuning`, or the streamed exact scan)."""

    scores: np.ndarray
    neighbours: np.ndarray
    rows_to_pool: np.ndarray            # index row -> pool row (the kept pool images)
    spec: Any                           # index.IndexSpec
    on_gpu: bool
    index: Any = None
    tuning: Any = None
    tune_ids: np.ndarray | None = None


@dataclass
class _Selection:
    """Stage 4: the union of the neighbour lists, the near duplicates among them, what is kept."""

    selected: np.ndarray                # pool rows found for any query
    near_dup_of: dict[int, int]         # collapsed pool row -> the kept row it duplicates
    final: np.ndarray                   # pool rows written to unlabeled.json


def _retrieve(cfg: RetrieveConfig, groups: list[str], info: distributed.DistInfo, started: float,
              progress=None) -> dict[str, Any] | None:
    """`run_retrieve`'s work once the inputs are checked, on every rank of the session `info`: the
    stages of the module docstring, one function each. Returns the summary on rank 0."""
    timings: dict[str, float] = {}
    inputs = _load_inputs(cfg, groups, info)
    # a refused run (bad input found while embedding or excluding) takes back what it added to the cache
    with refused_run_cleanup(inputs.cache_dir):
        pool_store, query_store = _embed(cfg, inputs, progress, timings)
        work = pool_store.directory / "search" / query_store.directory.name
        t = time.perf_counter()
        plan, sizes, errors = _exclude(cfg, inputs, pool_store, work, info, progress)
    keep = plan["keep"] if info.is_main else np.load(work / KEEP_NAME)
    distributed.barrier()  # every rank holds `keep` before rank 0 removes keep.npy (stage 3)
    timings["exclusion_s"] = time.perf_counter() - t
    found = _search(cfg, inputs, pool_store, query_store, keep, work, info, progress, timings)
    if found is None:
        return None  # not rank 0: its part of the search is done
    selection = _select(pool_store, found.neighbours, cfg.dedup_threshold, timings)
    return _write_outputs(cfg, groups, inputs, found, selection, plan, sizes, errors,
                          (pool_store, query_store), info, timings, started)


def _load_inputs(cfg: RetrieveConfig, groups: list[str], info: distributed.DistInfo) -> _Inputs:
    """The annotations and their query crops, the labeled image files (present), the pool listing and
    the embedder: everything checked before the cache is touched."""
    annotations = load_annotations(cfg.annotations)
    queries = select_queries(annotations, groups)
    images_dir = Path(cfg.images)
    if not images_dir.is_dir():
        raise InputError("images folder not found", path=images_dir)
    labeled_image_paths(annotations, images_dir)
    first_folder_id = max(annotations.images, default=0) + 1
    pool_is_dir = Path(cfg.pool).is_dir()
    pool = list_pool(cfg.pool, cfg.pool_images if cfg.pool_images is not None or pool_is_dir else images_dir,
                     first_folder_id=first_folder_id)
    embedder = build_embedder(cfg.embedder, weights=cfg.weights, random_init=cfg.random_init,
                              image_size=cfg.image_size, device=info.device, seed=cfg.seed)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else Path(cfg.out).parent / "retrieval_cache"
    query_items = [Item(str(annotations.image_file(a["image_id"], images_dir)), tuple(float(v) for v in a["bbox"]),
                        (annotations.images[a["image_id"]]["width"], annotations.images[a["image_id"]]["height"]),
                        record=f"annotation id {a['id']}") for a in queries]
    frequency = {c["id"]: c["frequency"] for c in annotations.categories}
    return _Inputs(annotations, queries, query_items, frequency, images_dir, pool, embedder, cache_dir)


def _embed(cfg: RetrieveConfig, inputs: _Inputs, progress, timings: dict[str, float]):
    """Stage 1: the pool's and the queries' embeddings, cached and sharded over the ranks (every rank
    raises when one found bad input). -> (pool store, query store)."""
    common = dict(batch_size=cfg.batch_size, workers=cfg.workers, chunk_size=cfg.chunk_size, progress=progress)
    t = time.perf_counter()
    error = None
    try:  # a PoolListing yields each image's Item lazily
        pool_store = embed_items(inputs.pool, inputs.embedder, inputs.cache_dir, "pool", hash_files=True,
                                 fail_fast=not cfg.skip_bad_images, error_hint=SKIP_HINT, **common)
    except InputError as exc:
        error = exc
    sync_errors(error)
    timings["embed_pool_s"] = time.perf_counter() - t
    t = time.perf_counter()
    error = None
    try:
        query_store = embed_items(inputs.query_items, inputs.embedder, inputs.cache_dir, "queries",
                                  margin=cfg.crop_margin, fail_fast=True, **common)
    except InputError as exc:
        error = exc
    sync_errors(error)
    timings["embed_queries_s"] = time.perf_counter() - t
    return pool_store, query_store


def _exclude(cfg: RetrieveConfig, inputs: _Inputs, pool_store, work: Path, info: distributed.DistInfo,
             progress) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None, dict[int, str]]:
    """Stage 2, what gets searched: rank 0 decides (`exclusion_plan`) and, under torchrun, leaves
    the decision in `work/keep.npy` for the other ranks. -> (plan, claimed sizes, decode errors) on
    rank 0, (None, None, {}) elsewhere."""
    (work / f"topk.rank{info.rank}.npz").unlink(missing_ok=True)
    error, plan, errors, sizes = None, None, {}, None
    if info.is_main:
        try:
            ok, hashes, sizes, errors = pool_store.metadata()
            if errors and not cfg.skip_bad_images:
                raise first_error(pool_store, inputs.pool)  # left in the cache by a --skip-bad-images run
            labeled_hashes, labeled_names = hash_labeled_images(inputs.annotations, inputs.images_dir,
                                                                progress=progress)
            plan = exclusion_plan(inputs.pool, ok, hashes, labeled_hashes, labeled_names)
            if not plan["keep"].any():
                raise InputError("no pool image is left to search (all unreadable, labeled or duplicates)",
                                 path=cfg.pool)
            if info.world_size > 1:
                with atomic_path(work / KEEP_NAME) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, plan["keep"])
        except InputError as exc:
            error = exc
    sync_errors(error)
    return plan, sizes, errors


def _search(cfg: RetrieveConfig, inputs: _Inputs, pool_store, query_store, keep: np.ndarray, work: Path,
            info: distributed.DistInfo, progress, timings: dict[str, float]) -> _Found | None:
    """Stage 3: each query's k nearest kept pool images, exact and streamed over the ranks or with
    an IVF-PQ index on rank 0 (`index.choose_spec`). None on the ranks other than 0."""
    rows_to_pool = np.flatnonzero(keep)
    # queries are embedded fail-fast, so every cached query chunk is complete and readable
    query_vectors = faiss_index.normalize(query_store.gather(np.arange(len(inputs.query_items))))
    spec = faiss_index.choose_spec(len(rows_to_pool), inputs.embedder.dim, cfg.index, nlist=cfg.nlist, m=cfg.pq_m,
                                   refine=cfg.ivf_refine, seed=cfg.seed, num_queries=len(query_vectors))
    if spec.kind == "flat":
        return _search_exact(cfg, pool_store, keep, query_vectors, rows_to_pool, spec, work, info, progress,
                             timings)
    if not info.is_main:
        return None
    (work / KEEP_NAME).unlink(missing_ok=True)
    return _search_index(cfg, pool_store, keep, query_vectors, rows_to_pool, spec, info, progress, timings)


def _search_exact(cfg: RetrieveConfig, pool_store, keep: np.ndarray, query_vectors: np.ndarray,
                  rows_to_pool: np.ndarray, spec, work: Path, info: distributed.DistInfo, progress,
                  timings: dict[str, float]) -> _Found | None:
    """Exact, streamed: every rank scans its own cache chunks and leaves its partial top-k in
    `work`; rank 0 merges them."""
    t = time.perf_counter()
    error = None
    try:
        exact = faiss_index.ExactTopK(query_vectors, cfg.k, device=info.device)
        on_gpu = exact.device is not None
        mine = distributed.shard_indices(pool_store.num_chunks)
        task = progress.add_task("search (exact)", total=len(mine), status="") if progress is not None else None
        for c in mine:
            chunk = pool_store.read(c)
            local = np.flatnonzero(keep[chunk.start:chunk.end])
            if len(local):
                exact.add(faiss_index.normalize(chunk.embeddings[local]), chunk.start + local)
            if progress is not None:
                progress.advance(task)
        if not info.is_main:
            part_scores, part_ids = exact.result()
            with atomic_path(work / f"topk.rank{info.rank}.npz") as tmp, open(tmp, "wb") as handle:
                np.savez(handle, scores=part_scores, ids=part_ids)
    except InputError as exc:
        error = exc
    sync_errors(error)
    if not info.is_main:
        return None
    for r in range(1, info.world_size):
        with np.load(work / f"topk.rank{r}.npz") as part:
            exact.add_results(part["scores"], part["ids"])
        (work / f"topk.rank{r}.npz").unlink()
    (work / KEEP_NAME).unlink(missing_ok=True)
    scores, neighbours = exact.result()
    timings["search_s"] = time.perf_counter() - t
    return _Found(scores, neighbours, rows_to_pool, spec, on_gpu)


def _search_index(cfg: RetrieveConfig, pool_store, keep: np.ndarray, query_vectors: np.ndarray,
                  rows_to_pool: np.ndarray, spec, info: distributed.DistInfo, progress,
                  timings: dict[str, float]) -> _Found:
    """IVF-PQ on rank 0: trained on a seeded sample of the kept images, filled chunk by chunk, its
    search breadth tuned to `target_recall` against the exact neighbours of `tune_queries` queries."""
    t = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(rows_to_pool), size=spec.train_size, replace=False))
    train = faiss_index.normalize(pool_store.gather(rows_to_pool[sample]))
    tune_ids = np.sort(rng.choice(len(query_vectors), size=min(cfg.tune_queries, len(query_vectors)),
                                  replace=False))
    exact = faiss_index.ExactTopK(query_vectors[tune_ids], cfg.k, device=info.device)
    add_task = None if progress is None else progress.add_task("index", total=len(rows_to_pool), status=spec.kind)

    def blocks():
        row = 0
        for chunk in pool_store.chunks():
            local = np.flatnonzero(keep[chunk.start:chunk.end])
            if len(local):
                yield row, faiss_index.normalize(chunk.embeddings[local])
                row += len(local)

    index = faiss_index.build(spec, blocks(), train_vectors=train, exact=exact,
                              on_block=(lambda n: progress.advance(add_task, n)) if progress is not None else None)
    timings["build_index_s"] = time.perf_counter() - t
    on_gpu = index.to_gpu()
    t = time.perf_counter()
    _, truth = exact.result()
    tuning = faiss_index.tune_search(index, query_vectors[tune_ids], truth, cfg.k, cfg.target_recall)
    timings["tune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    search_task = progress.add_task("search", total=len(query_vectors), status="") if progress is not None else None
    scores, rows = index.search(query_vectors, cfg.k, progress=progress, task=search_task)
    timings["search_s"] = time.perf_counter() - t
    neighbours = np.where(rows >= 0, rows_to_pool[np.clip(rows, 0, None)], -1)
    return _Found(scores, neighbours, rows_to_pool, spec, on_gpu, index, tuning, tune_ids)


def _select(pool_store, neighbours: np.ndarray, threshold: float, timings: dict[str, float]) -> _Selection:
    """Stage 4: the union of the neighbour lists, near duplicates collapsed in pool order."""
    t = time.perf_counter()
    selected = np.unique(neighbours[neighbours >= 0])
    near = collapse_near_duplicates(faiss_index.normalize(pool_store.gather(selected)), threshold)
    near_dup_of = {int(selected[i]): int(selected[j]) for i, j in enumerate(near) if j >= 0}
    timings["dedup_s"] = time.perf_counter() - t
    return _Selection(selected, near_dup_of, selected[near < 0])


def _unlabeled_json(cfg: RetrieveConfig, groups: list[str], inputs: _Inputs, final: np.ndarray,
                    sizes: np.ndarray) -> dict[str, Any]:
    """unlabeled.json: the kept images (LVIS format, the labeled set's categories, no annotations)."""
    pool = inputs.pool
    images_out = []
    for p in final:
        width, height = pool.size(int(p)) or (int(sizes[p, 0]), int(sizes[p, 1]))
        images_out.append({"id": pool.image_id(int(p)), "file_name": pool.file_name(int(p)), "width": width,
                           "height": height})
    info_doc = {"description": "slsd retrieve: unlabeled images retrieved for "
                               + "/".join(GROUP_NAMES[g] for g in groups) + " queries",
                "images_dir": str(pool.root), "annotations": str(cfg.annotations), "pool": str(cfg.pool),
                "embedder": inputs.embedder.name, "k": cfg.k, "queries": [GROUP_NAMES[g] for g in groups]}
    return {"info": info_doc, "images": images_out, "annotations": [],
            "categories": inputs.annotations.data["categories"]}


def _write_jsonl(path: Path, groups: list[str], inputs: _Inputs, found: _Found, near_dup_of: dict[int, int]
                 ) -> tuple[dict[str, int], dict[str, set[int]]]:
    """retrieval.jsonl, one line per query (its neighbours, scores and which kept image a collapsed
    one duplicates). -> (queries per group, kept images found per group)."""
    pool = inputs.pool
    per_group_images: dict[str, set[int]] = {g: set() for g in groups}
    per_group_queries = {g: 0 for g in groups}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for qi, ann in enumerate(inputs.queries):
            group = inputs.frequency[ann["category_id"]]
            per_group_queries[group] += 1
            items = []
            for score, p in zip(found.scores[qi], found.neighbours[qi]):
                if p < 0:
                    continue
                p = int(p)
                entry = {"image_id": pool.image_id(p), "file_name": pool.file_name(p),
                         "score": round(float(score), 6)}
                if p in near_dup_of:
                    entry["duplicate_of"] = pool.image_id(near_dup_of[p])
                items.append(entry)
                per_group_images[group].add(near_dup_of.get(p, p))
            handle.write(json.dumps({"annotation_id": ann["id"], "image_id": ann["image_id"],
                                     "category_id": ann["category_id"], "frequency": group,
                                     "neighbours": items}) + "\n")
    return per_group_queries, per_group_images


def _write_outputs(cfg: RetrieveConfig, groups: list[str], inputs: _Inputs, found: _Found, selection: _Selection,
                   plan: dict[str, np.ndarray], sizes: np.ndarray, errors: dict[int, str], stores: tuple,
                   info: distributed.DistInfo, timings: dict[str, float], started: float) -> dict[str, Any]:
    """Stage 5 (rank 0): the three outputs, which appear together or not at all (io.FileSet).
    -> the summary (retrieval_summary.json)."""
    out_path, jsonl_path, summary_path = output_paths(cfg.out)
    with FileSet([out_path, jsonl_path, summary_path], cfg.force) as files:
        per_group_queries, per_group_images = _write_jsonl(files.stage(jsonl_path), groups, inputs, found,
                                                           selection.near_dup_of)
        atomic_write_json(files.stage(out_path), _unlabeled_json(cfg, groups, inputs, selection.final, sizes))
        summary = {
            "queries": {GROUP_NAMES[g]: per_group_queries[g] for g in groups},
            "query_classes": {GROUP_NAMES[g]: len({a["category_id"] for a in inputs.queries
                                                    if inputs.frequency[a["category_id"]] == g})
                              for g in groups},
            "images_per_group": {GROUP_NAMES[g]: len(per_group_images[g]) for g in groups},
            "k": cfg.k,
            "pool_images": len(inputs.pool),
            **_exclusion_summary(inputs.pool, plan, errors),
            "indexed": int(len(found.rows_to_pool)),
            "selected": int(len(selection.selected)),
            "near_duplicates_removed": int(len(selection.near_dup_of)),
            "dedup_threshold": cfg.dedup_threshold,
            "retrieved_images": int(len(selection.final)),
            "embedder": inputs.embedder.describe(),
            "index": _index_summary(found),
            "world_size": info.world_size,
            "cache": {"pool": str(stores[0].directory), "queries": str(stores[1].directory)},
            "outputs": {"unlabeled": str(out_path), "retrieval": str(jsonl_path), "summary": str(summary_path)},
            "timings_s": {k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - started}.items()},
        }
        atomic_write_json(files.stage(summary_path), summary, indent=1)
    return summary


def _exclusion_summary(pool: PoolListing, plan: dict[str, np.ndarray], errors: dict[int, str]) -> dict[str, Any]:
    """What stage 2 left out: unreadable (the first `MAX_LISTED_BAD` named), labeled, exact duplicates."""
    bad_idx = np.flatnonzero(plan["bad"])
    return {
        "bad_images_skipped": int(len(bad_idx)),
        "bad_images": [{"file_name": pool.file_name(int(i)), "error": errors.get(int(i), "")}
                       for i in bad_idx[:MAX_LISTED_BAD]],
        "labeled_excluded": int(plan["labeled_by_hash"].sum() + plan["labeled_by_name"].sum()),
        "labeled_excluded_by_content": int(plan["labeled_by_hash"].sum()),
        "labeled_excluded_by_name": int(plan["labeled_by_name"].sum()),
        "exact_duplicates_removed": int((plan["duplicate_of"] >= 0).sum()),
    }


def _index_summary(found: _Found) -> dict[str, Any]:
    """How the neighbours were found: the index spec, GPU or not, its code size and tuning."""
    index, tuning = found.index, found.tuning
    return {**found.spec.describe(), "gpu": found.on_gpu,
            "bytes_per_vector": index.code_bytes_per_vector() if index is not None else 0,
            "streamed_exact": index is None,
            "nprobe": index.nprobe if index is not None else None,
            "k_factor": index.k_factor if index is not None else None,
            "tuning": None if tuning is None else {"recall": tuning.recall, "target": tuning.target,
                                                    "reached": tuning.reached,
                                                    "queries": int(len(found.tune_ids))}}


__all__ = ["RetrieveConfig", "run_retrieve", "parse_groups", "exclusion_plan", "collapse_near_duplicates"]
