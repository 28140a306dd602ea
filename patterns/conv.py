"""Convolutions that are not a per-position linear map: k×k kernels, strides, padding.

Such a conv does not carry a region on (it mixes neighbouring positions), but
it absorbs a region on either side, for any kernel, stride and dilation.

Forward fold (the region ``v = M·x + c`` is the conv's input)::

    W'[o, i, …] = Σ_j W[o, j, …]·M[j, i]      b'[o] = b[o] + Σ_{j,…} W[o, j, …]·c[j]

The bias part is exact only where every tap reads the input: with zero
padding, border outputs see ``0`` instead of ``c`` in the taps outside the
image. So a non-zero ``c`` before a zero-padded conv is refused; reflect,
replicate and circular padding are exact.

Backward fold (the region is the conv's output, and the conv feeds nothing
else)::

    W'[p, …] = Σ_o M[p, o]·W[o, …]            b' = M·b + c

Grouped and depthwise convs absorb only maps that keep their group blocks (a
per-channel scale always does); anything else would make the conv dense and
raise its cost by the number of groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from repfold._affine import Affine, Channels, NotAffine, collapse_groups, expand_groups

from ._base import Deferred, Match, fx_rebuild, onnx_rebuild, resolve, torch_own
from ._torch import nn
from .linear import _is_pointwise_conv, _np, bias_for, densify_reason


@dataclass
class Conv:
    """A conv with weight ``W`` (out, in/groups, *kernel), float64; channels on axis 1.

    ``weight`` is ``W`` or a :class:`~._base.Deferred` that makes it when first needed.
    """

    weight: np.ndarray | Deferred
    b: np.ndarray | None
    groups: int
    zero_padded: bool
    desc: str

    heavy = False

    @functools.cached_property
    def W(self) -> np.ndarray:
        return resolve(self.weight)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        raise NotAffine(f"a {self.desc} conv does not act position by position")

    @property
    def dense(self) -> np.ndarray:
        """The weight as (out, in, *kernel), zero outside the group blocks."""
        return expand_groups(self.W, self.groups)

    def absorb_input(self, v: Affine, ch: Channels, slots=(0,)) -> tuple[np.ndarray, np.ndarray | None]:
        v = ch.require(v, 1, f"a {self.desc} conv")
        cin = self.W.shape[1] * self.groups
        d = _diagonal(v.M, cin)
        if d is not None:  # a per-channel scale (BatchNorm, SSF): each input channel's taps, no dense detour
            per_in = self.W.shape[1]
            rows = np.repeat(d.reshape(self.groups, per_in), self.W.shape[0] // self.groups, axis=0)
            grouped = self.W * rows.reshape(rows.shape + (1,) * (self.W.ndim - 2))
            D = None
        elif v.M.shape != (cin, cin):
            raise NotAffine(f"needs a {cin}x{cin} map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
        else:
            D = self.dense
            grouped = collapse_groups(np.einsum("oj...,ji->oi...", D, v.M), self.groups)
        if grouped is None:
            raise NotAffine(densify_reason(self.groups, cin))
        c = np.full(cin, v.c) if isinstance(v.c, float) else v.c
        if not np.any(c):
            return grouped, self.b
        if self.zero_padded:
            raise NotAffine(
                "a constant before a zero-padded conv is not exact at the borders "
                "(the padding reads 0, not the constant)"
            )
        D = self.dense if D is None else D
        bias = bias_for(D.sum(axis=tuple(range(2, D.ndim))) @ c, self.b, D.shape[0], "the conv")
        return grouped, bias if self.b is None else self.b + bias

    def absorb_output(self, v: Affine, ch: Channels) -> tuple[np.ndarray, np.ndarray | None]:
        v = ch.require(v, 1, f"a {self.desc} conv")
        out = self.W.shape[0]
        d = _diagonal(v.M, out)
        if d is not None:  # a per-channel scale (BatchNorm after the conv): scale each output channel's filter
            grouped = self.W * d.reshape((out,) + (1,) * (self.W.ndim - 1))
            Mb = None if self.b is None else d * self.b
        elif v.M.shape != (out, out):
            raise NotAffine(f"needs a {out}x{out} map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
        else:
            D = self.dense
            grouped = collapse_groups(np.einsum("po,o...->p...", v.M, D), self.groups)
            Mb = None if self.b is None else v.M @ self.b
        if grouped is None:
            raise NotAffine(densify_reason(self.groups, self.W.shape[1] * self.groups))
        c = bias_for(v.c, self.b, out, "the conv")
        return grouped, None if c is None else (c if Mb is None else Mb + c)


def _diagonal(M, n: int) -> np.ndarray | None:
    """The diagonal of ``M`` (a scaled identity as a float, or an n×n array) when it has nothing else."""
    if isinstance(M, float):
        return np.full(n, M)
    M = np.asarray(M)
    if M.shape != (n, n):
        return None
    d = np.diagonal(M)
    return d.copy() if np.count_nonzero(M) == np.count_nonzero(d) else None


def _desc(kernel, stride) -> str:
    d = "x".join(map(str, kernel))
    return d if all(s == 1 for s in stride) else f"{d} stride-{'x'.join(map(str, stride))}"


# --- torch.fx --------------------------------------------------------------------------


def _fx_params(m, W, b):
    return {"weight": W} if b is None else {"weight": W, "bias": b}


ONNX_OPS = frozenset({"Conv"})


def fx_keys() -> set:
    return {nn.Conv1d, nn.Conv2d, nn.Conv3d}


def match_fx(node, ctx) -> Match | None:
    if node.op != "call_module" or not node.args:
        return None
    m = ctx.module(node)
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not torch_own(m) or _is_pointwise_conv(m) \
            or not ctx.is_tensor(node.args[0]):
        return None
    if m.padding == "same":
        padded = any(k > 1 for k in m.kernel_size)
    else:
        padded = not isinstance(m.padding, str) and any(p > 0 for p in m.padding)
    op = Conv(_np(m.weight), _np(m.bias), m.groups, padded and m.padding_mode == "zeros", _desc(m.kernel_size, m.stride))
    return Match(op, (node.args[0],), f"{node.target} ({type(m).__name__} {op.desc})", emit=fx_rebuild(node, ctx, _fx_params))


# --- ONNX ------------------------------------------------------------------------------


def match_onnx(node, ctx) -> Match | None:
    if node.op != "Conv":
        return None
    w = ctx.weight(node.inputs[1])
    b = ctx.const(node.inputs[2]) if len(node.inputs) > 2 else None
    if w is None or len(w.shape) < 3 or (len(node.inputs) > 2 and b is None):
        return None
    a = node.attrs
    strides = a.get("strides", [1] * (len(w.shape) - 2))
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    padded = any(p > 0 for p in a.get("pads", [0])) or (auto.startswith("SAME") and any(k > 1 for k in w.shape[2:]))
    if all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in strides) and not padded:
        return None  # a 1x1 conv: a Linear, in linear.py
    op = Conv(w, b, a.get("group", 1), padded, _desc(w.shape[2:], strides))

    def inits(W, bias):
        return {1: W} if bias is None else {1: W, 2: bias}

    return Match(op, (node.inputs[0],), f"{node.name} (Conv {op.desc})", (node,), onnx_rebuild(node, ctx, inits))
