"""Class prototypes and similarity-based label smoothing (paper Eq. 1-3; docs/method.md).

- Eq. 1 (`prototypes_from_sums`): a prototype is the mean backbone embedding of a class's
  instances. `PrototypeAccumulator` keeps per-class sums (float64) and counts, so shards computed by
  several processes add up exactly (`all_reduce`) before the division.
- Eq. 2 (`frequency_modulated_similarity`): `S'_ij = exp(S_ij / (tau N_j^gamma)) / sum_k exp(S_ik / (tau N_k^gamma))`,
  with `S` the cosine similarity of the prototypes (`cosine_similarity`), `N_j` the instance count
  of class j and a temperature `tau` (1 = the paper; below 1 the similarity moves the targets
  more). Classes with `N_j = 0` have no prototype and get no smoothing mass (their column is
  excluded from the softmax).
- Eq. 3 (`smoothed_targets`) read as a distribution: the target of a class-c instance is
  `(1 - eps) * onehot(c) + eps * S'[c, :]`.

The targets of every class are precomputed once as a `[C, C]` table; a ground-truth instance of
class c takes row c (`engine.labeled.add_class_targets`), and the detector gives a proposal matched
to it that row and a background proposal the pure background target (`model.losses`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import torch

from slsd_cli import distributed
from slsd_cli.errors import InputError
from slsd_cli.io import load_safetensors, save_safetensors_atomic
from slsd_cli.recipe import SmoothingMode

PROTOTYPE_TENSORS = ("prototypes", "counts", "similarity", "category_ids")


# ---------------------------------------------------------------- Eq. 1: prototypes


class PrototypeAccumulator:
    """Per-class sums `[C, D]` (float64) and instance counts `[C]` (int64) of embeddings."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0]

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add instance embeddings `[N, D]` with contiguous class indices `labels [N]`."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {tuple(embeddings.shape)}")
        labels = labels.to(device=self.sums.device, dtype=torch.int64).reshape(-1)
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {embeddings.shape[0]} embeddings")
        if labels.numel() == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        self.sums.index_add_(0, labels, embeddings.detach().to(self.sums))
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def all_reduce(self) -> "PrototypeAccumulator":
        """Sum the shards of every process (identity in a single process). With nccl the tensors
        travel through the current CUDA device and come back to where they were."""
        if not distributed.is_distributed():
            return self
        device = self.sums.device
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        for name in ("sums", "counts"):
            tensor = getattr(self, name)
            moved = tensor.to(device)
            distributed.all_reduce_sum(moved)
            setattr(self, name, moved.to(tensor.device))
        return self

    def prototypes(self) -> torch.Tensor:
        """Eq. 1 on the accumulated sums: `[C, D]` float64."""
        return prototypes_from_sums(self.sums, self.counts)


def prototypes_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Eq. 1, `p_i = (1 / N_i) sum_{n: y_n = i} B(x_n)`, from per-class embedding sums `[C, D]` and
    instance counts `[C]`: the mean embedding per class (float64); zero rows for classes without
    instances (they have no prototype)."""
    return sums.to(torch.float64) / counts.clamp(min=1).to(torch.float64).unsqueeze(1)


def cosine_similarity(prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `S [C, C]` of prototypes, computed in float64: symmetric, in [-1, 1], with a
    unit diagonal for every class with a (non-zero) prototype; rows and columns of zero prototypes
    are 0."""
    p = prototypes.to(torch.float64)
    norms = p.norm(dim=1)
    present = norms > 0
    unit = p / norms.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(1)
    sim = unit @ unit.T
    sim = 0.5 * (sim + sim.T)  # exact symmetry regardless of the matmul's summation order
    sim.clamp_(-1.0, 1.0)
    sim.diagonal().copy_(present.to(sim))
    return sim


# ---------------------------------------------------------------- Eq. 2-3: target tables


def frequency_modulated_similarity(similarity: torch.Tensor, counts: torch.Tensor, gamma: float,
                                   temperature: float = 1.0) -> torch.Tensor:
    """Eq. 2: `S' [C, C]` in float64, row i the softmax over j of `S_ij / (tau N_j^gamma)`.

    `temperature` (tau) = 1 is the paper's equation. With N_j in the tens and gamma = 1.5 every
    logit is close to 0 and S' is nearly uniform whatever S says; tau < 1 scales the logits up so
    that the similarity can shape the targets. Columns of classes with `N_j = 0` are 0; rows of such
    classes are 0 too (they have no prototype, hence no similarity to smooth towards)."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be [C, C], got {tuple(similarity.shape)}")
    if not temperature > 0:
        raise InputError(f"the similarity temperature must be > 0, got {temperature}")
    num_classes = similarity.shape[0]
    counts = counts.reshape(-1).to(device=similarity.device, dtype=torch.float64)
    if counts.numel() != num_classes:
        raise ValueError(f"{counts.numel()} counts for {num_classes} classes")
    if bool((counts < 0).any()):
        raise ValueError("counts must be >= 0")
    present = counts > 0
    scale = torch.where(present, counts.clamp(min=1).pow(float(gamma)), torch.ones_like(counts)) * float(temperature)
    logits = similarity.to(torch.float64) / scale.unsqueeze(0)
    logits = logits.masked_fill(~present.unsqueeze(0), float("-inf"))
    if not bool(present.any()):
        return torch.zeros_like(logits)
    s_prime = torch.softmax(logits, dim=1)
    return s_prime * present.to(s_prime).unsqueeze(1)


def similarity_targets(similarity: torch.Tensor, counts: torch.Tensor, epsilon: float,
                       gamma: float, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 2-3: the similarity-smoothing target table `[C, C]` (float32) from the prototypes'
    cosine similarity `S`, the instance counts `N` and the temperature tau of Eq. 2."""
    _check_epsilon(epsilon)
    return smoothed_targets(frequency_modulated_similarity(similarity, counts, gamma, temperature), epsilon)


def smoothed_targets(s_prime: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 3, `y~ = (1 - eps) y + eps S' y`, for every class at once: a table `[C, C]` (float32)
    whose row c, `(1 - eps) * onehot(c) + eps * S'[c, :]`, is the target of a class-c instance.

    Every row sums to 1 when the rows of `S'` do. A class whose row of `S'` is all zero (`N_c = 0`,
    no prototype) keeps a one-hot row: there is no similarity to smooth it towards.
    """
    _check_epsilon(epsilon)
    s_prime = s_prime.to(torch.float64)
    present = s_prime.sum(dim=1) > 0
    eye = torch.eye(s_prime.shape[0], dtype=torch.float64, device=s_prime.device)
    table = torch.where(present.unsqueeze(1), (1.0 - epsilon) * eye + epsilon * s_prime, eye)
    return table.to(torch.float32)


def uniform_targets(num_classes: int, epsilon: float) -> torch.Tensor:
    """Uniform label smoothing (the ablation baseline): Eq. 3 with `S' = 1 / C` everywhere."""
    return smoothed_targets(torch.full((num_classes, num_classes), 1.0 / num_classes, dtype=torch.float64), epsilon)


def onehot_targets(num_classes: int) -> torch.Tensor:
    return torch.eye(num_classes, dtype=torch.float32)


def _check_epsilon(epsilon: float) -> None:
    if not 0.0 <= epsilon <= 1.0:
        raise InputError(f"epsilon must lie in [0, 1], got {epsilon}")


# ---------------------------------------------------------------- the prototypes file


def save_prototypes(path: str | Path, prototypes: torch.Tensor, counts: torch.Tensor, similarity: torch.Tensor,
                    category_ids: list[int] | torch.Tensor, metadata: dict[str, Any] | None = None) -> None:
    """Write `prototypes.safetensors` atomically: `prototypes [C, D]` float32, `counts [C]` int64,
    `similarity [C, C]` float32, `category_ids [C]` int64; metadata values are stored as strings
    (non-strings json-encoded)."""
    ids = torch.as_tensor(category_ids, dtype=torch.int64).reshape(-1)
    c = ids.numel()
    if prototypes.ndim != 2 or prototypes.shape[0] != c:
        raise ValueError(f"prototypes must be [{c}, D], got {tuple(prototypes.shape)}")
    if counts.reshape(-1).numel() != c or tuple(similarity.shape) != (c, c):
        raise ValueError("counts must be [C] and similarity [C, C]")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "slsd-prototypes-v1")
    save_safetensors_atomic(
        {
            "prototypes": prototypes.to(torch.float32),
            "counts": counts.reshape(-1).to(torch.int64),
            "similarity": similarity.to(torch.float32),
            "category_ids": ids,
        },
        path,
        metadata=meta,
    )


def load_prototypes(path: str | Path, annotations: Any = None) -> dict[str, Any]:
    """Read and check a prototypes file. Returns `prototypes`, `counts`, `similarity` (tensors),
    `category_ids` (list[int]) and `metadata` (dict of str).

    With `annotations` (an `Annotations`), the file's categories must be exactly the annotations'
    categories (else InputError); the tensors come back in the annotations' contiguous order.
    """
    tensors, metadata = load_safetensors(path)
    for name in PROTOTYPE_TENSORS:
        if name not in tensors:
            raise InputError(f"missing tensor '{name}' (not an slsd prototypes file?)", path=path)
    protos, counts, sim, ids = (tensors[n] for n in PROTOTYPE_TENSORS)
    if ids.ndim != 1 or ids.dtype.is_floating_point:
        raise InputError(f"category_ids must be an integer vector, got {ids.dtype} {tuple(ids.shape)}", path=path)
    c = ids.numel()
    if protos.ndim != 2 or protos.shape[0] != c:
        raise InputError(f"prototypes shape {tuple(protos.shape)} does not match {c} category ids", path=path)
    if counts.reshape(-1).numel() != c or tuple(sim.shape) != (c, c):
        raise InputError(f"counts {tuple(counts.shape)} / similarity {tuple(sim.shape)} do not match "
                         f"{c} category ids", path=path)
    if not (torch.isfinite(protos).all() and torch.isfinite(sim).all()):
        raise InputError("non-finite values in prototypes or similarity", path=path)
    if bool((counts < 0).any()):
        raise InputError("negative instance counts", path=path)
    id_list = [int(v) for v in ids.tolist()]
    if len(set(id_list)) != c:
        raise InputError("duplicate category ids", path=path)
    counts = counts.reshape(-1).to(torch.int64)
    if annotations is not None:
        expected = list(annotations.category_ids)
        if id_list != expected:
            if set(id_list) != set(expected):
                only_file = sorted(set(id_list) - set(expected))
                only_ann = sorted(set(expected) - set(id_list))
                raise InputError(
                    f"categories disagree with {annotations.path}: {len(only_file)} id(s) only in the prototypes "
                    f"file {only_file[:5]}, {len(only_ann)} only in the annotations {only_ann[:5]}", path=path)
            order = torch.tensor([id_list.index(i) for i in expected])
            protos, counts, sim = protos[order], counts[order], sim[order][:, order]
            id_list = expected
    return {"prototypes": protos, "counts": counts, "similarity": sim, "category_ids": id_list,
            "metadata": dict(metadata), "path": str(path)}


def target_table(mode: SmoothingMode, num_classes: int, epsilon: float = 0.1, gamma: float = 1.5,
                 prototypes_file: str | Path | None = None, annotations: Any = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """The `[C, C]` table the training engine gathers rows from (`class_targets = table[labels]`).

    mode "none": one-hot; "uniform": uniform smoothing; "similarity": Eq. 2-3 from a prototypes file
    (its counts are the `N_j`; `temperature` is Eq. 2's tau). With `annotations`, the file's categories must match them.
    """
    if mode == "none":
        return onehot_targets(num_classes)
    if mode == "uniform":
        return uniform_targets(num_classes, epsilon)
    if mode != "similarity":
        raise InputError(f"label smoothing mode must be one of {', '.join(get_args(SmoothingMode))}, got {mode!r}")
    if prototypes_file is None:
        raise InputError("similarity label smoothing needs a prototypes file (slsd prototypes)")
    loaded = load_prototypes(prototypes_file, annotations)
    if len(loaded["category_ids"]) != num_classes:
        raise InputError(f"the prototypes file has {len(loaded['category_ids'])} classes, the model "
                         f"{num_classes}", path=prototypes_file)
    return similarity_targets(loaded["similarity"], loaded["counts"], epsilon, gamma, temperature)
