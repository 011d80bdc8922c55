"""`slsd retrieve`: embeddings, a faiss index and de-duplication (paper §4.1).

- `embedders`: DINOv2 / any timm model / an slsd detector backbone / a colour-histogram baseline.
- `images`: pool listing (folder or image-list json), query crops, decoding and content hashes.
- `cache`: chunked, torchrun-sharded, resumable fp16 embedding cache.
- `index`: exact flat and IVF-PQ (+ re-ranking) inner-product search, nprobe tuning to a recall.
- `pipeline`: the whole step (`run_retrieve`), selection, de-duplication and outputs.
"""

from slsd_cli.retrieval.embedders import DEFAULT_EMBEDDER, Embedder, build_embedder
from slsd_cli.retrieval.pipeline import RetrieveConfig, run_retrieve

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "RetrieveConfig", "build_embedder", "run_retrieve"]
