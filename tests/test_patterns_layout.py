"""Rule: permutes move the channel axis; identities pass values through."""

import pytest
from repfold.patterns.layout import Permute, Same, swap

from repfold._affine import Affine, Channels, NotAffine


def test_transpose_moves_the_channel_axis():
    ch = Channels({"x": 2})
    out = Permute(swap(3, 1, -1)).transfer([Affine.of_source("x", 3)], ch)
    assert out.dims == (0, 2, 1) and ch.channel_position(out) == 1
    back = Permute(swap(3, 1, 2)).transfer([out], ch)
    assert back.is_identity


def test_bad_permutation_is_not_affine():
    with pytest.raises(NotAffine, match="does not fit"):
        Permute((0, 0, 1)).transfer([Affine.of_source("x", 3)], Channels())


def test_same_is_the_identity():
    v = Affine.of_source("x", 2)
    assert Same().transfer([v], Channels()) is v
