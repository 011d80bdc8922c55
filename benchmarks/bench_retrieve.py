"""IVF-PQ vs exact search for `slsd retrieve` at pool scale (CPU).

A synthetic clustered pool stands in for DINOv2 embeddings: `--clusters` Gaussian clusters whose
centres are random unit vectors; within a cluster the noise has a decaying spectrum
(std ∝ i^-0.7 along random orthogonal directions, overall scale `--spread`), as real descriptor sets
have a low intrinsic dimension; every vector is L2-normalised. Queries are fresh draws from the same
mixture (not pool members). The tuning queries (the sample `slsd retrieve` tunes nprobe/k_factor
on) are a separate draw, so the reported recall is measured on queries the tuning never saw.

Measured, in one run, on the same machine:
  exact  IndexFlatIP: add time, search time for all queries (the ground truth)
  ivfpq  slsd's default IVF-PQ (nlist ≈ 4·sqrt(N), m = D/4, 8 bits) + sq8 re-ranking: training,
         add, tuning (to --target-recall), search time, recall@k against exact; and the same
         index without re-ranking (its IVF-PQ stage alone) at the tuned nprobe
  memory per vector: stored bytes (codes + ids + re-ranking copy) and the serialised index size.

Run: python benchmarks/bench_retrieve.py [--n 1000000 --d 256 --nq 10000 --k 64] [--json out.json]
Takes ~5-10 minutes on 2 shared cores at the default size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np

from slsd_cli.retrieval import index as rindex


def clustered(n: int, d: int, clusters: int, spread: float, seed: int, centres_seed: int = 0) -> np.ndarray:
    rng_c = np.random.default_rng(centres_seed)
    centres = rng_c.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = (np.arange(1, d + 1) ** -0.7).astype(np.float32)
    spectrum /= np.linalg.norm(spectrum)
    rotation = np.linalg.qr(rng_c.standard_normal((d, d)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        noise = rng.standard_normal((e - s, d)).astype(np.float32) * spectrum * spread
        out[s:e] = centres[labels[s:e]] + noise @ rotation
    faiss.normalize_L2(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.8)
    ap.add_argument("--refine", default="sq8", choices=rindex.REFINE_KINDS)
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--m", type=int, default=None)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--tune-queries", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"# bench_retrieve: N={args.n:,} d={args.d} queries={args.nq:,} k={args.k} clusters={args.clusters} "
        f"| faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cpus, "
        f"load avg {os.getloadavg()[0]:.1f}, {platform.processor() or platform.machine()}")
    t = time.perf_counter()
    xb = clustered(args.n, args.d, args.clusters, args.spread, seed=1)
    xq = clustered(args.nq, args.d, args.clusters, args.spread, seed=2)
    xt = clustered(args.tune_queries, args.d, args.clusters, args.spread, seed=3)
    log(f"data: {time.perf_counter() - t:.1f} s")

    # ---- exact
    t = time.perf_counter()
    flat = rindex.Index(rindex.IndexSpec("flat", args.d))
    flat.add(xb)
    flat_add = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = flat.search(xq, args.k)
    flat_search = time.perf_counter() - t
    log(f"exact flat: add {flat_add:.1f} s, search {flat_search:.1f} s "
        f"({flat_search / args.nq * 1e3:.2f} ms/query)")

    # ---- IVF-PQ, built as slsd retrieve builds it
    spec = rindex.choose_spec(args.n, args.d, "ivfpq", nlist=args.nlist, m=args.m, refine=args.refine)
    rng = np.random.default_rng(0)
    train = xb[np.sort(rng.choice(args.n, size=spec.train_size, replace=False))]
    exact = rindex.ExactTopK(xt, args.k)
    t = time.perf_counter()
    ivf = rindex.Index(spec)
    ivf.train(train)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    block = 100_000
    for s in range(0, args.n, block):
        ivf.add(xb[s:s + block])
        exact.add(xb[s:s + block], s)  # tuning ground truth, streamed as the pipeline does
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    _, tune_truth = exact.result()
    tuning = rindex.tune_search(ivf, xt, tune_truth, args.k, args.target_recall)
    tune_s = time.perf_counter() - t
    log(f"ivfpq nlist={spec.nlist} m={spec.m} refine={spec.refine}: train {train_s:.1f} s on {spec.train_size:,} "
        f"vectors, add {add_s:.1f} s (incl. streaming exact top-k of {len(xt)} tuning queries), "
        f"tune {tune_s:.1f} s -> nprobe {tuning.nprobe}, k_factor {tuning.k_factor} "
        f"(tuning recall {tuning.recall:.4f})")
    t = time.perf_counter()
    _, rows = ivf.search(xq, args.k)
    ivf_search = time.perf_counter() - t
    recall = rindex.recall_at_k(rows, truth)
    # the IVF-PQ stage alone (no re-ranking), same nprobe
    t = time.perf_counter()
    _, rows_pq = ivf.base.search(np.ascontiguousarray(xq), args.k)
    pq_search = time.perf_counter() - t
    recall_pq = rindex.recall_at_k(rows_pq, truth)

    serialized = ivf.serialized_bytes()
    results = {
        "n": args.n, "d": args.d, "queries": args.nq, "k": args.k, "clusters": args.clusters,
        "threads": faiss.omp_get_max_threads(), "load_avg_end": os.getloadavg()[0],
        "flat": {"add_s": flat_add, "search_s": flat_search, "bytes_per_vector": 4 * args.d},
        "ivfpq": {**spec.describe(), "nprobe": tuning.nprobe, "k_factor": tuning.k_factor,
                  "train_s": train_s, "add_s": add_s, "tune_s": tune_s, "search_s": ivf_search,
                  "recall_at_k": recall, "tuning_recall": tuning.recall,
                  "bytes_per_vector": ivf.code_bytes_per_vector(), "serialized_bytes_per_vector": serialized / args.n,
                  "speedup_vs_flat": flat_search / ivf_search},
        "ivfpq_no_refine_same_nprobe": {"search_s": pq_search, "recall_at_k": recall_pq,
                                        "bytes_per_vector": spec.m + 8, "speedup_vs_flat": flat_search / pq_search},
    }
    log("")
    log(f"{'method':<34}{'recall@' + str(args.k):>10}{'search s':>10}{'ms/query':>10}{'speed-up':>10}{'B/vector':>10}")
    log(f"{'exact IndexFlatIP':<34}{1.0:>10.4f}{flat_search:>10.2f}{flat_search / args.nq * 1e3:>10.3f}{1.0:>10.1f}"
        f"{4 * args.d:>10}")
    log(f"{f'IVF{spec.nlist},PQ{spec.m} + {spec.refine} refine':<34}{recall:>10.4f}{ivf_search:>10.2f}"
        f"{ivf_search / args.nq * 1e3:>10.3f}{flat_search / ivf_search:>10.1f}{ivf.code_bytes_per_vector():>10.0f}")
    log(f"{f'IVF{spec.nlist},PQ{spec.m} alone (nprobe {tuning.nprobe})':<34}{recall_pq:>10.4f}{pq_search:>10.2f}"
        f"{pq_search / args.nq * 1e3:>10.3f}{flat_search / pq_search:>10.1f}{spec.m + 8:>10}")
    log(f"IVF-PQ build: train {train_s:.1f} s + add {add_s:.1f} s; serialised index {serialized / 2**20:.0f} MiB "
        f"({serialized / args.n:.0f} B/vector incl. centroids and codebooks); "
        f"flat {4 * args.d * args.n / 2**20:.0f} MiB")
    goal = recall >= 0.95 and flat_search / ivf_search >= 10
    log(f"goal recall >= 0.95 at >= 10x: {'MET' if goal else 'NOT MET'} "
        f"(recall {recall:.4f}, {flat_search / ivf_search:.1f}x); load avg at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
