"""Chunked, sharded, resumable embedding of a list of items.

The items are cut into fixed chunks of `chunk_size` consecutive items (chunk boundaries do not
depend on the number of processes, so a run can resume under a different world size). Under
torchrun each rank embeds a contiguous block of chunks (`distributed.shard_indices` over the chunk
count). Every finished chunk is written atomically as one safetensors file:

    CACHE_DIR/<kind>-<key>/chunk_000042.safetensors
        embeddings  float16 [n, D]   (L2-normalised before the cast)
        ok          uint8   [n]      (0 = the file could not be read/decoded; its row is zeros)
        hash        uint8   [n, 16]  (blake2b-128 of the file bytes; zeros when not hashed)
        size        int32   [n, 2]   (decoded width, height)
        metadata: start, end, files_signature (sizes + mtimes of the chunk's files), errors (json)

`key` hashes the embedder's fingerprint (model, weights digest, input size), the preprocessing
(crop margin) and the item list itself, so changing any of them starts a fresh cache; a chunk whose
files changed on disk since it was written (size or mtime) is recomputed. A run that is interrupted
leaves whole chunks only, and the next run embeds only the chunks that are missing.

A refused run (an InputError, e.g. an unreadable image found while embedding, `refused_run_cleanup`)
leaves nothing that was not useful: its abort markers are removed, and a cache folder it created
is removed unless it holds a finished chunk (whole chunks are valid work that the corrected rerun
reuses — with `--skip-bad-images`, or after the bad file is replaced, only that file's chunk is
embedded again); a folder that existed before the run, which a resume needs, is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from slsd_cli import distributed, interrupts
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_json, make_dirs, remove_leftovers, save_safetensors_atomic
from slsd_cli.retrieval.embedders import Embedder
from slsd_cli.retrieval.images import HASH_BYTES, Item, ItemDataset, collate

CACHE_FORMAT = 1
PREPROCESS_VERSION = "pil-draft-bilinear-1"  # bump when decoding/cropping/resizing changes
ABORT_GLOB = "ABORT.rank*"  # a failed rank's marker: the other ranks stop at their next batch
CHUNK_GLOB = "chunk_*.safetensors"


def items_digest(items) -> str:
    if hasattr(items, "digest"):  # a PoolListing identifies itself without building every Item
        return items.digest()
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.key().encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def files_signature(items, indices: range) -> str:
    """Sizes and modification times of a chunk's files: a changed file invalidates its chunk."""
    digest = hashlib.sha256()
    for i in indices:
        item = items[i]
        try:
            st = os.stat(item.path)
            digest.update(f"{item.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{item.path}|missing\n".encode())
    return digest.hexdigest()


def write_chunk(path: Path, embeddings: np.ndarray, ok: np.ndarray, hashes: np.ndarray, sizes: np.ndarray,
                metadata: dict[str, str]) -> None:
    """One finished chunk, written atomically (a crash leaves either the whole file or none)."""
    save_safetensors_atomic({
        "embeddings": torch.from_numpy(embeddings.astype(np.float16)),
        "ok": torch.from_numpy(ok.astype(np.uint8)),
        "hash": torch.from_numpy(hashes.astype(np.uint8)),
        "size": torch.from_numpy(sizes.astype(np.int32)),
    }, path, metadata=metadata)


@dataclass
class Chunk:
    start: int
    end: int
    embeddings: np.ndarray  # float16 [n, D]
    ok: np.ndarray          # bool [n]
    hashes: np.ndarray      # uint8 [n, 16]
    sizes: np.ndarray       # int32 [n, 2] (width, height)
    errors: dict[int, str]  # global index -> message


class EmbeddingStore:
    """The chunk files of one embedding run (read side)."""

    def __init__(self, directory: Path, num_items: int, chunk_size: int, dim: int):
        self.directory = directory
        self.num_items = num_items
        self.chunk_size = chunk_size
        self.dim = dim

    @property
    def num_chunks(self) -> int:
        return (self.num_items + self.chunk_size - 1) // self.chunk_size

    def chunk_path(self, c: int) -> Path:
        return self.directory / f"chunk_{c:06d}.safetensors"

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min(self.num_items, (c + 1) * self.chunk_size)

    def read(self, c: int, embeddings: bool = True) -> Chunk:
        """One chunk; `embeddings=False` skips the (large) vectors."""
        from safetensors import safe_open

        path = self.chunk_path(c)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                names = ("embeddings", "ok", "hash", "size") if embeddings else ("ok", "hash", "size")
                tensors = {name: handle.get_tensor(name) for name in names}
        except Exception as exc:  # missing or corrupt chunk: the cache folder was tampered with
            raise InputError(f"unreadable embedding cache chunk ({exc}); delete it and run again", path=path) from exc
        start, end = self.chunk_range(c)
        errors = {int(k): v for k, v in json.loads(meta.get("errors", "{}")).items()}
        vectors = tensors["embeddings"].numpy() if embeddings else np.zeros((end - start, 0), np.float16)
        return Chunk(start, end, vectors, tensors["ok"].numpy().astype(bool), tensors["hash"].numpy(),
                     tensors["size"].numpy(), errors)

    def chunks(self, embeddings: bool = True) -> Iterator[Chunk]:
        for c in range(self.num_chunks):
            yield self.read(c, embeddings)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """float32 rows for the given item indices (any order), reading only the chunks needed."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        chunk_of = indices // self.chunk_size
        for c in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == c)
            chunk = self.read(int(c))
            out[where] = chunk.embeddings[indices[where] - chunk.start].astype(np.float32)
        return out

    def metadata(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """ok [N], hashes [N, 16], sizes [N, 2] and error messages, without the embeddings."""
        ok = np.zeros(self.num_items, dtype=bool)
        hashes = np.zeros((self.num_items, HASH_BYTES), dtype=np.uint8)
        sizes = np.zeros((self.num_items, 2), dtype=np.int32)
        errors: dict[int, str] = {}
        for chunk in self.chunks(embeddings=False):
            ok[chunk.start:chunk.end] = chunk.ok
            hashes[chunk.start:chunk.end] = chunk.hashes
            sizes[chunk.start:chunk.end] = chunk.sizes
            errors.update(chunk.errors)
        return ok, hashes, sizes, errors


def _valid_chunk(store: EmbeddingStore, c: int, signature: str) -> bool:
    path = store.chunk_path(c)
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:  # a foreign or corrupt file in the cache: recompute it
        return False
    start, end = store.chunk_range(c)
    return (meta.get("start") == str(start) and meta.get("end") == str(end)
            and meta.get("files_signature") == signature)


def embed_items(items, embedder: Embedder, cache_dir: str | Path, kind: str, *, margin: float = 0.0,
                hash_files: bool = False, batch_size: int = 64, workers: int = 0, chunk_size: int = 4096,
                fail_fast: bool = True, error_hint: str = "", progress=None) -> EmbeddingStore:
    """Embed this rank's chunks of `items` (a list of `Item`s or a `PoolListing`) into the chunk
    cache (call on every rank, then
    `sync_errors`, which also propagates a failure to every rank, before reading the store).

    An unreadable file raises an InputError naming it when `fail_fast` (the other ranks see an
    abort marker in the cache folder and stop at their next batch); otherwise it is recorded in
    its chunk (ok = 0, the message kept) for the caller to count and report. `error_hint` is
    appended to the message of a fail-fast error."""
    if chunk_size < 1:
        raise InputError(f"chunk size must be >= 1, got {chunk_size}")
    key_doc = {"format": CACHE_FORMAT, "kind": kind, "embedder": embedder.fingerprint,
               "input_size": list(embedder.input_size), "dim": embedder.dim, "margin": margin,
               "preprocess": PREPROCESS_VERSION, "hash_files": hash_files, "chunk_size": chunk_size,
               "num_items": len(items),
               "items": items_digest(items)}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_dir) / f"{kind}-{key}"
    make_dirs(directory)  # below a regular file, read-only: the one-line error
    if distributed.is_main() and not (directory / "cache.json").is_file():
        atomic_write_json(directory / "cache.json", key_doc, indent=1)
    store = EmbeddingStore(directory, len(items), chunk_size, embedder.dim)
    own_abort = directory / f"ABORT.rank{distributed.rank()}"
    own_abort.unlink(missing_ok=True)
    if distributed.is_main():  # also the markers of ranks a failed run had and this one has not
        remove_leftovers(directory, ABORT_GLOB)
    distributed.barrier()  # no rank looks for abort markers before every stale one is gone

    mine = distributed.shard_indices(store.num_chunks)
    signatures = {c: files_signature(items, range(*store.chunk_range(c))) for c in mine}
    pending = [c for c in mine if not _valid_chunk(store, c, signatures[c])]
    todo = np.concatenate([np.arange(*store.chunk_range(c), dtype=np.int64) for c in pending]) if pending \
        else np.zeros(0, dtype=np.int64)
    task = None
    if progress is not None:
        task = progress.add_task(f"embed {kind}", total=len(todo), status=f"{len(mine) - len(pending)} chunks cached")
    if len(todo) == 0:
        return store

    dataset = ItemDataset(items, todo, embedder.input_size, margin, hash_files)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=embedder.device.type == "cuda",
                                         worker_init_fn=interrupts.worker_init)
    pending_iter = iter(pending)
    current = next(pending_iter)
    start, end = store.chunk_range(current)
    n = end - start
    buf_emb, buf_ok, buf_hash, buf_size = _chunk_buffers(n, embedder.dim)
    errors: dict[int, str] = {}
    filled = 0
    for batch in loader:
        ok = batch["ok"]
        if fail_fast and not ok.all():
            row = int(np.flatnonzero(~ok.numpy())[0])
            item = items[int(batch["index"][row])]
            error = InputError(batch["error"][row] + error_hint, path=item.path, record=item.record)
            own_abort.write_text(error.format() + "\n")
            raise error
        if distributed.world_size() > 1:
            aborted = sorted(directory.glob(ABORT_GLOB))
            if aborted:
                raise InputError(f"stopped because another process failed: {aborted[0].read_text().strip()}")
        emb = np.zeros((len(ok), embedder.dim), dtype=np.float32)
        if ok.any():
            emb[ok.numpy()] = embedder(batch["image"][ok]).numpy()
        for row, index in enumerate(batch["index"].tolist()):
            # rows arrive in order, chunk after chunk
            local = index - start
            buf_emb[local] = emb[row]
            buf_ok[local] = bool(ok[row])
            buf_hash[local] = batch["hash"][row].numpy()
            buf_size[local] = batch["size"][row].numpy()
            if not ok[row]:
                errors[index] = batch["error"][row]
            filled += 1
            if filled == n:
                meta = {"start": str(start), "end": str(end), "files_signature": signatures[current],
                        "errors": json.dumps({str(k): v for k, v in errors.items()}),
                        "embedder": embedder.fingerprint}
                write_chunk(store.chunk_path(current), buf_emb, buf_ok, buf_hash, buf_size, meta)
                current = next(pending_iter, None)
                if current is not None:
                    start, end = store.chunk_range(current)
                    n = end - start
                    buf_emb, buf_ok, buf_hash, buf_size = _chunk_buffers(n, embedder.dim)
                    errors = {}
                    filled = 0
        if progress is not None:
            progress.advance(task, len(ok))
    return store


def sync_errors(error: InputError | None) -> None:
    """A barrier that carries failures: wait for every rank; if any rank failed (`error` given),
    every rank raises — the failing rank its own error, the others the same message — so no
    process is left waiting at a barrier and every log names the bad file. A check of `error`
    alone in a single process."""
    if not distributed.is_distributed():
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    messages: list = [None] * distributed.world_size()
    dist.all_gather_object(messages, None if error is None else error.format())
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise InputError(f"{message} (reported by rank {rank})")


@contextlib.contextmanager
def refused_run_cleanup(cache_dir: str | Path) -> Iterator[None]:
    """Wrap a run's use of `cache_dir` (enter on every rank, before any `embed_items`): on an
    InputError — raised on every rank by `sync_errors`, so every rank has stopped embedding — rank 0
    removes what the run added to the cache and would not help the corrected rerun: every abort
    marker, each cache folder this run created that holds no finished chunk, and `cache_dir` and
    the folders above it that this run created, once empty. Finished chunks and folders that
    existed before (an interrupted run's, which a resume needs) are kept."""
    cache_dir = Path(cache_dir)
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    before = {p.name for p in cache_dir.iterdir()} if cache_dir.is_dir() else set()
    distributed.barrier()  # every rank looked before any rank creates a cache folder
    try:
        yield
    except InputError:
        if distributed.is_main():
            _discard_refused(cache_dir, before, existing)
        raise


def _discard_refused(cache_dir: Path, before: set[str], existing: Path) -> None:
    """See `refused_run_cleanup`."""
    if not cache_dir.is_dir():
        return
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        remove_leftovers(folder, ABORT_GLOB)
        if folder.name in before or any(folder.glob(CHUNK_GLOB)):
            continue
        # only what embed_items writes before its first chunk: the key document and temporaries
        remove_leftovers(folder, "cache.json", ".*.tmp")
        with contextlib.suppress(OSError):
            folder.rmdir()  # anything else in it (not ours) keeps it
    folder = cache_dir
    while folder != existing and folder != folder.parent:
        try:
            folder.rmdir()
        except OSError:  # not empty, or not ours to remove
            break
        folder = folder.parent


def first_error(store: EmbeddingStore, items: list[Item]) -> InputError | None:
    """The first unreadable item as an InputError naming its file (None when all were read)."""
    for chunk in store.chunks(embeddings=False):
        if chunk.errors:
            index = min(chunk.errors)
            item = items[index]
            return InputError(chunk.errors[index] + " (pass --skip-bad-images to skip unreadable pool images)",
                              path=item.path, record=item.record)
    return None


def _chunk_buffers(n: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Empty buffers for one cache chunk of `n` images: fp16 embeddings, ok flags, content hashes, sizes."""
    return (np.zeros((n, dim), dtype=np.float16), np.zeros(n, dtype=bool),
            np.zeros((n, HASH_BYTES), dtype=np.uint8), np.zeros((n, 2), dtype=np.int32))
