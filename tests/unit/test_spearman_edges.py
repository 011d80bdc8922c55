"""Edges of the similarity check's rank correlation (`labels.similarity_check`): a constant vector
has no rank correlation (NaN, not an error), and two similarity matrices of different shapes are
refused whatever their own shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slsd_cli.labels.similarity_check import similarity_spearman, spearman


def test_constant_or_too_short_input_has_no_correlation():
    assert math.isnan(spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert math.isnan(spearman([1.0], [2.0]))
    assert spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)  # by hand: 1 - 6 * 2 / 24


def test_similarities_of_different_shapes_are_refused():
    square3, square4 = np.eye(3), np.eye(4)
    for a, b in ((square3, square4), (square3, np.eye(3)[:, :2]), (np.eye(3)[:2], np.eye(3)[:2])):
        with pytest.raises(ValueError, match=r"need two \[C, C\] matrices"):
            similarity_spearman(a, b)
    # the pairs i < j of present classes: (0, 1), (0, 2), (1, 2)
    s = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    r = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.3], [0.2, 0.3, 1.0]])
    assert similarity_spearman(s, r) == pytest.approx(1.0)
    assert math.isnan(similarity_spearman(s, r, counts=np.array([1, 1, 0])))  # one pair left
