"""`slsd retrieve` on the synthetic benchmark: rare-class enrichment, de-duplication, labeled-image
exclusion, resumable embedding cache, bad input.

The embedder is `colorhist` (the built-in chroma-weighted HSV histogram): weight-free and
deterministic, and discriminative on the synthetic classes (colour is one of a class's three
attributes), unlike a random-init network.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsd_cli.cli import main
from slsd_cli.data.lvis import load_annotations
from slsd_cli.data.synthetic import generate
from slsd_cli.retrieval import cache as rcache
from tests.helpers.cli import run_cli

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, classes=40, image_size=IMAGE_SIZE, seed=0)  # 500 train / 100 val / 300 pool images
    return out


def _base(synth: Path, out: Path, *extra: str) -> list[str]:
    return ["retrieve", "--annotations", str(synth / "train.json"), "--images", str(synth / "images"),
            "--embedder", "colorhist", "--workers", "0", "--out", str(out), *extra]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rare_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("rare") / "unlabeled.json"
    code = main(_base(synth, out, "--pool", str(synth / "pool.json"), "--k", "8", "--chunk-size", "64"))
    assert code == 0
    return out


def test_rare_queries_retrieve_rare_classes(synth, rare_run):
    """Per query instance, the share of its neighbours that contain the query's (rare) class is >= 3x
    that class's share in the pool (the expected share of a random sample of the same size)."""
    gt = json.loads((synth / "pool_gt.json").read_text())
    classes_of = defaultdict(set)
    for a in gt["annotations"]:
        classes_of[a["image_id"]].add(a["category_id"])
    pool_ids = [img["id"] for img in gt["images"]]
    lines = _read_jsonl(rare_run.with_name("retrieval.jsonl"))
    train = load_annotations(synth / "train.json")
    rare = {c["id"] for c in train.categories if c["frequency"] == "r"}
    rare_instances = [a for a in train.annotations if a["category_id"] in rare]
    assert [line["annotation_id"] for line in lines] == [a["id"] for a in rare_instances]
    hits, base = [], []
    for line in lines:
        assert line["frequency"] == "r" and len(line["neighbours"]) == 8
        scores = [n["score"] for n in line["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        c = line["category_id"]
        hits.append(np.mean([c in classes_of[n["image_id"]] for n in line["neighbours"]]))
        base.append(np.mean([c in classes_of[i] for i in pool_ids]))
    precision, random_share = float(np.mean(hits)), float(np.mean(base))
    assert precision >= 3.0 * random_share, (precision, random_share)

    # a random sample of the same size as the retrieved set, for the same queries, stays near base
    rng = np.random.default_rng(0)
    sampled = [np.mean([line["category_id"] in classes_of[i] for i in rng.choice(pool_ids, 8, replace=False)])
               for line in lines]
    assert precision >= 2.0 * float(np.mean(sampled))

    # unlabeled.json: LVIS image list, categories copied, no annotations, loadable
    unlabeled = json.loads(rare_run.read_text())
    assert unlabeled["annotations"] == [] and unlabeled["categories"] == train.data["categories"]
    assert all(set(img) == {"id", "file_name", "width", "height"} for img in unlabeled["images"])
    retrieved = {n["image_id"] for line in lines for n in line["neighbours"]}
    assert {img["id"] for img in unlabeled["images"]} <= retrieved <= set(pool_ids)
    assert load_annotations(rare_run).images  # valid LVIS for the next step
    summary = json.loads(rare_run.with_name("retrieval_summary.json").read_text())
    assert summary["queries"] == {"rare": len(rare_instances)}
    assert summary["images_per_group"]["rare"] == summary["retrieved_images"] == len(unlabeled["images"])
    assert summary["selected"] == len(retrieved)
    assert summary["retrieved_images"] == summary["selected"] - summary["near_duplicates_removed"]
    assert summary["indexed"] == 300 and summary["index"]["kind"] == "flat"


def test_outputs_need_force(synth, rare_run, capsys):
    code, err = run_cli(_base(synth, rare_run, "--pool", str(synth / "pool.json"), "--k", "8"), capsys)
    assert code == 2 and "--force" in err and len(err.splitlines()) == 1


def _near_duplicate(src: Path, dst: Path) -> None:
    """The same picture with a few pixels changed: a different file, almost the same content."""
    pixels = np.array(Image.open(src).convert("RGB"))
    pixels[:2, :2] = 255 - pixels[:2, :2]
    Image.fromarray(pixels).save(dst)


def test_duplicates_collapsed_and_labeled_excluded(synth, tmp_path, capsys):
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    originals = [f"pool_{i:06d}.png" for i in range(24)]
    for name in originals:
        shutil.copy(synth / "images" / name, pool_dir / name)
    # exact duplicates under other names (one in a sub-folder)
    (pool_dir / "sub").mkdir()
    shutil.copy(pool_dir / originals[0], pool_dir / "zz_copy_of_0.png")
    shutil.copy(pool_dir / originals[1], pool_dir / "sub" / "copy_of_1.png")
    shutil.copy(pool_dir / originals[1], pool_dir / "zz_second_copy_of_1.png")
    # a near duplicate (listed after its original)
    _near_duplicate(pool_dir / originals[2], pool_dir / "zz_near_2.png")
    # labeled images: two copies under new names (same content) and a different picture under a labeled name
    shutil.copy(synth / "images" / "train_000003.png", pool_dir / "labeled_copy_a.png")
    shutil.copy(synth / "images" / "train_000004.png", pool_dir / "labeled_copy_b.png")
    shutil.copy(synth / "images" / "pool_000030.png", pool_dir / "train_000010.png")
    (pool_dir / "notes.txt").write_text("not an image")  # ignored: not an image suffix

    out = tmp_path / "out" / "unlabeled.json"
    code, err = run_cli(_base(synth, out, "--pool", str(pool_dir), "--k", "64",
                              "--dedup-threshold", "0.995"), capsys)
    assert code == 0, err
    summary = json.loads(out.with_name("retrieval_summary.json").read_text())
    assert summary["pool_images"] == 24 + 4 + 3
    assert summary["exact_duplicates_removed"] == 3
    assert summary["labeled_excluded_by_content"] == 2 and summary["labeled_excluded_by_name"] == 1
    assert summary["indexed"] == 25  # 24 originals + the near duplicate
    names = {img["file_name"] for img in json.loads(out.read_text())["images"]}
    assert not names & {"zz_copy_of_0.png", "sub/copy_of_1.png", "zz_second_copy_of_1.png", "labeled_copy_a.png",
                        "labeled_copy_b.png", "train_000010.png", "zz_near_2.png"}
    assert set(originals) <= names  # k >= pool: everything else is retrieved and kept
    assert summary["near_duplicates_removed"] == 1 and summary["retrieved_images"] == 24
    # folder pools get ids after the labeled set's largest id
    ids = {img["file_name"]: img["id"] for img in json.loads(out.read_text())["images"]}
    assert min(ids.values()) > max(load_annotations(synth / "train.json").images)
    lines = _read_jsonl(out.with_name("retrieval.jsonl"))
    near = [n for line in lines for n in line["neighbours"] if n["file_name"] == "zz_near_2.png"]
    assert near and all(n["duplicate_of"] == ids[originals[2]] for n in near)
    assert all("duplicate_of" not in n for line in lines for n in line["neighbours"]
               if n["file_name"] != "zz_near_2.png")


def test_interrupted_embedding_resumes_to_the_same_output(synth, rare_run, tmp_path, capsys, monkeypatch):
    args = ["--pool", str(synth / "pool.json"), "--k", "8", "--chunk-size", "32"]  # 300 pool images: 10 chunks
    fresh = rare_run  # the same run uninterrupted (with another chunk size, which must not matter)

    real_write = rcache.write_chunk
    written: list[str] = []

    def interrupt_after_three(path, *a, **kw):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if the job were killed while embedding chunk 4
        real_write(path, *a, **kw)
        written.append(Path(path).name)

    resumed = tmp_path / "resumed" / "unlabeled.json"
    monkeypatch.setattr(rcache, "write_chunk", interrupt_after_three)
    code, err = run_cli(_base(synth, resumed, *args), capsys)
    assert code == 130
    cache = resumed.parent / "retrieval_cache"
    pool_cache = next(cache.glob("pool-*"))
    assert sorted(p.name for p in pool_cache.glob("chunk_*.safetensors")) == written
    assert not resumed.exists()

    counted: list[str] = []

    def counting(path, *a, **kw):
        counted.append(Path(path).parent.name.split("-")[0] + "/" + Path(path).name)
        real_write(path, *a, **kw)

    monkeypatch.setattr(rcache, "write_chunk", counting)
    code, err = run_cli(_base(synth, resumed, *args), capsys)
    assert code == 0, err
    pool_written = [c for c in counted if c.startswith("pool/")]
    assert len(pool_written) == 7 and not set(written) & {c.split("/")[1] for c in pool_written}
    assert resumed.read_bytes() == fresh.read_bytes()
    assert resumed.with_name("retrieval.jsonl").read_bytes() == fresh.with_name("retrieval.jsonl").read_bytes()

    # a complete cache: nothing is embedded again
    counted.clear()
    code, err = run_cli(_base(synth, resumed, *args, "--force"), capsys)
    assert code == 0, err
    assert counted == []

    # another embedder configuration never reuses the cache
    code, err = run_cli(_base(synth, resumed, *args, "--force", "--image-size", "48"), capsys)
    assert code == 0, err
    assert len([c for c in counted if c.startswith("pool/")]) == 10
    assert len(list(cache.glob("pool-*"))) == 2


def test_changed_pool_file_invalidates_its_chunk(synth, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    args = ["--images", str(images), "--pool", str(synth / "pool.json"), "--k", "4", "--chunk-size", "100"]
    out = tmp_path / "out" / "unlabeled.json"
    code, err = run_cli(_base(synth, out, *args), capsys)
    assert code == 0, err
    counted: list[str] = []
    real_write = rcache.write_chunk
    monkeypatch.setattr(rcache, "write_chunk", lambda path, *a, **kw: (counted.append(Path(path).name),
                                                                        real_write(path, *a, **kw)))
    # pool_000150 sits in chunk 1 (images 100-199); replace it by another picture of the same size
    shutil.copy(images / "pool_000003.png", images / "pool_000150.png")
    code, err = run_cli(_base(synth, out, *args, "--force"), capsys)
    assert code == 0, err
    assert counted == ["chunk_000001.safetensors"]
    summary = json.loads(out.with_name("retrieval_summary.json").read_text())
    assert summary["exact_duplicates_removed"] == 1  # the copy is now detected


def _corrupt_pool(synth: Path, tmp_path: Path) -> Path:
    pool_dir = tmp_path / "badpool"
    pool_dir.mkdir()
    for i in range(12):
        shutil.copy(synth / "images" / f"pool_{i:06d}.png", pool_dir / f"pool_{i:06d}.png")
    (pool_dir / "pool_000005.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return pool_dir


def test_unreadable_pool_image_exits_2_or_is_skipped(synth, tmp_path, capsys):
    pool_dir = _corrupt_pool(synth, tmp_path)
    out = tmp_path / "out" / "unlabeled.json"
    code, err = run_cli(_base(synth, out, "--pool", str(pool_dir), "--k", "4"), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "pool_000005.png" in err and "--skip-bad-images" in err
    code, err = run_cli(_base(synth, out, "--pool", str(pool_dir), "--k", "4", "--skip-bad-images"), capsys)
    assert code == 0, err
    summary = json.loads(out.with_name("retrieval_summary.json").read_text())
    assert summary["bad_images_skipped"] == 1 and summary["indexed"] == 11
    assert summary["bad_images"][0]["file_name"] == "pool_000005.png"
    assert "pool_000005.png" not in {img["file_name"] for img in json.loads(out.read_text())["images"]}
    # the cache now holds the bad image's record: without --skip-bad-images it is still an error
    code, err = run_cli(_base(synth, out, "--pool", str(pool_dir), "--k", "4", "--force"), capsys)
    assert code == 2 and "pool_000005.png" in err


def test_refused_run_keeps_only_finished_chunks(synth, tmp_path, capsys, monkeypatch):
    """An image that does not decode is found while embedding: the refused run takes back what would
    not help the rerun (cache.json, abort markers, a cache folder without a finished chunk) and keeps
    whole chunks, which the corrected rerun (--skip-bad-images) does not embed again."""
    pool_dir = _corrupt_pool(synth, tmp_path)  # 12 images, pool_000005.png broken: in chunk 1 of 3
    out = tmp_path / "out" / "unlabeled.json"
    args = _base(synth, out, "--pool", str(pool_dir), "--k", "4", "--chunk-size", "4", "--batch-size", "4")
    code, err = run_cli(args, capsys)
    assert code == 2 and "pool_000005.png" in err
    cache = out.parent / "retrieval_cache"
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("pool-*")).name]  # no queries folder
    assert sorted(p.name for p in next(cache.glob("pool-*")).iterdir()) == ["cache.json", "chunk_000000.safetensors"]
    counted: list[str] = []
    real_write = rcache.write_chunk
    monkeypatch.setattr(rcache, "write_chunk", lambda path, *a, **kw: (
        counted.append(Path(path).parent.name.split("-")[0] + "/" + Path(path).name), real_write(path, *a, **kw)))
    code, err = run_cli(args + ["--skip-bad-images"], capsys)
    assert code == 0, err
    assert [c for c in counted if c.startswith("pool/")] == ["pool/chunk_000001.safetensors",
                                                             "pool/chunk_000002.safetensors"]
    # refused before the first chunk: the output folder is left as it was
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (pool_dir / "pool_000000.png").write_bytes(b"not a png")
    code, err = run_cli(_base(synth, fresh / "unlabeled.json", "--pool", str(pool_dir), "--k", "4"), capsys)
    assert code == 2 and "pool_000000.png" in err
    assert list(fresh.iterdir()) == []


def test_bad_input_exits_2_with_one_line(synth, tmp_path, capsys):
    out = tmp_path / "out" / "unlabeled.json"
    pool = str(synth / "pool.json")
    # no rare-class instances left in the labeled set
    data = json.loads((synth / "train.json").read_text())
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in rare]
    no_rare = tmp_path / "no_rare.json"
    no_rare.write_text(json.dumps(data))
    # a pool json naming a missing file
    pool_data = json.loads((synth / "pool.json").read_text())
    pool_data["images"][3]["file_name"] = "missing.png"
    missing = tmp_path / "pool_missing.json"
    missing.write_text(json.dumps(pool_data))
    cases = [
        (["--pool", pool, "--k", "0"], "--k"),
        (["--pool", pool, "--queries", "rarest"], "--queries"),
        (["--pool", pool, "--dedup-threshold", "1.5"], "--dedup-threshold"),
        (["--pool", pool, "--index", "hnsw"], "--index"),
        (["--pool", str(tmp_path / "nowhere")], "pool not found"),
        (["--pool", str(missing), "--pool-images", str(synth / "images")], "missing.png"),
        (["--pool", pool, "--embedder", "not_a_model_xyz"], "unknown embedder"),
    ]
    for extra, needle in cases:
        code, err = run_cli(_base(synth, out, *extra), capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (extra, err)
    args = _base(synth, out, "--pool", pool)
    args[args.index("--annotations") + 1] = str(no_rare)
    code, err = run_cli(args, capsys)
    assert code == 2 and "empty query set" in err and "no_rare.json" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_ranks_embed_disjoint_contiguous_chunks_that_match_one_process(synth, tmp_path, monkeypatch):
    """Two torchrun ranks (simulated in-process: the rank/world-size functions patched) each write
    their own contiguous block of chunks; together they are bit-identical to a single process.
    (A real `torchrun --nproc_per_node 2 slsd retrieve ...` gives the same output files; it is not
    run here to keep the suite fast.)"""
    from slsd_cli import distributed
    from slsd_cli.retrieval.embedders import build_embedder
    from slsd_cli.retrieval.images import list_pool

    items = list_pool(synth / "pool.json", synth / "images")
    embedder = build_embedder("colorhist")
    single = rcache.embed_items(items, embedder, tmp_path / "one", "pool", hash_files=True, chunk_size=64)
    written = {}
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        before = set((tmp_path / "two").rglob("chunk_*"))
        sharded = rcache.embed_items(items, embedder, tmp_path / "two", "pool", hash_files=True, chunk_size=64)
        written[rank] = sorted(p.name for p in set((tmp_path / "two").rglob("chunk_*")) - before)
    assert written == {0: [f"chunk_00000{i}.safetensors" for i in range(3)],
                       1: [f"chunk_00000{i}.safetensors" for i in range(3, 5)]}
    for a, b in zip(single.chunks(), sharded.chunks()):
        assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.hashes, b.hashes)
        assert a.ok.all() and np.array_equal(a.sizes, b.sizes)


def test_text_list_pool_gives_the_same_selection(synth, rare_run, tmp_path, capsys):
    """A .txt pool (one file name per line, the form for very large pools) retrieves the same files
    as the json listing of the same images; its ids follow the labeled set's."""
    names = [img["file_name"] for img in json.loads((synth / "pool.json").read_text())["images"]]
    listing = tmp_path / "pool.txt"
    listing.write_text("\n".join(names) + "\n")
    out = tmp_path / "out" / "unlabeled.json"
    code, err = run_cli(_base(synth, out, "--pool", str(listing), "--pool-images", str(synth / "images"), "--k", "8",
                              "--workers", "1"), capsys)
    assert code == 0, err
    got = json.loads(out.read_text())["images"]
    want = json.loads(rare_run.read_text())["images"]
    assert [g["file_name"] for g in got] == [w["file_name"] for w in want]
    assert [(g["width"], g["height"]) for g in got] == [(w["width"], w["height"]) for w in want]
    first = max(load_annotations(synth / "train.json").images) + 1
    assert all(g["id"] == first + names.index(g["file_name"]) for g in got)


def test_ivfpq_index_agrees_with_exact_search(synth, rare_run, tmp_path, capsys):
    out = tmp_path / "ivf" / "unlabeled.json"
    code, err = run_cli(_base(synth, out, "--pool", str(synth / "pool.json"), "--k", "8", "--index", "ivfpq",
                              "--target-recall", "0.9"), capsys)
    assert code == 0, err
    summary = json.loads(out.with_name("retrieval_summary.json").read_text())
    index = summary["index"]
    assert index["kind"] == "ivfpq" and index["tuning"]["reached"] and index["tuning"]["recall"] >= 0.9
    assert index["nprobe"] >= 1 and index["k_factor"] >= 1 and not index["streamed_exact"]
    exact = {(line["annotation_id"], n["image_id"]) for line in _read_jsonl(rare_run.with_name("retrieval.jsonl"))
             for n in line["neighbours"]}
    approx = {(line["annotation_id"], n["image_id"]) for line in _read_jsonl(out.with_name("retrieval.jsonl"))
              for n in line["neighbours"]}
    assert len(exact & approx) / len(exact) >= 0.9  # every query was a tuning query here (69 < 256)
