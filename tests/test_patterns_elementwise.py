"""Rule: per-channel constants and sums of region values."""

import numpy as np
import pytest
from repfold.patterns.elementwise import ChannelAffine, Sum

from repfold.core.affine import Affine, Channels, NotAffine

rng = np.random.default_rng(1)
SHAPE = (2, 7, 4)


def bound(axis: int = 2) -> Channels:
    """Channels that know source ``x`` of shape SHAPE and its channel axis."""
    ch = Channels()
    ch.source("x", SHAPE)
    ch.axis["x"] = axis
    return ch


def test_per_channel_scale_and_shift_on_the_channel_axis():
    g, b = rng.standard_normal(4), rng.standard_normal(4)
    M, c = rng.standard_normal((4, 4)), rng.standard_normal(4)
    out = ChannelAffine(g.reshape(1, 1, 4), b).transfer([Affine("x", SHAPE, M, c)], bound())
    np.testing.assert_allclose(out.M, np.diag(g) @ M)
    np.testing.assert_allclose(out.c, g * c + b)


def test_scalar_scale_keeps_width_free():
    out = ChannelAffine(0.5).transfer([Affine.of_source("x", SHAPE)], bound())
    assert out.M == 0.5 and out.c == 0.0


def test_constant_along_tokens_ends_the_region():
    with pytest.raises(NotAffine, match="not the region's channel axis"):
        ChannelAffine(beta=np.ones((1, 7, 1))).transfer([Affine.of_source("x", SHAPE)], bound())


def test_constant_along_two_axes_ends_the_region():
    with pytest.raises(NotAffine, match="2 axes"):
        ChannelAffine(np.ones((7, 4))).transfer([Affine.of_source("x", SHAPE)], bound())


def test_residual_sum_adds_the_identity():
    M = rng.standard_normal((4, 4))
    out = Sum(1.0).transfer([Affine.of_source("x", SHAPE), Affine("x", SHAPE, M, 1.0)], bound())
    np.testing.assert_allclose(out.M, np.eye(4) + M)
    assert out.c == 1.0


def test_sum_of_two_sources_ends_the_region():
    with pytest.raises(NotAffine, match="different sources"):
        Sum().transfer([Affine.of_source("x", SHAPE), Affine.of_source("y", SHAPE)], bound())
