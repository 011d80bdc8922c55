"""Similarity label smoothing (Eq. 1-3): properties of the target table, prototypes, the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError
from slsd_cli.labels.smoothing import (PrototypeAccumulator, cosine_similarity, frequency_modulated_similarity,
                                       load_prototypes, onehot_targets, prototypes_from_sums, save_prototypes,
                                       similarity_targets, smoothed_targets, target_table, uniform_targets)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def problems(draw, min_classes=2, max_classes=7, allow_zero=True):
    """Random prototypes (some classes absent when allow_zero) -> (similarity, counts)."""
    c = draw(st.integers(min_classes, max_classes))
    d = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(c, d, generator=gen, dtype=torch.float64)
    low = 0 if allow_zero else 1
    counts = torch.tensor(draw(st.lists(st.integers(low, 5000), min_size=c, max_size=c)), dtype=torch.int64)
    if int(counts.max()) == 0:
        counts[0] = 1
    protos[counts == 0] = 0
    return cosine_similarity(protos), counts


eps_st = st.floats(0.0, 1.0)
gamma_st = st.floats(0.0, 3.0)


@SETTINGS
@given(problems(), eps_st, gamma_st)
def test_rows_sum_to_one_and_absent_columns_get_no_mass(problem, eps, gamma):
    sim, counts = problem
    table = similarity_targets(sim, counts, eps, gamma)
    assert table.dtype == torch.float32
    assert torch.allclose(table.sum(dim=1), torch.ones(len(counts)), atol=1e-6)
    assert bool((table >= 0).all())
    absent = counts == 0
    off_diagonal = table[:, absent] * (1 - torch.eye(len(counts))[:, absent])
    assert bool((off_diagonal == 0).all())
    # a class without a prototype keeps a one-hot row
    assert torch.equal(table[absent], torch.eye(len(counts))[absent])


@SETTINGS
@given(problems(), gamma_st)
def test_epsilon_zero_is_onehot(problem, gamma):
    sim, counts = problem
    assert torch.equal(similarity_targets(sim, counts, 0.0, gamma), onehot_targets(len(counts)))


@SETTINGS
@given(problems(), eps_st)
def test_gamma_zero_is_plain_softmax_of_similarity(problem, eps):
    sim, counts = problem
    present = counts > 0
    table = similarity_targets(sim, counts, eps, 0.0).double()
    soft = torch.softmax(sim[:, present], dim=1)
    expected = (1 - eps) * torch.eye(len(counts), dtype=torch.float64)
    expected[:, present] += eps * soft
    assert torch.allclose(table[present], expected[present], atol=1e-6)


@SETTINGS
@given(problems(allow_zero=False), st.floats(1.0, 3.0))
def test_huge_counts_make_smoothing_uniform_over_those_columns(problem, gamma):
    sim, counts = problem
    huge = torch.zeros(len(counts), dtype=torch.bool)
    huge[::2] = True
    counts = torch.where(huge, torch.full_like(counts, 10**12), counts)
    s_prime = frequency_modulated_similarity(sim, counts, gamma)
    cols = s_prime[:, huge]
    # S_ij / N_j^gamma ~ 0 for the huge columns: equal mass within each row
    assert torch.allclose(cols, cols[:, :1].expand_as(cols), rtol=1e-6, atol=1e-9)
    # every column huge: S' is uniform, 1 / C everywhere
    everywhere = frequency_modulated_similarity(sim, torch.full_like(counts, 10**12), gamma)
    assert torch.allclose(everywhere, torch.full_like(everywhere, 1 / len(counts)), rtol=1e-6, atol=1e-9)


@SETTINGS
@given(st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(1, 20), st.integers(200, 100000), eps_st)
def test_rare_class_gets_more_mass_than_frequent_one_of_equal_similarity(s, gamma, rare, frequent, eps):
    sim = torch.tensor([[1.0, s, s], [s, 1.0, 0.0], [s, 0.0, 1.0]], dtype=torch.float64)
    counts = torch.tensor([50, rare, frequent])
    table = similarity_targets(sim, counts, max(eps, 0.01), gamma)
    assert table[0, 1] > table[0, 2]


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_cosine_similarity_symmetric_unit_diagonal_scale_invariant(c, d, seed):
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(c, d, generator=gen, dtype=torch.float64)
    protos[0] = 0  # a class without a prototype
    sim = cosine_similarity(protos)
    assert torch.equal(sim, sim.T)
    assert torch.equal(sim.diagonal()[1:], torch.ones(c - 1, dtype=torch.float64))
    assert sim[0].abs().sum() == 0
    assert bool((sim.abs() <= 1).all())
    scaled = cosine_similarity(protos * torch.rand(c, 1, generator=gen, dtype=torch.float64).add(0.1) * 100)
    assert torch.allclose(scaled, sim, atol=1e-12)


def test_uniform_and_onehot_tables():
    table = uniform_targets(5, 0.1)
    assert torch.allclose(table.sum(1), torch.ones(5))
    assert torch.allclose(table.diagonal(), torch.full((5,), 0.9 + 0.02))
    assert torch.allclose(table[0, 1:], torch.full((4,), 0.02))
    assert torch.equal(onehot_targets(3), torch.eye(3))
    with pytest.raises(InputError):
        uniform_targets(3, 1.5)


def test_eq2_by_hand():
    sim = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    counts = torch.tensor([4, 1])
    gamma, eps = 1.5, 0.1
    logits = torch.tensor([1.0 / 4**1.5, 0.5 / 1.0], dtype=torch.float64)
    row0 = torch.softmax(logits, 0)
    table = similarity_targets(sim, counts, eps, gamma)
    assert torch.allclose(table[0].double(), torch.tensor([0.9, 0.0], dtype=torch.float64) + eps * row0, atol=1e-7)


def test_eq3_rows_mix_onehot_and_s_prime_and_absent_classes_stay_onehot():
    s_prime = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # class 2: N = 0
    table = smoothed_targets(s_prime, 0.25)
    expected = torch.tensor([[0.75 + 0.15, 0.10, 0.0], [0.075, 0.75 + 0.175, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(table, expected)
    assert table.dtype == torch.float32
    # the y~ of Eq. 3 for a one-hot y is its row: (1 - eps) y + eps S' y, with S'y read as row c of S'
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(table[1].double(), 0.75 * y + 0.25 * (y @ s_prime), atol=1e-7, rtol=0)


def test_eq1_prototype_is_the_class_mean():
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0], [3.0, -3.0]])
    counts = torch.tensor([2, 0, 3])
    protos = prototypes_from_sums(sums, counts)
    assert protos.dtype == torch.float64
    torch.testing.assert_close(protos, torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, -1.0]], dtype=torch.float64))


def test_accumulator_sums_in_pieces_and_means():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(20, 3, generator=gen)
    labels = torch.randint(0, 3, (20,), generator=gen)
    labels[labels == 2] = 1  # class 2 and 3 have no instances
    whole = PrototypeAccumulator(4, 3)
    whole.add(emb, labels)
    parts = PrototypeAccumulator(4, 3)
    for chunk in range(0, 20, 7):
        parts.add(emb[chunk:chunk + 7], labels[chunk:chunk + 7])
    assert torch.equal(parts.counts, whole.counts)
    assert torch.allclose(parts.sums, whole.sums)
    protos = whole.prototypes()
    for c in range(4):
        members = emb[labels == c].double()
        expected = members.mean(0) if len(members) else torch.zeros(3, dtype=torch.float64)
        assert torch.allclose(protos[c], expected)
    assert whole.counts.tolist()[2:] == [0, 0]
    with pytest.raises(ValueError):
        whole.add(emb[:2], torch.tensor([0, 4]))


def _write_annotations(path, category_ids):
    data = {"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.png"}],
            "annotations": [],
            "categories": [{"id": i, "name": f"c{i}"} for i in category_ids]}
    path.write_text(json.dumps(data))
    return load_annotations(path)


def test_prototype_file_round_trip_and_category_check(tmp_path):
    ann = _write_annotations(tmp_path / "a.json", [3, 7, 9])
    protos = torch.randn(3, 4, dtype=torch.float64)
    counts = torch.tensor([2, 0, 5])
    protos[1] = 0
    sim = cosine_similarity(protos)
    path = tmp_path / "p.safetensors"
    save_prototypes(path, protos, counts, sim, [3, 7, 9], {"backbone": "x", "image_size": 64})
    loaded = load_prototypes(path, ann)
    assert loaded["category_ids"] == [3, 7, 9]
    assert torch.equal(loaded["counts"], counts)
    assert torch.allclose(loaded["prototypes"].double(), protos, atol=1e-6)
    assert loaded["metadata"]["backbone"] == "x" and json.loads(loaded["metadata"]["image_size"]) == 64

    # same categories stored in another order come back in the annotations' order
    order = [2, 0, 1]
    save_prototypes(tmp_path / "q.safetensors", protos[order], counts[order], sim[order][:, order], [9, 3, 7])
    again = load_prototypes(tmp_path / "q.safetensors", ann)
    assert torch.equal(again["counts"], counts)
    assert torch.allclose(again["similarity"], loaded["similarity"])

    other = _write_annotations(tmp_path / "b.json", [3, 7, 10])
    with pytest.raises(InputError, match="categories disagree"):
        load_prototypes(path, other)
    with pytest.raises(InputError, match="prototypes file has 3 classes"):
        target_table("similarity", 4, 0.1, 1.5, path)

    table = target_table("similarity", 3, 0.1, 1.5, path, ann)
    assert torch.allclose(table.double(), _reference_table(protos.numpy(), counts.numpy(), 0.1, 1.5), atol=1e-6)
    assert torch.equal(target_table("none", 3), torch.eye(3))
    assert torch.allclose(target_table("uniform", 3, 0.3), torch.full((3, 3), 0.1) + 0.7 * torch.eye(3))
    with pytest.raises(InputError):
        target_table("similarity", 3)
    with pytest.raises(InputError):
        target_table("bogus", 3)  # type: ignore[arg-type]


def test_load_rejects_foreign_safetensors(tmp_path):
    from slsd_cli.io import save_safetensors_atomic

    save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="missing tensor"):
        load_prototypes(tmp_path / "x.safetensors")
    save_safetensors_atomic({"prototypes": torch.zeros(2, 3), "counts": torch.zeros(2, dtype=torch.int64),
                             "similarity": torch.zeros(3, 3), "category_ids": torch.tensor([1, 2])},
                            tmp_path / "y.safetensors")
    with pytest.raises(InputError, match="do not match"):
        load_prototypes(tmp_path / "y.safetensors")
    (tmp_path / "z.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError):
        load_prototypes(tmp_path / "z.safetensors")


def _reference_table(protos: np.ndarray, counts: np.ndarray, eps: float, gamma: float) -> torch.Tensor:
    """Eq. 1-3 written out in numpy, class by class (classes without instances keep one-hot rows)."""
    c = len(counts)
    unit = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-300)
    sim = unit @ unit.T
    expected = np.eye(c)
    for i in range(c):
        if counts[i] == 0:
            continue
        logits = np.array([sim[i, j] / counts[j] ** gamma if counts[j] else -np.inf for j in range(c)])
        row = np.exp(logits - logits[np.isfinite(logits)].max())
        expected[i] = (1 - eps) * np.eye(c)[i] + eps * row / row.sum()
    return torch.from_numpy(expected)


def test_table_against_numpy_reference():
    rng = np.random.default_rng(1)
    protos = rng.normal(size=(6, 5))
    counts = np.array([3, 0, 100, 1, 7, 40])
    protos[1] = 0
    eps, gamma = 0.1, 1.5
    table = similarity_targets(cosine_similarity(torch.from_numpy(protos)), torch.from_numpy(counts), eps, gamma)
    assert np.allclose(table.numpy(), _reference_table(protos, counts, eps, gamma).numpy(), atol=1e-6)
