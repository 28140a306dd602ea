"""The factored map arithmetic against dense NumPy: every operation a rule may apply to a LowRank map."""

from __future__ import annotations

import numpy as np
import pytest

from repfold.core.affine import LowRank, NotAffine, Product, add, matmul, scale

rng = np.random.default_rng(0)


def factored(n: int = 40, r: int = 3, d=1.0) -> LowRank:
    return LowRank(d, rng.standard_normal((n, r)), rng.standard_normal((r, n)))


def dense(M) -> np.ndarray:
    return np.asarray(M, dtype=np.float64)


@pytest.mark.parametrize("d", [0.0, 1.0, -0.5, "vector"])
def test_factored_map_equals_its_dense_form_under_every_operation(d):
    M = factored(d=rng.standard_normal(40) if d == "vector" else d)
    D = dense(M)
    W = rng.standard_normal((7, 40))
    np.testing.assert_allclose(matmul(W, M), W @ D, rtol=1e-12, atol=1e-12)
    x = rng.standard_normal(40)
    np.testing.assert_allclose(M @ x, D @ x, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(40)
    np.testing.assert_allclose(dense(scale(g, M)), g[:, None] * D, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense(scale(0.3, M)), 0.3 * D, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense(add(M, 2.0)), D + 2.0 * np.eye(40), rtol=1e-12, atol=1e-12)
    other = factored()
    both = add(M, -1.0 * other)
    assert isinstance(both, LowRank) and both.rank == 6
    np.testing.assert_allclose(dense(both), D - dense(other), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense(add(M, D)), 2 * D, rtol=1e-12, atol=1e-12)


def test_a_bottleneck_product_stays_factored_and_a_wide_one_does_not():
    down, up = rng.standard_normal((4, 64)), rng.standard_normal((64, 4))
    M = matmul(up, down)
    assert isinstance(M, LowRank) and M.shape == (64, 64)
    np.testing.assert_allclose(dense(M), up @ down, rtol=1e-12)
    wide = matmul(rng.standard_normal((64, 32)), rng.standard_normal((32, 64)))
    assert isinstance(wide, np.ndarray)


def test_shape_mismatches_are_refused():
    with pytest.raises(NotAffine):
        matmul(rng.standard_normal((5, 39)), factored())
    with pytest.raises(NotAffine):
        add(LowRank(0.0, rng.standard_normal((8, 2)), rng.standard_normal((2, 5))), 1.0)


def test_a_layer_reading_a_factored_map_stays_unevaluated_until_asked():
    F = factored(d=rng.standard_normal(40))
    W = rng.standard_normal((50, 40))
    P = matmul(W, F)
    assert isinstance(P, Product) and P.shape == (50, 40)
    g = rng.standard_normal(50)
    Q = scale(0.5, scale(g, P))  # GELU's division and friends: still lazy
    assert isinstance(Q, Product)
    want = 0.5 * g[:, None] * (W @ dense(F))
    np.testing.assert_allclose(dense(Q), want, rtol=1e-12, atol=1e-12)
    V, x = rng.standard_normal((6, 50)), rng.standard_normal(40)
    np.testing.assert_allclose(matmul(V, Q), V @ want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q @ x, want @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q @ np.eye(40), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.einsum("oj,ji->oi", V, Q), V @ want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense(add(Q, want)), 2 * want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(Q, dense(Q))


@pytest.mark.parametrize("g", [1.0, 0.25, "vector"])
def test_a_float32_layer_is_multiplied_in_float64_and_rounded_once(g, monkeypatch):
    """The ONNX path keeps weights in the file's dtype: blocks go to float64, the result is cast once."""
    from repfold.core import affine

    monkeypatch.setattr(affine, "_BLOCK", 40 * 7)  # several blocks of rows, the last one short
    F = factored(d=rng.standard_normal(40))
    W32 = rng.standard_normal((50, 40)).astype(np.float32)
    g = rng.standard_normal(50) if g == "vector" else g
    P = scale(g, matmul(W32, F))
    assert isinstance(P, Product) and P.W is W32
    want = (g[:, None] if isinstance(g, np.ndarray) else g) * (W32.astype(np.float64) @ dense(F))
    np.testing.assert_allclose(dense(P), want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(affine.cast(P, np.float32), dense(P).astype(np.float32))  # the one rounding
    assert np.array_equal(affine.cast(P, np.float32, transpose=True), dense(P).T.astype(np.float32))
    stored = np.ascontiguousarray(W32.T)  # a MatMul weight: the layer's W is a transposed view of it
    Q = scale(g, matmul(stored.T, F))
    np.testing.assert_allclose(affine.cast(Q, np.float64, transpose=True), want.T, rtol=1e-12, atol=1e-12)
    wide = scale(g, Product(stored.T, LowRank(0.0, rng.standard_normal((40, 2)), rng.standard_normal((2, 24)))))
    np.testing.assert_allclose(affine.cast(wide, np.float64, transpose=True), dense(wide).T, rtol=1e-12, atol=1e-12)
    x = rng.standard_normal(40)
    np.testing.assert_allclose(P @ x, want @ x, rtol=1e-12, atol=1e-12)
    V = rng.standard_normal((6, 50))
    np.testing.assert_allclose(V @ P, V @ want, rtol=1e-12, atol=1e-12)
    for view in (W32, np.asfortranarray(W32)):  # as stored, and a transposed view of a MatMul weight
        np.testing.assert_allclose(affine.matvec(view, 0.5), W32.astype(np.float64).sum(axis=1) * 0.5, rtol=1e-12)
        np.testing.assert_allclose(affine.matvec(view, x), W32.astype(np.float64) @ x, rtol=1e-12)
