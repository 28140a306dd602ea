"""Rule: linear maps (Linear, 1x1 conv) transfer W·M and absorb same-shaped maps only."""

import numpy as np
import pytest
from repfold.patterns.linear import Dense

from repfold._affine import Affine, Channels, NotAffine, collapse_groups, expand_groups

rng = np.random.default_rng(0)


def test_transfer_composes_weights_and_biases():
    W, b = rng.standard_normal((5, 3)), rng.standard_normal(5)
    M, c = rng.standard_normal((3, 4)), rng.standard_normal(3)
    v = Affine("x", (0, 1, 2), M, c)
    out = Dense(W, b, axis=2, rank=3).transfer([v], Channels())
    np.testing.assert_allclose(out.M, W @ M)
    np.testing.assert_allclose(out.c, W @ c + b)


def test_transfer_on_another_axis_is_not_affine():
    ch = Channels({"x": 2})
    with pytest.raises(NotAffine, match="not the region's channel axis"):
        Dense(np.eye(3), None, axis=1, rank=3).transfer([Affine.of_source("x", 3)], ch)


def test_absorb_needs_the_layer_shape():
    ch = Channels({"x": 2})
    v = Affine("x", (0, 1, 2), rng.standard_normal((4, 4)), 0.0)
    with pytest.raises(NotAffine, match="needs a 6x4 map"):
        Dense(np.ones((6, 4)), np.zeros(6), axis=2, rank=3).absorb(v, ch, 3)


def test_absorb_refuses_to_densify_a_grouped_conv():
    ch = Channels({"x": 1})
    dense = Affine("x", (0, 1, 2), rng.standard_normal((4, 4)), 0.0)
    with pytest.raises(NotAffine, match="densify"):
        Dense(expand_groups(np.ones((4, 1)), 4), None, axis=1, rank=3, groups=4).absorb(dense, ch, 3)


def test_absorb_refuses_a_constant_without_bias():
    ch = Channels({"x": 2})
    v = Affine("x", (0, 1, 2), np.eye(3), np.ones(3))
    with pytest.raises(NotAffine, match="no bias"):
        Dense(np.eye(3), None, axis=2, rank=3).absorb(v, ch, 3)


def test_absorb_refuses_a_permuted_region():
    ch = Channels({"x": 2})
    v = Affine("x", (1, 0, 2), np.eye(3), 0.0)
    with pytest.raises(NotAffine, match="permutes"):
        Dense(np.eye(3), np.zeros(3), axis=2, rank=3).absorb(v, ch, 3)


def test_groups_round_trip():
    w = rng.standard_normal((6, 2))
    dense = expand_groups(w, 3)
    assert dense.shape == (6, 6) and np.count_nonzero(dense) == 12
    np.testing.assert_array_equal(collapse_groups(dense, 3), w)
    dense[0, 5] = 1.0
    assert collapse_groups(dense, 3) is None
