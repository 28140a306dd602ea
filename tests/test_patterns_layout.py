"""Rule: layout ops move positions and the channel axis, and are recognised when they cancel."""

import numpy as np
import pytest
from repfold.patterns.layout import Concat, Permute, Reshape, Roll, Same, Slice, swap

from repfold._affine import Affine, Channels, NotAffine

SHAPE = (2, 8, 8, 4)  # a channels-last feature map: batch, height, width, channels


def source(axis: int | None = None) -> tuple[Affine, Channels]:
    ch = Channels()
    v = ch.source("x", SHAPE)
    if axis is not None:
        ch.axis["x"] = axis
    return v, ch


def test_transpose_moves_the_channel_axis_and_cancels():
    x, ch = source(3)
    out = Permute(swap(4, 1, -1)).transfer([x], ch)
    assert ch.channel_position(out) == 1 and not out.is_identity
    assert Permute(swap(4, 1, 3)).transfer([out], ch).is_identity


def test_channel_axis_binds_through_a_transpose():
    x, ch = source()  # unbound: the first channel op decides
    out = Permute(swap(4, 1, 3)).transfer([x], ch)
    ch.require(out, 1, "a conv")
    assert ch.axis["x"] == 3


def window_partition(v, ch, ws=4):
    """Swin's window partition: view, permute, view, as layout ops."""
    B, H, W, C = v.shape
    v = Reshape((B, H // ws, ws, W // ws, ws, C)).transfer([v], ch)
    v = Permute((0, 1, 3, 2, 4, 5)).transfer([v], ch)
    return Reshape((B * (H // ws) * (W // ws), ws * ws, C)).transfer([v], ch)


def test_window_partition_keeps_the_channel_axis_whole():
    x, ch = source(3)
    w = window_partition(Roll((-2, -2), (1, 2)).transfer([x], ch), ch)
    assert w.shape == (8, 16, 4) and ch.channel_position(w) == 2 and w.pos is not None
    back = Reshape(SHAPE).transfer([w], ch)
    assert back.pos is not None  # same shape, positions moved: not the identity


def test_reshape_that_splits_channels_is_not_affine():
    x, ch = source(3)
    with pytest.raises(NotAffine, match="splits or merges the channel axis"):
        Reshape((2, 8, 8, 2, 2)).transfer([x], ch)


def test_roll_along_channels_is_not_affine():
    x, ch = source(3)
    with pytest.raises(NotAffine, match="rolls along the channel axis"):
        Roll((1,), (3,)).transfer([x], ch)


def test_slice_of_positions_and_concat_back_is_the_identity():
    x, ch = source(3)
    top = Slice((slice(None), slice(0, 3))).transfer([x], ch)
    rest = Slice((slice(None), slice(3, None))).transfer([x], ch)
    assert Concat(1).transfer([top, rest], ch).is_identity
    with pytest.raises(NotAffine, match="slices the channel axis"):
        Slice((slice(None), slice(None), slice(None), slice(0, 2))).transfer([x], ch)


def test_concat_of_different_maps_is_not_affine():
    x, ch = source(3)
    y = x.with_map(2.0, 0.0)
    with pytest.raises(NotAffine, match="different channel maps"):
        Concat(1).transfer([x, y], ch)


def test_bad_permutation_is_not_affine():
    x, ch = source()
    with pytest.raises(NotAffine, match="does not fit"):
        Permute((0, 0, 1, 2)).transfer([x], ch)


def test_same_is_the_identity():
    x, ch = source()
    assert Same().transfer([x], ch) is x


def test_layouts_compare_by_positions():
    x, ch = source(3)
    a = Permute((0, 2, 1, 3)).transfer([x], ch)
    b = Reshape(SHAPE).transfer([Permute((0, 2, 1, 3)).transfer([x], ch)], ch)
    assert ch.same_layout(a, b) and not ch.same_layout(a, x)
    assert np.array_equal(a.pos, b.pos)
