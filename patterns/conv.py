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
from dataclasses import dataclass, replace

import numpy as np

from repfold._affine import (
    Affine,
    Channels,
    Kernel,
    NotAffine,
    OnDemand,
    Relaid,
    collapse_groups,
    diagonal,
    expand_groups,
)

from ._base import Deferred, Match, fx_rebuild, onnx_rebuild, resolve, torch_own
from ._torch import nn
from .linear import _is_pointwise_conv, _np, densify_reason


@dataclass(frozen=True)
class Geometry:
    """Where a conv's taps read, per spatial axis: output ``q``, tap ``t`` reads ``s·q + start + d·t``.

    ``start`` is minus the leading pad; ``padding`` what a tap outside the
    input reads (``"zeros"``, ``"reflect"``, ...), None when the conv pads
    nothing.
    """

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    start: tuple[int, ...]
    end: tuple[int, ...]  # the trailing pad, per axis
    padding: str | None

    def out_size(self, n: int, axis: int, k: int) -> int:
        return (n - self.start[axis] + self.end[axis] - self.dilation[axis] * (k - 1) - 1) // self.stride[axis] + 1


@dataclass
class Conv:
    """A conv with weight ``W`` (out, in/groups, *kernel), float64; channels on axis 1.

    ``weight`` is ``W`` or a :class:`~._base.Deferred` that makes it when first needed.
    ``geometry`` is None where the padding depends on the input's size
    (ONNX's ``SAME`` with a stride): the conv then starts no kernel map.
    """

    weight: np.ndarray | Deferred
    b: np.ndarray | None
    groups: int
    zero_padded: bool
    desc: str
    geometry: Geometry | None = None

    heavy = True

    @functools.cached_property
    def W(self) -> np.ndarray:
        return resolve(self.weight)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        """``conv(M·x + c)``: the kernel map ``W·M`` of the source, with the constant ``W·c + b``."""
        v = ins[0]
        if self.geometry is None:
            raise NotAffine(f"a {self.desc} conv whose padding depends on the input size")
        if isinstance(v.M, Kernel):
            raise NotAffine(f"a {self.desc} conv reads another conv's output (its kernel would grow)")
        v = ch.require(v, 1, f"a {self.desc} conv")
        w = self.weight.shape
        if v.pos is not None or v.rank != len(w):
            raise Relaid(f"a {self.desc} conv reads its region's source laid out another way")
        if isinstance(v.M, float) and v.M == 1.0:  # the source itself: the conv's own weight, read when needed
            K = OnDemand(w, lambda: self.W)
        elif isinstance(v.M, float) or v.M.shape[0] == v.M.shape[1]:
            K = self._times(v.M)  # the conv's groups kept where the map allows it
        elif self.groups == 1:
            K = np.einsum("oj...,ji->oi...", self.W, np.asarray(v.M))
        else:
            raise NotAffine(densify_reason(self.groups, w[1] * self.groups))
        g = self.geometry
        kmap = Kernel(K, self.groups, g.stride, g.dilation, g.start, g.padding)
        shape = (v.shape[0], w[0], *(g.out_size(n, a, k) for a, (n, k) in enumerate(zip(v.shape[2:], w[2:]))))
        return replace(v, shape=shape, M=kmap, c=self._shift(v.c))

    def absorb(self, v: Affine, ch: Channels) -> tuple[np.ndarray, np.ndarray | None]:
        """New ``(W, b)`` for this conv reading the region's source: the kernel map, placed in its taps."""
        if not isinstance(v.M, Kernel) or self.geometry is None:
            raise NotAffine(f"a {self.desc} conv takes only a kernel map of its region")
        out, cin = self.weight.shape[0], self.weight.shape[1] * self.groups
        if v.M.shape != (out, cin):
            raise NotAffine(f"needs a {out}x{cin} kernel map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
        g = self.geometry
        if v.M.stride != g.stride:
            raise NotAffine(f"the region's stride {v.M.stride} is not the conv's {g.stride}")
        if v.M.padding not in (None, g.padding):
            raise NotAffine(f"the region pads with {v.M.padding}, the conv with {g.padding or 'nothing'}")
        W = v.M.placed(g.start, self.weight.shape[2:], g.dilation, self.groups)
        return W, self._bias(v.c)

    def _times(self, M) -> np.ndarray:
        """``W·M`` (M square, over the conv's input channels) as a grouped weight; NotAffine if it would densify."""
        cin = self.weight.shape[1] * self.groups
        d = diagonal(M, cin)
        if d is not None:  # a per-channel scale (BatchNorm, SSF): each input channel's taps, no dense detour
            per_in = self.weight.shape[1]
            rows = np.repeat(d.reshape(self.groups, per_in), self.weight.shape[0] // self.groups, axis=0)
            return self.W * rows.reshape(rows.shape + (1,) * (len(self.weight.shape) - 2))
        if M.shape != (cin, cin):
            raise NotAffine(f"needs a {cin}x{cin} map, the region is {M.shape[0]}x{M.shape[1]}")
        grouped = collapse_groups(np.einsum("oj...,ji->oi...", self.dense, np.asarray(M)), self.groups)
        if grouped is None:
            raise NotAffine(densify_reason(self.groups, cin))
        return grouped

    def _shift(self, c) -> np.ndarray | None:
        """``b + Σ_{j,taps} W[o, j, taps]·c[j]``: what a constant ``c`` on the input adds to each output."""
        cin = self.weight.shape[1] * self.groups
        c = np.full(cin, c) if isinstance(c, float) else c
        if not np.any(c):
            return self.b if self.b is not None else 0.0
        if self.zero_padded:
            raise NotAffine(
                "a constant before a zero-padded conv is not exact at the borders "
                "(the padding reads 0, not the constant)"
            )
        taps = self.W.sum(axis=tuple(range(2, len(self.weight.shape))))  # (out, in/groups)
        shift = expand_groups(taps, self.groups) @ c
        return shift if self.b is None else self.b + shift

    def _bias(self, c) -> np.ndarray | None:
        """The conv's new bias for the constant ``c``; a conv without one takes one (no new operator)."""
        c = np.full(self.weight.shape[0], c) if isinstance(c, float) else np.asarray(c, dtype=np.float64)
        return c if self.b is not None or np.any(c) else None

    @property
    def dense(self) -> np.ndarray:
        """The weight as (out, in, *kernel), zero outside the group blocks."""
        return expand_groups(self.W, self.groups)

    def absorb_input(self, v: Affine, ch: Channels, slots=(0,)) -> tuple[np.ndarray, np.ndarray | None]:
        v = ch.require(v, 1, f"a {self.desc} conv")
        if isinstance(v.M, Kernel):
            raise NotAffine(f"a {self.desc} conv reads another conv's output (its kernel would grow)")
        W = self._times(v.M)  # (the map's reason first: it holds even where the constant is zero)
        return W, self._bias(self._shift(v.c))

    def absorb_output(self, v: Affine, ch: Channels) -> tuple[np.ndarray, np.ndarray | None]:
        v = ch.require(v, 1, f"a {self.desc} conv")
        out = self.weight.shape[0]
        if isinstance(v.M, Kernel):
            raise NotAffine(f"a {self.desc} conv cannot take another conv's kernel map")
        d = diagonal(v.M, out)
        if d is not None:  # a per-channel scale (BatchNorm after the conv): scale each output channel's filter
            grouped = self.W * d.reshape((out,) + (1,) * (len(self.weight.shape) - 1))
            Mb = None if self.b is None else d * self.b
        elif v.M.shape != (out, out):
            raise NotAffine(f"needs a {out}x{out} map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
        else:
            grouped = collapse_groups(np.einsum("po,o...->p...", np.asarray(v.M), self.dense), self.groups)
            Mb = None if self.b is None else np.asarray(v.M) @ self.b
        if grouped is None:
            raise NotAffine(densify_reason(self.groups, self.weight.shape[1] * self.groups))
        c = np.full(out, v.c) if isinstance(v.c, float) else v.c
        return grouped, self._bias(c if Mb is None else Mb + c)


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
    n = len(m.kernel_size)
    if m.padding == "valid":
        begin = end = (0,) * n
    elif m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        begin, end = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    else:
        begin = end = tuple(m.padding)
    padded = any(begin) or any(end)
    mode = m.padding_mode if padded else None
    geometry = Geometry(tuple(m.stride), tuple(m.dilation), tuple(-p for p in begin), end, mode)
    op = Conv(_np(m.weight), _np(m.bias), m.groups, mode == "zeros", _desc(m.kernel_size, m.stride), geometry)
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
    n = len(w.shape) - 2
    strides = tuple(a.get("strides", [1] * n))
    dilations = tuple(a.get("dilations", [1] * n))
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = tuple(a.get("pads", [0] * (2 * n)))
    geometry = None
    if auto.startswith("SAME"):
        if all(s == 1 for s in strides):  # else the padding depends on the input's size
            total = [d * (k - 1) for d, k in zip(dilations, w.shape[2:])]
            begin = tuple(t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total)
            pads = begin + tuple(t - lo for t, lo in zip(total, begin))
        else:
            pads = None
    elif auto == "VALID":
        pads = (0,) * (2 * n)
    padded = pads is None or any(p > 0 for p in pads)
    if pads is not None:
        geometry = Geometry(strides, dilations, tuple(-p for p in pads[:n]), pads[n:], "zeros" if padded else None)
    if all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in strides) and not padded:
        return None  # a 1x1 conv: a Linear, in linear.py
    op = Conv(w, b, a.get("group", 1), padded, _desc(w.shape[2:], strides), geometry)

    def inits(W, bias):  # a conv without a bias input takes one: a third input, no new operator
        return {1: W} if bias is None else {1: W, 2: bias}

    return Match(op, (node.inputs[0],), f"{node.name} (Conv {op.desc})", (node,), onnx_rebuild(node, ctx, inits))
