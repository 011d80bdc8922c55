"""τ in Eq. 2 (S_ij / (τ N_j^γ)), its recipe key and flags, and the two numbers the report prints for
a smoothing setting: total variation to uniform smoothing and the row Spearman of S′."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slsd_cli import recipe as recipes
from slsd_cli.errors import InputError
from slsd_cli.labels.similarity_check import row_spearman, smoothing_vs_uniform
from slsd_cli.labels.smoothing import frequency_modulated_similarity, similarity_targets, uniform_targets


def _similarity(c: int = 6, seed: int = 0) -> torch.Tensor:
    p = torch.from_numpy(np.random.default_rng(seed).normal(size=(c, 8)))
    unit = p / p.norm(dim=1, keepdim=True)
    return (unit @ unit.T).clamp(-1, 1)


def test_temperature_one_is_the_paper_and_scales_the_logits():
    sim, counts = _similarity(), torch.tensor([3, 10, 40, 100, 7, 0])
    assert torch.equal(frequency_modulated_similarity(sim, counts, 1.5), frequency_modulated_similarity(sim, counts, 1.5, 1.0))
    tau, gamma = 0.2, 0.5
    present = counts > 0
    expected = torch.softmax((sim / (tau * counts.clamp(min=1).double() ** gamma)).masked_fill(~present, -torch.inf), 1)
    got = frequency_modulated_similarity(sim, counts, gamma, tau)
    assert torch.allclose(got[present], expected[present]) and torch.all(got[~present] == 0)
    # τ moves mass but never a row's ranking: the rows' orders are the same at every τ
    for t in (0.05, 3.0):
        other = frequency_modulated_similarity(sim, counts, gamma, t)
        for i in torch.nonzero(present).flatten().tolist():
            assert torch.equal(torch.argsort(other[i, present]), torch.argsort(got[i, present]))
    with pytest.raises(InputError, match="temperature"):
        frequency_modulated_similarity(sim, counts, gamma, 0.0)


def test_lower_temperature_moves_targets_away_from_uniform():
    sim, counts = _similarity(), torch.tensor([30, 10, 40, 100, 70, 50])
    uniform = uniform_targets(6, 0.2)
    tv = [smoothing_vs_uniform(similarity_targets(sim, counts, 0.2, 0.0, t), uniform) for t in (10.0, 1.0, 0.1, 0.01)]
    assert tv == sorted(tv) and tv[0] < 0.02 and tv[-1] > 0.1
    assert tv[-1] <= 0.2 * (1 - 1 / 6) + 1e-6  # at most ε's share moved
    assert smoothing_vs_uniform(uniform, uniform) == 0.0


def test_row_spearman_sees_whether_rows_follow_the_truth():
    truth = _similarity(7, seed=1).numpy()
    counts = np.array([5, 5, 5, 5, 5, 5, 0])
    assert row_spearman(truth, truth, counts) == pytest.approx(1.0)
    assert row_spearman(-truth, truth, counts) == pytest.approx(-1.0)
    # a column boost by frequency (γ > 0 with unequal N) scrambles the rows' order
    boost = np.exp(truth / np.array([1, 1000, 1, 1000, 1, 1000, 1.0])[None, :])
    assert row_spearman(boost, truth, counts) < 0.9


def test_recipe_key_and_flags():
    assert recipes.load("synthetic_tiny").smoothing.temperature == 1.0
    assert recipes.load("synthetic_tiny", ["smoothing.temperature=0.05"]).smoothing.temperature == 0.05
    with pytest.raises(InputError, match="smoothing.temperature must lie in"):
        recipes.load("synthetic_tiny", ["smoothing.temperature=0"])
    distill = recipes.load("synthetic_tiny_distill")
    assert distill.smoothing.mode is None  # the teacher run's smoothing
    assert recipes.load("lvis_eva02_L_distill").smoothing.mode == "similarity"
