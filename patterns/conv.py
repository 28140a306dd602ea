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

from repfold.core.affine import (
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
from ._torch import F, nn
from .linear import Dense, _hint, _is_pointwise_conv, _np, densify_reason


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
    computed: bool = False  # its weight is computed at run time (PEFT's LoHa ΔW on a conv): an adapter's
    evaluable: bool = False  # computed, and storing it costs no more (HRA's W·H): a region even alone

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
    return {nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, F.pad}


def _pads(padding, kernel, dilation) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A conv's (leading, trailing) zero pads per spatial axis from its ``padding`` argument."""
    n = len(kernel)
    if padding == "valid":
        return (0,) * n, (0,) * n
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    p = (padding,) * n if isinstance(padding, int) else tuple(padding)
    return (p, p) if len(p) == n and all(isinstance(i, int) for i in p) else None


def _fx_call(node, ctx) -> Match | None:
    """``F.convNd(x, weight, bias, stride, padding, dilation, groups)`` whose weight (and bias) are constants:
    stored, or computed from weights alone (PEFT's LoHa / LoKr ``ΔW`` on a conv, as torch.export leaves it)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    if set(args) - set(names) or "weight" not in args or not ctx.is_tensor(args.get("input")):
        return None
    x, weight, bias = args["input"], args["weight"], args.get("bias")
    w, b = ctx.const(weight), None if bias is None else ctx.const(bias)
    if not isinstance(w, np.ndarray) or w.ndim < 3 or (bias is not None and not isinstance(b, np.ndarray)):
        return None
    n = w.ndim - 2
    stride, padding, dilation, groups = (ctx.value(args.get(k, d)) for k, d in
                                         (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
    stride, dilation = ((v,) * n if isinstance(v, int) else tuple(v or ()) for v in (stride, dilation))
    pads = _pads(padding, w.shape[2:], dilation)
    if pads is None or len(stride) != n or len(dilation) != n or not isinstance(groups, int) \
            or not all(isinstance(v, int) for v in (*stride, *dilation)) or ctx.rank(x) != n + 2:
        return None
    computed, evaluable = weight.op != "get_attr", ctx.evaluable(weight, w.size)
    begin, end = pads
    if all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in stride) and not any(begin + end):
        flat = w.reshape(w.shape[0], -1)
        op = Dense(expand_groups(flat, groups) if groups > 1 else flat, b, 1, groups, "1x1 Conv", computed=computed,
                   evaluable=evaluable)
    else:
        padded = any(begin) or any(end)
        geometry = Geometry(stride, dilation, tuple(-p for p in begin), end, "zeros" if padded else None)
        op = Conv(w, b, groups, padded, _desc(w.shape[2:], stride), geometry, computed=computed, evaluable=evaluable)

    def emit(swap: dict, W, bias_new):
        grouped = collapse_groups(W, groups) if isinstance(op, Dense) else W
        new = dict(args, input=swap.get(x, x), weight=ctx.new_param(_hint(weight), grouped, weight))
        if bias_new is not None:
            new["bias"] = ctx.new_param(_hint(weight) + "_bias", bias_new, weight, shape=(w.shape[0],)) \
                if bias is None else ctx.new_param(_hint(bias), bias_new, bias)
        return ctx.graph.call_function(node.target, tuple(new[k] for k in names if k in new))

    where = node.name if computed else weight.target.removesuffix(".weight")  # a stored weight: its layer's path
    return Match(op, (x,), f"{where} ({node.target.__name__} {op.desc if isinstance(op, Conv) else '1x1'})",
                 emit=emit)


# torch's pad modes that copy positions: a conv's ``padding_mode`` of the same name
_FX_COPY_PADS = ("reflect", "replicate", "circular")


def _fx_padded_conv(pad, ctx) -> Match | None:
    """``F.pad(x, p, mode)`` copying positions on the spatial axes, read only by an ``nn.ConvNd`` that pads
    nothing: one conv with that ``padding_mode`` (as torch.export spells a reflect-padded conv)."""
    x, users = pad.args[0] if pad.args else None, list(pad.users)
    amounts = pad.kwargs.get("pad", pad.args[1] if len(pad.args) > 1 else None)
    mode = pad.kwargs.get("mode", pad.args[2] if len(pad.args) > 2 else "constant")
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (pad,) or mode not in _FX_COPY_PADS \
            or not isinstance(amounts, (list, tuple)) or not all(isinstance(p, int) for p in amounts):
        return None
    conv, m = users[0], ctx.module(users[0])
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not torch_own(m) or len(conv.args) != 1 or conv.kwargs \
            or not ctx.is_tensor(x) or ctx.rank(x) != len(m.kernel_size) + 2:
        return None
    n = len(m.kernel_size)
    if m.padding != "valid" and (isinstance(m.padding, str) or any(m.padding)) or len(amounts) != 2 * n \
            or min(amounts) < 0:
        return None
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, 2 * n, 2)][::-1]  # F.pad lists the last axis first
    geometry = Geometry(tuple(m.stride), tuple(m.dilation), tuple(-a for a, _ in pairs), tuple(e for _, e in pairs),
                        mode)
    op = Conv(_np(m.weight), _np(m.bias), m.groups, False, _desc(m.kernel_size, m.stride) + f" {mode}-padded",
              geometry)
    rebuild = fx_rebuild(conv, ctx, _fx_params)

    def emit(swap: dict, W, b):
        new_pad = ctx.graph.call_function(pad.target, (swap.get(x, x), *pad.args[1:]), dict(pad.kwargs))
        return rebuild({pad: new_pad}, W, b)

    return Match(op, (x,), f"{conv.target} (pad + {type(m).__name__} {op.desc})", (pad, conv), emit)


def match_fx(node, ctx) -> Match | None:
    if node.op == "call_function" and node.target is F.pad:
        return _fx_padded_conv(node, ctx)
    if node.op == "call_function":
        return _fx_call(node, ctx)
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


# ONNX Pad modes that copy positions, by the name a torch conv's ``padding_mode`` gives them
_ONNX_COPY_PADS = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _onnx_padded_conv(conv, ctx) -> Match | None:
    """A Conv that pads nothing, reading a Pad that copies positions (reflect, edge, wrap) on the spatial
    axes and that only convs read: one conv with that padding, as torch's ``padding_mode="reflect"`` exports
    (its branches then sum as in fx). The exporters share one Pad among the convs that read the same
    input; each conv rebuilt gets a copy on the new input, one per input however many convs read it."""
    pad = conv.inputs[0].inputs[0] if len(conv.inputs[0].inputs) == 1 else None
    if pad is None or pad.op != "Pad" or len(pad.inputs) != 2 or id(pad.outputs[0]) in ctx.outputs:
        return None
    x = pad.inputs[0]
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in _ONNX_COPY_PADS or any(c.op != "Conv" or c.inputs[0] is not pad.outputs[0]
                                          for c in pad.outputs[0].outputs):
        return None
    pads, rank, w = ctx.raw_const(pad.inputs[1]), ctx.rank(x), ctx.weight(conv.inputs[1])
    b = ctx.const(conv.inputs[2]) if len(conv.inputs) > 2 else None
    a = conv.attrs
    if pads is None or rank is None or w is None or len(w.shape) != rank or len(pads) != 2 * rank \
            or (len(conv.inputs) > 2 and b is None):
        return None
    pads = [int(p) for p in pads]
    n = rank - 2
    auto = a.get("auto_pad", "NOTSET")
    if any(pads[:2]) or any(pads[rank:rank + 2]) or any(a.get("pads", [0])) or min(pads) < 0 \
            or (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
        return None
    begin, end = tuple(pads[2:rank]), tuple(pads[rank + 2:])
    strides, dilations = tuple(a.get("strides", [1] * n)), tuple(a.get("dilations", [1] * n))
    geometry = Geometry(strides, dilations, tuple(-p for p in begin), end, _ONNX_COPY_PADS[mode])
    computed = ctx.computed(conv.inputs[1])
    op = Conv(w, b, a.get("group", 1), False, _desc(w.shape[2:], strides) + f" {mode}-padded", geometry, computed,
              computed and ctx.evaluable(conv.inputs[1], int(np.prod(w.shape))))
    copies = ctx.__dict__.setdefault("_pad_copies", {})  # (pad, new input) -> its copy, for this fold

    def emit(swap: dict, W, bias):
        padded = swap.get(pad.outputs[0], None)  # a region that ends at the Pad: its replay padded the input
        if padded is None:
            new_x = swap.get(x, x)
            key = (id(pad), id(new_x))
            if key not in copies:
                copies[key] = ctx.copy_node(pad, [new_x, pad.inputs[1]])
            padded = copies[key]
        ins = [padded, ctx.new_const(conv.inputs[1], W)]
        if bias is not None:
            ins.append(ctx.new_const(conv.inputs[2] if len(conv.inputs) > 2 else conv.inputs[1], bias))
        return ctx.copy_node(conv, ins)

    return Match(op, (x,), f"{conv.name} (Pad + Conv {op.desc})", (conv,), emit)


def match_onnx(node, ctx) -> Match | None:
    if node.op != "Conv":
        return None
    padded = _onnx_padded_conv(node, ctx)
    if padded is not None:
        return padded
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
    computed = ctx.computed(node.inputs[1])
    op = Conv(w, b, a.get("group", 1), padded, _desc(w.shape[2:], strides), geometry, computed,
              computed and ctx.evaluable(node.inputs[1], int(np.prod(w.shape))))

    def inits(W, bias):  # a conv without a bias input takes one: a third input, no new operator
        return {1: W} if bias is None else {1: W, 2: bias}

    return Match(op, (node.inputs[0],), f"{node.name} (Conv {op.desc})", (node,), onnx_rebuild(node, ctx, inits))
