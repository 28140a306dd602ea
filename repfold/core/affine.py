"""Channel-affine maps: the algebra every fold rule is written in.

A value ``v`` inside an adapter region is tracked as an affine map of one
*source* value ``x`` along the channel axis, the same at every other position::

    v = M·x + c        M: (C_v × C_x),  c: (C_v,)

plus a *layout*: which position of ``x`` each position of ``v`` comes from.
Layout ops (permute, reshape, roll, window partition, ...) only move
positions, so they commute with the channel maps as long as the channel axis
stays whole; a fold then replays them on the source.

The layout is kept as an integer array ``pos`` of source indices, computed by
applying each layout op to it, so any composition of layout ops is followed
exactly and recognised when it cancels out. Two forms:

* before the region's channel axis is known, ``pos`` has ``v``'s shape and
  holds flat indices into the whole source;
* once it is known (``cax`` set), ``pos`` has size 1 along ``v``'s channel axis
  ``cax`` and holds the flat source index of channel 0 at each position, so
  layers that change the width leave it untouched.

``pos is None`` means "laid out exactly like the source". Everything here is
NumPy in float64 and knows nothing of torch.fx or ONNX.

To stay free of the channel width until an op reveals it, ``M`` may be a
Python float ``s`` standing for ``s·I`` and ``c`` a float standing for the same
constant on every channel. A fresh source is ``(1.0, 0.0)``. An adapter's map
stays factored as :class:`LowRank` (``diag(d) + U·V`` through its bottleneck),
so the layer that absorbs it costs ``out·in·r`` flops rather than ``out·in·C``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np


class NotAffine(Exception):
    """Raised by a transfer rule: the op's output is not affine in the region's source."""


class KernelBlocked(NotAffine):
    """A k×k conv's kernel map meets an op that moves positions: the conv must start a region, not carry one."""


class Relaid(NotAffine):
    """An op that needs its input laid out as the region's source reads it moved (a conv after a token
    reshape): the moved value may start a region of its own instead."""


@dataclass(frozen=True, eq=False)
class Affine:
    """``v = M·x + c`` along the channel axis of ``source``; ``v`` has ``shape`` and layout ``pos``."""

    source: str
    shape: tuple[int, ...]
    M: np.ndarray | float = 1.0
    c: np.ndarray | float = 0.0
    pos: np.ndarray | None = None
    cax: int | None = None

    @classmethod
    def of_source(cls, name: str, shape: tuple[int, ...]) -> Affine:
        return cls(name, tuple(shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_identity(self) -> bool:
        """True when ``v`` is exactly ``x``: same values, same layout."""
        return (
            isinstance(self.M, float)
            and self.M == 1.0
            and isinstance(self.c, float)
            and self.c == 0.0
            and self.pos is None
        )

    def with_map(self, M: np.ndarray | float, c: np.ndarray | float, width: int | None = None) -> Affine:
        """The same layout with a new map; ``width`` resizes the channel axis (a layer's output)."""
        shape = self.shape
        if width is not None:
            shape = tuple(width if i == self.cax else n for i, n in enumerate(shape))
        return replace(self, shape=shape, M=M, c=c)


@dataclass
class Channels:
    """Each source's shape, and its channel axis once the first op acting on channels binds it."""

    axis: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # set while a region of the model's own scales and shifts is settled: a layer that takes a bias only with
    # an op more (ONNX's bare MatMul, an Add) may take one there, the planner keeping the region only where
    # that bias replaces a per-channel shift of the model's own (LeViT's BatchNorm1d after a bias-less Linear)
    shift_adds: bool = False
    # sources that are token ids read as one-hot vectors (an embedding's lookup: see patterns.embedding), each
    # with its vocabulary size: the channel axis is one the graph never holds, so only a lookup takes the region
    tokens: dict[str, int] = field(default_factory=dict)
    mixed_ids: int = 2  # the next id (negated) for a position that mixes source positions (see ``mixed``)

    def source(self, name: str, shape) -> Affine:
        self.shapes[name] = tuple(shape)
        return Affine.of_source(name, shape)

    def require(self, v: Affine, at: int, what: str) -> Affine:
        """``v`` in channel form, checking that its axis ``at`` is the channel axis (binding it if free)."""
        if not -v.rank <= at < v.rank:
            raise NotAffine(f"{what} acts on axis {at} of a rank-{v.rank} value")
        at %= v.rank
        if v.source not in self.axis:
            self.axis[v.source] = at if v.pos is None else self._find_axis(v, at, what)
        v = self.channel_form(v)
        if v.cax != at:
            raise NotAffine(f"{what} acts on axis {at}, which is not the region's channel axis")
        return v

    def _find_axis(self, v: Affine, at: int, what: str) -> int:
        src = self.shapes[v.source]
        for k, n in enumerate(src):
            if n == v.shape[at] and _channel_fiber(v.pos, at, _stride(src, k), n) is not None:
                return k
        raise NotAffine(f"{what} acts on axis {at}, which is not a whole axis of the region's source")

    def channel_form(self, v: Affine) -> Affine:
        """``v`` with its layout in channel form (needs the source's channel axis bound)."""
        k = self.axis[v.source]
        if v.pos is None:
            return v if v.cax == k else replace(v, cax=k)
        if v.cax is not None:
            return v
        src = self.shapes[v.source]
        for a, n in enumerate(v.shape):
            if n == src[k]:
                first = _channel_fiber(v.pos, a, _stride(src, k), n)
                if first is not None:
                    return self._canonical(replace(v, pos=first, cax=a))
        raise NotAffine("the layout splits or reorders the region's channel axis")

    def channel_position(self, v: Affine) -> int | None:
        """The axis of ``v`` that carries the channels, or None while unbound."""
        if v.source not in self.axis:
            return None
        return self.channel_form(v).cax

    def relayout(
        self,
        v: Affine,
        shape: tuple[int, ...],
        full: Callable[[np.ndarray], np.ndarray],
        reduced: Callable[[np.ndarray, int], tuple[np.ndarray, int]],
    ) -> Affine:
        """``v`` moved by a layout op: ``full(pos)`` before the channel axis is known, else ``reduced(pos, cax)``."""
        shape = tuple(int(n) for n in shape)
        if isinstance(v.M, Kernel):
            raise KernelBlocked("moves the positions of a k×k conv's output")
        if v.source not in self.axis:
            pos = full(self._full(v))
            if tuple(pos.shape) != shape:
                raise NotAffine("the layout op does not give the shape the graph says")
            return self._canonical(replace(v, shape=shape, pos=pos, cax=None))
        v = self.channel_form(v)
        pos = v.pos if v.pos is not None else self._identity_reduced(v.source)
        pos, cax = reduced(pos, v.cax)
        if pos.shape[cax] != 1 or tuple(n for i, n in enumerate(shape) if i != cax) != tuple(
            n for i, n in enumerate(pos.shape) if i != cax
        ):
            raise NotAffine("the layout op does not give the shape the graph says")
        return self._canonical(replace(v, shape=shape, pos=pos, cax=cax))

    def mixed(self, v: Affine, shape: tuple[int, ...], what: str) -> Affine:
        """``v`` after an op that mixes positions the same way on every channel (an average pool, which
        commutes with every channel map): each new position holds no single position of the source, so it
        gets an id of its own (negative, below a zero pad's -1), equal to no other layout's. A fold replays
        the op on the source like a layout op."""
        if v.source not in self.axis:
            raise NotAffine(f"{what} before the region's channel axis is known")
        v = self.channel_form(v)

        def reduced(pos: np.ndarray, cax: int) -> tuple[np.ndarray, int]:
            dims = tuple(1 if i == cax else n for i, n in enumerate(shape))
            ids = -(self.mixed_ids + np.arange(math.prod(dims), dtype=np.int64))
            self.mixed_ids += ids.size
            return ids.reshape(dims), cax

        return self.relayout(v, shape, lambda pos: pos, reduced)

    def same_layout(self, a: Affine, b: Affine) -> bool:
        """Whether ``a`` and ``b`` hold the same source positions at every position (widths may differ)."""
        if a.source != b.source:
            return False
        if a.source in self.axis:
            a, b = self.channel_form(a), self.channel_form(b)
        if a.pos is None or b.pos is None:
            return a.pos is None and b.pos is None
        return a.cax == b.cax and a.pos.shape == b.pos.shape and np.array_equal(a.pos, b.pos)

    def _full(self, v: Affine) -> np.ndarray:
        if v.pos is not None:
            return v.pos
        return _positions(self.shapes[v.source])

    def _identity_reduced(self, source: str) -> np.ndarray:
        """The source's own positions at channel 0 (built from the strides, never the whole arange)."""
        src, k = self.shapes[source], self.axis[source]
        out = np.zeros([1] * len(src), dtype=np.int64)
        for i, n in enumerate(src):
            if i != k and n > 1:
                out = out + (np.arange(n, dtype=np.int64) * _stride(src, i)).reshape([-1 if j == i else 1
                                                                                     for j in range(len(src))])
        return out

    def _canonical(self, v: Affine) -> Affine:
        """Write a layout that equals the source's as ``pos=None``."""
        if v.pos is None:
            return v
        if v.cax is None:
            src = self.shapes[v.source]
            same = v.shape == src and np.array_equal(v.pos, _positions(src))
            return replace(v, pos=None) if same else v
        k = self.axis[v.source]
        ident = self._identity_reduced(v.source)
        if v.cax == k and v.pos.shape == ident.shape and np.array_equal(v.pos, ident):
            return replace(v, pos=None)
        return v


_COUNT = np.arange(0, dtype=np.int64)  # 0, 1, 2, ...: shared, read-only, grown as needed


def _positions(shape: tuple[int, ...]) -> np.ndarray:
    """``arange(prod(shape)).reshape(shape)`` as a read-only view of one array shared by every layout (a
    transpose or reshape of it is a view too): a giant model's activations are not held once per op."""
    global _COUNT
    n, count = math.prod(shape), _COUNT  # (one read of the global: another thread may replace it)
    if count.size < n:
        count = np.arange(max(n, 2 * count.size), dtype=np.int64)
        count.flags.writeable = False
        _COUNT = count
    return count[:n].reshape(shape)


def _stride(shape: tuple[int, ...], k: int) -> int:
    return math.prod(shape[k + 1 :])


def _channel_fiber(pos: np.ndarray, a: int, stride: int, n: int) -> np.ndarray | None:
    """``pos`` at index 0 of axis ``a`` if moving along ``a`` walks a whole source axis of stride ``stride``."""
    at = [slice(None)] * pos.ndim
    at[a] = slice(0, 1)
    first = pos[tuple(at)]  # a view: ``pos`` is often a transposed view of a large array
    if np.any((first // stride) % n):
        return None
    if n > 1:  # every step along ``a`` is one ``stride``: checked between neighbours, without a full-size sum
        nxt = list(at)
        at[a], nxt[a] = slice(0, n - 1), slice(1, n)
        if not (np.subtract(pos[tuple(nxt)], pos[tuple(at)]) == stride).all():
            return None
    return first.copy()


# --- arithmetic on (M, c) -------------------------------------------------------------


class LowRank:
    """The map ``diag(d) + U·V`` kept factored; ``d`` is a float (times I) or a vector.

    Arrays here are shared, never written to. NumPy sees it as a dense array
    (``np.asarray``) where a rule needs one; ``W @ M`` and ``M @ x`` use the
    factors.
    """

    __array_ufunc__ = None  # ndarray @ / * LowRank: NumPy defers to the methods below

    def __init__(self, d: np.ndarray | float, U: np.ndarray, V: np.ndarray) -> None:
        self.d, self.U, self.V = d, U, V
        self.shape = (U.shape[0], V.shape[1])
        self.ndim = 2

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.U @ self.V
        if np.any(self.d):
            out[np.diag_indices(out.shape[0])] += self.d
        return out if dtype is None else out.astype(dtype)

    def __rmatmul__(self, W: np.ndarray) -> np.ndarray:
        """``W·M`` in ``out·n·r + out·r·m`` flops (float64, whatever ``W``'s dtype)."""
        W = np.asarray(W, dtype=np.float64)
        out = (W @ self.U) @ self.V  # a fresh array: the diagonal part is added in place
        if isinstance(self.d, float):
            if self.d == 1.0:
                out += W
            elif self.d != 0.0:
                out += W * self.d
            return out
        out += W * self.d[None, :]
        return out

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        return _rows(self.d, x) + self.U @ (self.V @ x)

    def __mul__(self, s: float) -> LowRank:
        if not isinstance(s, float):
            return NotImplemented
        return LowRank(s * self.d, s * self.U, self.V)

    __rmul__ = __mul__


class OnDemand:
    """A weight read from the model each time it is used and never kept.

    A fold reads each absorbing layer twice (planning, then writing its new
    weights); holding copies of all of them in between would cost a model's
    worth of memory.
    """

    def __init__(self, shape: tuple[int, ...], fetch: Callable[[], np.ndarray], tensor=None) -> None:
        self.shape, self.fetch = tuple(shape), fetch
        self.tensor = tensor  # where a frontend has it: a callable giving the weight as the framework holds it


def fetch(W: np.ndarray | OnDemand) -> np.ndarray:
    return W.fetch() if isinstance(W, OnDemand) else W


class Product:
    """``diag(g)·W·F`` for a factored ``F``, left unevaluated.

    A layer reading an adapter's map makes one of these; it is evaluated (once)
    only when the fold takes it as new weights, so the elementwise ops after
    the layer (GELU's ``x / sqrt(2)``) cost nothing. ``W`` may be in the
    model's own dtype (float32, say): it is converted to float64 a block of
    rows at a time, so the whole layer is never held in float64, and
    :meth:`evaluate` writes the result straight into the dtype the model
    stores. Never written to.
    """

    __array_ufunc__ = None

    def __init__(self, W: np.ndarray | OnDemand, F: LowRank, g: np.ndarray | float = 1.0) -> None:
        self.W, self.F, self.g = W, F, g
        self.shape = (W.shape[0], F.shape[1])
        self.ndim = 2
        self._dense: np.ndarray | None = None
        self.rounding: float | None = None  # set by a frontend that wrote it out: its cast's largest change

    def evaluate(self, dtype=np.float64, transpose: bool = False) -> np.ndarray:
        """The dense product (or its transpose) in ``dtype``: float64 arithmetic, one rounding at the end."""
        W = fetch(self.W)
        if transpose and W.flags.f_contiguous and not W.flags.c_contiguous:
            return self._evaluate_transposed(W, dtype)
        n, m = self.shape
        out = np.empty((m, n) if transpose else (n, m), dtype=dtype)
        step = max(1, _BLOCK // max(1, W.shape[1]))
        for r in range(0, n, step):
            rows = slice(r, min(n, r + step))
            g = self.g if isinstance(self.g, float) else self.g[rows]
            block = _rows(g, np.asarray(W[rows], dtype=np.float64) @ self.F)
            if transpose:
                out[:, rows] = block.T
            else:
                out[rows] = block
        return out

    def _evaluate_transposed(self, W: np.ndarray, dtype) -> np.ndarray:
        """``(diag(g)·W·F)ᵀ = Fᵀ·S·diag(g)`` for ``W = Sᵀ`` stored row-major (a MatMul weight, ``S`` is (in, out)).

        With ``F = diag(d) + U·V``: row ``p`` of the result is
        ``(d[p]·S[p] + (Vᵀ·(Uᵀ·S))[p])·g``; both passes walk ``S`` in memory order.
        """
        S, F = W.T, self.F
        k, n = S.shape
        step = max(1, _BLOCK // max(1, n))
        blocks = [slice(r, min(k, r + step)) for r in range(0, k, step)]
        UtS = sum(F.U[rows].T @ S[rows].astype(np.float64) for rows in blocks)  # (r, n)
        out = np.empty((F.shape[1], n), dtype=dtype)
        g = self.g if isinstance(self.g, float) else self.g[None, :]
        Vt = F.V.T
        diagonal = not (isinstance(F.d, float) and F.d == 0.0)
        for rows in (blocks if diagonal else [slice(r, min(F.shape[1], r + step)) for r in range(0, F.shape[1], step)]):
            block = Vt[rows] @ UtS
            if diagonal:
                d = F.d if isinstance(F.d, float) else F.d[rows, None]
                block += d * S[rows].astype(np.float64)
            out[rows] = block if isinstance(g, float) and g == 1.0 else block * g
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._dense is None:
            self._dense = self.evaluate()
        return self._dense if dtype is None else self._dense.astype(dtype)

    def __rmatmul__(self, V: np.ndarray) -> np.ndarray:
        return (V @ _rows(self.g, np.asarray(fetch(self.W), dtype=np.float64))) @ self.F

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        return _rows(self.g, fetch(self.W) @ (self.F @ x))

    def __mul__(self, s: float) -> Product:
        if not isinstance(s, float):
            return NotImplemented
        return Product(self.W, self.F, self.g * s)

    __rmul__ = __mul__


_BLOCK = 1 << 18  # elements of a float64 block of rows in Product.evaluate (2 MB: stays in cache)


def cast(M: np.ndarray | Product, dtype, transpose: bool = False) -> np.ndarray:
    """``M`` (or its transpose) as a C-ordered array of ``dtype``, cast once; a Product is evaluated into it."""
    if isinstance(M, Product):
        return M.evaluate(dtype, transpose)
    a = np.asarray(M)
    return (a.T if transpose else a).astype(dtype, order="C", copy=False)


def _rows(g: np.ndarray | float, a: np.ndarray) -> np.ndarray:
    """``diag(g)·a``: row ``i`` of ``a`` (or entry ``i`` of a vector) times ``g[i]``; ``a`` itself when ``g`` is 1."""
    if isinstance(g, float):
        return a if g == 1.0 else a * g
    return a * (g if a.ndim == 1 else g[:, None])


def _factored(W: np.ndarray, M: np.ndarray) -> bool:
    """Whether ``W·M`` is worth keeping as ``U·V``: it passes through a bottleneck."""
    return 4 * W.shape[1] <= min(W.shape[0], M.shape[1])


def matmul(W: np.ndarray, M: np.ndarray | float | LowRank) -> np.ndarray | LowRank:
    """``W·M`` where ``M`` may be a scalar multiple of the identity, factored or a kernel map."""
    if isinstance(M, Kernel):
        return M.after(np.asarray(fetch(W), dtype=np.float64))
    if isinstance(M, float):
        return W if M == 1.0 else W * M  # arrays here are never written to: sharing W is safe
    if W.shape[1] != M.shape[0]:
        raise NotAffine(f"a {W.shape[1]}-channel layer reads a {M.shape[0]}-channel value")
    if isinstance(M, LowRank):
        return Product(W, M)
    if isinstance(M, Product):
        if M.F.rank:
            return W @ M
        M = np.asarray(M)  # a layer's own weight, scaled (a layer reading a source): dense, as it is
    return LowRank(0.0, W, M) if _factored(W, M) else W @ M


def matvec(W: np.ndarray, c: np.ndarray | float) -> np.ndarray:
    """``W·c`` where ``c`` may be a constant broadcast over all channels."""
    if W.dtype == np.float64:
        return W.sum(axis=1) * c if isinstance(c, float) else W @ c
    # A weight in the file's dtype, often a transposed view: converted a block at a time, in memory order.
    c = np.full(W.shape[1], c) if isinstance(c, float) else np.asarray(c, dtype=np.float64)
    if W.flags.f_contiguous and not W.flags.c_contiguous:
        T, out = W.T, np.zeros(W.shape[0])
        step = max(1, _BLOCK // T.shape[1])
        for r in range(0, T.shape[0], step):
            out += c[r : r + step] @ T[r : r + step].astype(np.float64)
        return out
    step = max(1, _BLOCK // W.shape[1])
    return np.concatenate([W[r : r + step].astype(np.float64) @ c for r in range(0, W.shape[0], step)])


def scale(gamma: np.ndarray | float, M: np.ndarray | float) -> np.ndarray | float:
    """``diag(γ)·M`` for a per-channel or scalar γ."""
    if isinstance(gamma, float):
        return M if gamma == 1.0 else gamma * M
    if isinstance(M, Kernel):
        return M.rows(gamma)
    if isinstance(M, float):
        return np.diag(gamma * M)
    if gamma.shape[0] != M.shape[0]:
        raise NotAffine(f"a {gamma.shape[0]}-channel constant meets a {M.shape[0]}-channel value")
    if isinstance(M, LowRank):  # a zero diagonal stays the scalar 0 (the map need not be square)
        d = 0.0 if isinstance(M.d, float) and M.d == 0.0 else gamma * M.d
        return LowRank(d, gamma[:, None] * M.U, M.V)
    if isinstance(M, Product):
        return Product(M.W, M.F, gamma * M.g)
    return gamma[:, None] * M


def add(A: np.ndarray | float, B: np.ndarray | float) -> np.ndarray | float:
    """``A + B`` for maps or offsets, either of which may be a scalar (times I, or broadcast)."""
    if isinstance(A, Kernel) or isinstance(B, Kernel):
        A, B = (X if isinstance(X, Kernel) else Kernel.pointwise(X, A if isinstance(A, Kernel) else B)
                for X in (A, B))
        return A.plus(B)
    if isinstance(A, float) and isinstance(B, float):
        return A + B
    if isinstance(A, float):
        A, B = B, A
    A, B = (np.asarray(X) if isinstance(X, Product) else X for X in (A, B))
    if isinstance(A, LowRank) or isinstance(B, LowRank):
        return _add_factored(A, B)
    if isinstance(B, float):
        if A.ndim == 2:
            if A.shape[0] != A.shape[1]:
                raise NotAffine("adds a value of another width to the source itself")
            return A + B * np.eye(A.shape[0])
        return A + B
    if A.shape != B.shape:
        raise NotAffine(f"adds values of shapes {A.shape} and {B.shape} in channel space")
    return A + B


def _add_factored(A, B):
    if isinstance(B, float) or isinstance(A, float):
        F, s = (A, B) if isinstance(B, float) else (B, A)
        if F.shape[0] != F.shape[1]:
            raise NotAffine("adds a value of another width to the source itself")
        return LowRank(F.d + s, F.U, F.V)
    if A.shape != B.shape:
        raise NotAffine(f"adds values of shapes {A.shape} and {B.shape} in channel space")
    if isinstance(A, LowRank) and isinstance(B, LowRank) and 4 * (A.rank + B.rank) <= min(A.shape):
        return LowRank(A.d + B.d, np.hstack([A.U, B.U]), np.vstack([A.V, B.V]))
    return np.asarray(A) + np.asarray(B)


# --- grouped weights ------------------------------------------------------------------


def expand_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped weight ``(out, in/g, *kernel)`` as the dense block-diagonal ``(out, in, *kernel)`` it means."""
    out, per_in = w.shape[:2]
    if groups == 1:
        return w
    per_out = out // groups
    dense = np.zeros((out, per_in * groups, *w.shape[2:]), dtype=w.dtype)
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        dense[rows, g * per_in : (g + 1) * per_in] = w[rows]
    return dense


def collapse_groups(W: np.ndarray, groups: int) -> np.ndarray | None:
    """The inverse of :func:`expand_groups`, or None if ``W`` has weight outside the blocks."""
    if groups == 1:
        return W
    out, cin = W.shape[:2]
    per_out, per_in = out // groups, cin // groups
    blocks = np.empty((out, per_in, *W.shape[2:]), dtype=W.dtype)
    mask = np.ones(W.shape, dtype=bool)
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
        blocks[rows] = W[rows, cols]
        mask[rows, cols] = False
    return blocks if not np.any(W[mask]) else None


def diagonal(M, n: int) -> np.ndarray | None:
    """The diagonal of ``M`` (a scaled identity as a float, or an n×n array) when it has nothing else."""
    if isinstance(M, float):
        return np.full(n, M)
    if isinstance(M, Kernel):
        return None
    M = np.asarray(M)
    if M.shape != (n, n):
        return None
    d = np.diagonal(M)
    return d.copy() if np.count_nonzero(M) == np.count_nonzero(d) else None


def regroup(K: np.ndarray, groups: int, to: int) -> np.ndarray:
    """A weight of ``groups`` groups ``(out, in/groups, *taps)`` as one of ``to`` groups (``to`` divides
    ``groups``): each old block lands on the diagonal of the new, coarser one, zeros elsewhere."""
    if groups == to:
        return K
    out, per_in = K.shape[:2]
    r = groups // to
    per_out = out // groups
    new = np.zeros((out, per_in * r, *K.shape[2:]))
    rows = np.arange(out)
    first = (rows // per_out % r) * per_in  # where the row's old block starts in its new one
    for k in range(per_in):
        new[rows, first + k] = K[:, k]
    return new


# --- kernel maps ----------------------------------------------------------------------


class Kernel:
    """The map a k×k (or strided) conv makes of its region: a kernel, not a matrix.

    The region's value at output position ``q`` (per spatial axis) is::

        v[o, q] = Σ_i Σ_t K[o, i, t]·x[i, s·q + start + d·t] + c[o]

    with stride ``s``, dilation ``d`` and ``start`` the input offset of tap 0
    (minus the conv's leading pad). ``K`` is grouped, ``(out, in/groups,
    *taps)``, float64, never written to; it may be given :class:`OnDemand`
    (a conv's own weight), read only when an op needs its values, so that
    the convs no region folds into are never converted. ``padding`` says what a tap outside
    the input reads (``"zeros"``, ``"reflect"``, ...), or None when no tap of
    this map ever does.

    Per-channel scales act on the rows, a 1×1 layer after it multiplies it
    (``W·K``), and two maps of one source add tap by tap: the smaller kernel
    lands where its taps read (the centre, for the usual padding), so no tap
    reads anything it did not read before. A channel map ``M`` is the 1-tap
    kernel at offset 0 with stride 1 (an identity branch is a delta kernel).
    The region's own conv with that geometry then absorbs the sum.

    NumPy cannot treat it as a matrix: anything that asks (a rule that needs
    ``M`` dense) gets :class:`NotAffine`.
    """

    __array_ufunc__ = None
    ndim = 2

    def __init__(self, K: np.ndarray | OnDemand, groups: int, stride, dilation, start, padding: str | None) -> None:
        self._K, self.groups, self.padding = K, int(groups), padding
        self.stride, self.dilation, self.start = tuple(stride), tuple(dilation), tuple(start)
        self.shape = (K.shape[0], K.shape[1] * self.groups)
        self.taps = tuple(K.shape[2:])

    @functools.cached_property
    def K(self) -> np.ndarray:
        return fetch(self._K)

    @classmethod
    def pointwise(cls, M, like: Kernel) -> Kernel:
        """The channel map ``M`` (a float for ``M·I``, an array, a factored map) as a 1-tap kernel."""
        n = len(like.stride)
        ones = (1,) * n
        if isinstance(M, float):
            if like.shape[0] != like.shape[1]:
                raise NotAffine("adds a value of another width to the source itself")
            size = like.shape[0]
        else:
            size = M.shape[0]
        d = diagonal(M, size)
        if d is not None:
            K, groups = d.reshape((size, 1) + ones), size
        else:
            K, groups = np.asarray(M, dtype=np.float64).reshape(tuple(M.shape) + ones), 1
        return cls(K, groups, ones, ones, (0,) * n, None)

    def _with(self, K: np.ndarray, groups: int | None = None) -> Kernel:
        return Kernel(K, self.groups if groups is None else groups, self.stride, self.dilation, self.start,
                      self.padding)

    def __array__(self, dtype=None, copy=None):
        raise NotAffine("the region is a k×k conv's kernel map, which this op cannot take as a matrix")

    def __rmatmul__(self, W):
        raise NotAffine("the region is a k×k conv's kernel map, which this op cannot take as a matrix")

    def __mul__(self, s: float) -> Kernel:
        if not isinstance(s, float):
            return NotImplemented
        return self._with(self.K * s)

    __rmul__ = __mul__

    def rows(self, g: np.ndarray) -> Kernel:
        """``diag(g)·K``: each output channel's filter times ``g``."""
        if g.shape[0] != self.shape[0]:
            raise NotAffine(f"a {g.shape[0]}-channel constant meets a {self.shape[0]}-channel value")
        return self._with(self.K * g.reshape((-1,) + (1,) * (self.K.ndim - 1)))

    def after(self, W: np.ndarray) -> Kernel:
        """``W·K`` for a 1×1 layer ``W`` (out', out) reading this map: a dense kernel."""
        if W.shape[1] != self.shape[0]:
            raise NotAffine(f"a {W.shape[1]}-channel layer reads a {self.shape[0]}-channel value")
        g = self.groups
        out, per_in = self.K.shape[:2]
        blocks = self.K.reshape((g, out // g, per_in, *self.taps))
        K = np.einsum("pgb,gba...->pga...", W.reshape(W.shape[0], g, out // g), blocks)
        return self._with(K.reshape((W.shape[0], per_in * g, *self.taps)), 1)

    def plus(self, other: Kernel) -> Kernel:
        """The two maps summed, tap by tap, in one kernel that holds both."""
        if self.shape != other.shape:
            raise NotAffine(f"adds values of shapes {self.shape} and {other.shape} in channel space")
        if self.stride != other.stride:
            raise NotAffine("adds branches of different strides")
        if None not in (self.padding, other.padding) and self.padding != other.padding:
            raise NotAffine(f"adds branches that pad differently ({self.padding}, {other.padding})")
        start, size, dil = [], [], []
        for a, b, ka, kb, da, db in zip(self.start, other.start, self.taps, other.taps, self.dilation,
                                        other.dilation):
            d = da if ka > 1 else db
            if ka > 1 and kb > 1 and da != db:
                raise NotAffine("adds branches of different dilations")
            if (a - b) % d:
                raise NotAffine("adds branches whose taps do not line up")
            lo, hi = min(a, b), max(a + d * (ka - 1), b + d * (kb - 1))
            start.append(lo)
            size.append((hi - lo) // d + 1)
            dil.append(d)
        groups = math.gcd(self.groups, other.groups)
        A, B = (k.placed(start, size, dil, groups) for k in (self, other))
        padding = self.padding if self.padding is not None else other.padding
        return Kernel(A + B, groups, self.stride, dil, start, padding)

    def placed(self, start, size, dilation, groups: int) -> np.ndarray:
        """``K`` as a kernel of ``size`` taps from ``start`` (dilation ``dilation``) and ``groups`` groups;
        NotAffine if a tap falls outside it."""
        if self.groups % groups == 0:
            K = regroup(self.K, self.groups, groups)
        else:  # finer groups asked of a coarser map: only if it is zero outside them
            K = collapse_groups(regroup(self.K, self.groups, 1), groups)
            if K is None:
                raise NotAffine(f"the branches mix channels across the conv's {groups} groups")
        index = []
        for a, s, k, n, d0, d in zip(self.start, start, self.taps, size, self.dilation, dilation):
            if k > 1 and d0 != d:
                raise NotAffine("the branches' dilation is not the conv's")
            first, off = divmod(a - s, d)
            if off or first < 0 or first + k > n:
                raise NotAffine("the branches' taps reach beyond the conv's kernel")
            index.append(slice(first, first + k))
        if tuple(size) == self.taps:
            return K
        out = np.zeros(K.shape[:2] + tuple(size))
        out[(slice(None), slice(None), *index)] = K
        return out
