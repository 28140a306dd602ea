"""Channel-affine maps: the algebra every fold rule is written in.

A value ``v`` inside an adapter region is tracked as an affine map of one
*source* value ``x`` along the channel axis, the same at every other position::

    v = M·x + c        M: (C_v × C_x),  c: (C_v,)

Plus a layout: ``dims[i]`` is the axis of ``x`` that sits at axis ``i`` of
``v`` (transposes and permutes move axes, never mix them).

Everything here is NumPy in float64 and knows nothing of torch.fx or ONNX;
the rules in ``repfold.patterns`` call it, the frontends never do arithmetic.

To stay free of the channel width until an op reveals it, ``M`` may be a
Python float ``s`` standing for ``s·I`` and ``c`` a float standing for the same
constant on every channel. A fresh source is ``(1.0, 0.0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class NotAffine(Exception):
    """Raised by a transfer rule: the op's output is not affine in the region's source."""


@dataclass(frozen=True)
class Affine:
    """``v = M·x + c`` along the channel axis of ``source``, laid out as ``dims``."""

    source: str
    dims: tuple[int, ...]
    M: np.ndarray | float = 1.0
    c: np.ndarray | float = 0.0

    @classmethod
    def of_source(cls, name: str, rank: int) -> Affine:
        return cls(name, tuple(range(rank)))

    @property
    def is_identity(self) -> bool:
        """True when ``v`` is exactly ``x``: same values, same layout."""
        return (
            isinstance(self.M, float)
            and self.M == 1.0
            and isinstance(self.c, float)
            and self.c == 0.0
            and self.dims == tuple(range(len(self.dims)))
        )

    def with_map(self, M: np.ndarray | float, c: np.ndarray | float) -> Affine:
        return Affine(self.source, self.dims, M, c)


@dataclass
class Channels:
    """Which axis of each source is its channel axis; bound by the first op that acts on one."""

    axis: dict[str, int] = field(default_factory=dict)

    def require(self, v: Affine, at: int, what: str) -> None:
        """Check that axis ``at`` of ``v`` is its source's channel axis, binding it if still free."""
        if not 0 <= at < len(v.dims):
            raise NotAffine(f"{what} acts on axis {at} of a rank-{len(v.dims)} value")
        src_axis = v.dims[at]
        bound = self.axis.setdefault(v.source, src_axis)
        if bound != src_axis:
            raise NotAffine(
                f"{what} acts on axis {at}, which is not the region's channel axis"
            )

    def channel_position(self, v: Affine) -> int | None:
        """The axis of ``v`` that carries the channels, or None while unbound."""
        src_axis = self.axis.get(v.source)
        return None if src_axis is None else v.dims.index(src_axis)


# --- arithmetic on (M, c) -------------------------------------------------------------


def matmul(W: np.ndarray, M: np.ndarray | float) -> np.ndarray:
    """``W·M`` where ``M`` may be a scalar multiple of the identity."""
    if isinstance(M, float):
        return W * M
    if W.shape[1] != M.shape[0]:
        raise NotAffine(f"a {W.shape[1]}-channel layer reads a {M.shape[0]}-channel value")
    return W @ M


def matvec(W: np.ndarray, c: np.ndarray | float) -> np.ndarray:
    """``W·c`` where ``c`` may be a constant broadcast over all channels."""
    if isinstance(c, float):
        return W.sum(axis=1) * c
    return W @ c


def scale(gamma: np.ndarray | float, M: np.ndarray | float) -> np.ndarray | float:
    """``diag(γ)·M`` for a per-channel or scalar γ."""
    if isinstance(gamma, float):
        return gamma * M
    if isinstance(M, float):
        return np.diag(gamma * M)
    if gamma.shape[0] != M.shape[0]:
        raise NotAffine(f"a {gamma.shape[0]}-channel constant meets a {M.shape[0]}-channel value")
    return gamma[:, None] * M


def add(A: np.ndarray | float, B: np.ndarray | float) -> np.ndarray | float:
    """``A + B`` for maps or offsets, either of which may be a scalar (times I, or broadcast)."""
    if isinstance(A, float) and isinstance(B, float):
        return A + B
    if isinstance(A, float):
        A, B = B, A
    if isinstance(B, float):
        if A.ndim == 2:
            if A.shape[0] != A.shape[1]:
                raise NotAffine("adds a value of another width to the source itself")
            return A + B * np.eye(A.shape[0])
        return A + B
    if A.shape != B.shape:
        raise NotAffine(f"adds values of shapes {A.shape} and {B.shape} in channel space")
    return A + B


# --- grouped weights ------------------------------------------------------------------


def expand_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped weight ``(out, in/g)`` as the dense block-diagonal ``(out, in)`` it means."""
    out, per_in = w.shape
    if groups == 1:
        return w
    per_out = out // groups
    dense = np.zeros((out, per_in * groups), dtype=w.dtype)
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        dense[rows, g * per_in : (g + 1) * per_in] = w[rows]
    return dense


def collapse_groups(W: np.ndarray, groups: int) -> np.ndarray | None:
    """The inverse of :func:`expand_groups`, or None if ``W`` has weight outside the blocks."""
    if groups == 1:
        return W
    out, cin = W.shape
    per_out, per_in = out // groups, cin // groups
    blocks = np.empty((out, per_in), dtype=W.dtype)
    mask = np.ones_like(W, dtype=bool)
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
        blocks[rows] = W[rows, cols]
        mask[rows, cols] = False
    return blocks if not np.any(W[mask]) else None
