"""Rule: linear maps (Linear, 1x1 conv) transfer W·M and absorb same-shaped maps only."""

import numpy as np
import pytest
from repfold.patterns.linear import Dense

from repfold.core.affine import Affine, Channels, NotAffine, collapse_groups, expand_groups

rng = np.random.default_rng(0)


def bound(shape, axis: int) -> Channels:
    ch = Channels()
    ch.source("x", shape)
    ch.axis["x"] = axis
    return ch


def test_transfer_composes_weights_and_biases():
    W, b = rng.standard_normal((5, 3)), rng.standard_normal(5)
    M, c = rng.standard_normal((3, 4)), rng.standard_normal(3)
    v = Affine("x", (2, 6, 3), M, c)
    out = Dense(W, b, axis=2).transfer([v], bound((2, 6, 4), 2))
    np.testing.assert_allclose(out.M, W @ M)
    np.testing.assert_allclose(out.c, W @ c + b)


def test_transfer_on_another_axis_is_not_affine():
    with pytest.raises(NotAffine, match="not the region's channel axis"):
        Dense(np.eye(3), None, axis=1).transfer([Affine.of_source("x", (2, 3, 3))], bound((2, 3, 3), 2))


def test_absorb_needs_the_layer_shape():
    v = Affine("x", (2, 5, 4), rng.standard_normal((4, 4)), 0.0)
    with pytest.raises(NotAffine, match="needs a 6x4 map"):
        Dense(np.ones((6, 4)), np.zeros(6), axis=2).absorb(v, bound((2, 5, 4), 2))


def test_absorb_refuses_to_densify_a_grouped_conv():
    dense = Affine("x", (2, 4, 5), rng.standard_normal((4, 4)), 0.0)
    with pytest.raises(NotAffine, match="densify a depthwise conv: cost x4"):
        Dense(expand_groups(np.ones((4, 1)), 4), None, axis=1, groups=4).absorb(dense, bound((2, 4, 5), 1))


def test_a_layer_without_bias_takes_one_for_a_constant_but_a_bare_matmul_does_not():
    v = Affine("x", (2, 5, 3), np.eye(3), np.ones(3))
    _, b = Dense(np.eye(3), None, axis=2).absorb(v, bound((2, 5, 3), 2))
    np.testing.assert_array_equal(b, np.ones(3))
    with pytest.raises(NotAffine, match="no bias"):  # (ONNX's MatMul: its bias would be an Add more)
        Dense(np.eye(3), None, axis=2, kind="MatMul", takes_bias=False).absorb(v, bound((2, 5, 3), 2))


def test_groups_round_trip():
    w = rng.standard_normal((6, 2))
    dense = expand_groups(w, 3)
    assert dense.shape == (6, 6) and np.count_nonzero(dense) == 12
    np.testing.assert_array_equal(collapse_groups(dense, 3), w)
    dense[0, 5] = 1.0
    assert collapse_groups(dense, 3) is None
