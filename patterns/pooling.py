"""Average pooling: a depthwise conv whose taps are all ``1/k`` (``k`` the window's size).

Where every window divides by its full size (no padding, or zero padding
counted in the divisor: PyTorch's ``count_include_pad=True``, ONNX's
``count_include_pad=1``), the pool reading ``v = M·x + c`` is the kernel map::

    pool(v)[o, q] = Σ_i Σ_t (M[o, i] / k)·x[i, s·q + start + t] + c[o]

a :class:`~repfold.core.affine.Kernel` of the source: grouped per channel where
``M`` is a per-channel scale, dense where it mixes channels. It sums with
the other branches of a DBB-style block (1x1 -> average pool beside a 3x3)
and goes into their conv like any kernel map. The constant passes only
where no window reads padding (a zero tap would not count it); a window
that divides by the taps it finds inside the input (``count_include_pad``
off, with padding) is not a conv at all, nor is ``ceil_mode``'s last
partial window, and ends a region.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from repfold.core.affine import Affine, Channels, Kernel, NotAffine, Relaid, diagonal

from ._base import Match, torch_own
from ._torch import F, nn
from .conv import Geometry


@dataclass
class AvgPool:
    """An average pool over ``size``, its windows placed as a conv's taps are (``geometry``)."""

    size: tuple[int, ...]
    geometry: Geometry

    heavy = False

    @property
    def desc(self) -> str:
        return "x".join(map(str, self.size)) + " average pool"

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        v = ins[0]
        if isinstance(v.M, Kernel):
            raise NotAffine(f"a {self.desc} reads a conv's kernel map (its kernel would grow)")
        n = len(self.size)
        if v.pos is not None and v.rank == n + 2:  # the source moved (NeXtViT's tokens back to channels first):
            return self.commute(ins, ch)  # no kernel of the source; the pool replayed on it
        v = ch.require(v, 1, f"a {self.desc}")
        if v.pos is not None or v.rank != n + 2:
            raise Relaid(f"a {self.desc} reads its region's source laid out another way")
        g = self.geometry
        self.no_constant_in_padding(v)
        box = np.full(self.size, 1.0 / math.prod(self.size))
        C = v.shape[1]
        d = diagonal(v.M, C) if not isinstance(v.M, float) else np.full(C, v.M)
        if d is not None:  # per channel: a depthwise kernel
            K, groups = d.reshape((C, 1) + (1,) * n) * box, C
        else:  # mixes channels: each (out, in) pair's weight spread over the window
            M = np.asarray(v.M)
            K, groups = M.reshape(M.shape + (1,) * n) * box, 1
        kmap = Kernel(K, groups, g.stride, g.dilation, g.start, g.padding)
        return replace(v, shape=self.out_shape(v, K.shape[0]), M=kmap)

    def no_constant_in_padding(self, v: Affine) -> None:
        if self.geometry.padding is not None and np.any(v.c):
            raise NotAffine(f"a constant before a zero-padded {self.desc} is not exact at the borders "
                            "(the padding reads 0, not the constant)")

    def out_shape(self, v: Affine, channels: int) -> tuple[int, ...]:
        """The pool's output shape for input ``v`` (batch, channels, pooled positions)."""
        g = self.geometry
        return (v.shape[0], channels, *(g.out_size(n, a, k) for a, (n, k) in enumerate(zip(v.shape[2:], self.size))))

    def commute(self, ins: list[Affine], ch: Channels) -> Affine:
        """The pool kept as an op, replayed on the region's source: the same window over every channel, so
        ``pool(M·x + c) = M·pool(x) + c`` for any channel map ``M`` (the constant only where no window reads
        padding). The planner asks for this where the kernel map cannot go on (a transpose before the
        Linear layers that read the pool: NeXtViT's key/value reduction)."""
        v = ins[0]
        n = len(self.size)
        if v.rank != n + 2:
            raise NotAffine(f"a {self.desc} reads a rank-{v.rank} value")
        v = ch.require(v, 1, f"a {self.desc}")
        self.no_constant_in_padding(v)
        return ch.mixed(v, self.out_shape(v, v.shape[1]), f"a {self.desc}")


def _tuple(x, n: int) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def _avg_pool(size, stride, begin, end) -> AvgPool:
    padded = any(begin) or any(end)
    n = len(size)
    return AvgPool(size, Geometry(stride, (1,) * n, tuple(-p for p in begin), end, "zeros" if padded else None))


# --- torch.fx --------------------------------------------------------------------------

ONNX_OPS = frozenset({"AveragePool"})


@functools.cache
def _functions() -> dict:
    """The functional average pools and their spatial rank (on first use: torch is not imported for ONNX)."""
    return {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}

_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def fx_keys() -> set:
    return {nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, *_functions()}


def _pool(n, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> AvgPool | None:
    kernel = _tuple(kernel, n)
    stride = _tuple(stride or kernel, n)
    padding = _tuple(padding, n)
    if ceil_mode or divisor_override or (any(padding) and not count_include_pad):
        return None  # windows that divide by something else than their size
    return _avg_pool(kernel, stride, padding, padding)


def match_fx(node, ctx) -> Match | None:
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) or not torch_own(m) or not node.args:
            return None
        n = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
        op = _pool(n, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                   getattr(m, "divisor_override", None))
        x = node.args[0]
    elif node.op == "call_function" and node.target in _functions():
        args = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}
        args.update(zip(_ARGS, node.args))
        args.update(node.kwargs)
        x = args.get("input")
        if any(not isinstance(args[k], (int, tuple, list, type(None), bool)) for k in _ARGS[1:] if k in args):
            return None  # a size computed at run time
        op = _pool(_functions()[node.target], args.get("kernel_size"), args["stride"], args["padding"],
                   args["ceil_mode"], args["count_include_pad"], args["divisor_override"])
    else:
        return None
    if op is None or not ctx.is_tensor(x):
        return None
    return Match(op, (x,), f"{node.name} ({op.desc})")


# --- ONNX ------------------------------------------------------------------------------


def match_onnx(node, ctx) -> Match | None:
    if node.op != "AveragePool":
        return None
    a = node.attrs
    kernel = tuple(a.get("kernel_shape", ()))
    n = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if not n or auto not in ("NOTSET", "VALID") or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", ())):
        return None
    pads = (0,) * (2 * n) if auto == "VALID" else tuple(a.get("pads", [0] * (2 * n)))
    if any(pads) and not a.get("count_include_pad", 0):
        return None
    op = _avg_pool(kernel, tuple(a.get("strides", [1] * n)), pads[:n], pads[n:])
    return Match(op, (node.inputs[0],), f"{node.name} ({op.desc})")
