"""Ops that move values between positions without touching channel arithmetic.

Each op keeps the map and moves the layout (see ``repfold.core.affine``)::

    layout_op(M·x + c)  ->  same (M, c), positions moved

as long as the channel axis stays whole: permute / transpose, reshape / view /
flatten / squeeze / unsqueeze, roll, slicing and concatenation along other
axes, pads by zero amounts (window partitions are made of these), and pads
that copy positions (reflect, replicate/edge, circular/wrap). A pad with
zeros (Swin's window partition of a size its window does not divide) only
where the constant is zero: ``pad(M·x) = M·pad(x)``, but ``pad(M·x + c)``
holds 0, not ``c``, at the new positions. ``Same``
passes a value through unchanged: eval-mode dropout, identity, contiguous,
clone, a cast to the same dtype.

A fold replays the layout ops that lie between the source and the absorbing
layer on the source itself, so the folded graph keeps the model's own layout
ops (a Swin window partition) and drops those that cancel out (the transposes
around a channels-first adapter).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np

from repfold.core.affine import Affine, Channels, Kernel, KernelBlocked, NotAffine

from ._base import Match, torch_own
from ._torch import F, nn, torch


class _Layout:
    heavy = False
    layout = True  # a fold may replay it on the source


@dataclass
class Permute(_Layout):
    """Axis ``i`` of the output is axis ``perm[i]`` of the input (negative indices allowed)."""

    perm: tuple[int, ...]

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        r = v.rank
        perm = [p % r for p in self.perm] if r else []
        if sorted(perm) != list(range(r)):
            raise NotAffine(f"permutation {self.perm} does not fit a rank-{r} value")
        shape = tuple(v.shape[p] for p in perm)
        return ch.relayout(v, shape, lambda p: p.transpose(perm), lambda p, a: (p.transpose(perm), perm.index(a)))


def swap(rank: int, a: int, b: int) -> tuple[int, ...]:
    p = list(range(rank))
    p[a % rank], p[b % rank] = p[b % rank], p[a % rank]
    return tuple(p)


@dataclass
class Reshape(_Layout):
    """Row-major reshape to ``shape`` (view, reshape, flatten, squeeze, unsqueeze)."""

    shape: tuple[int, ...]

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        out = self.shape
        if math.prod(out) != math.prod(v.shape):
            raise NotAffine(f"reshapes {v.shape} to {out}")

        def reduced(pos, cax):
            before, width = math.prod(v.shape[:cax]), v.shape[cax]
            for a, n in enumerate(out):
                if n == width and math.prod(out[:a]) == before:
                    return pos.reshape(tuple(1 if i == a else m for i, m in enumerate(out))), a
            raise NotAffine(f"reshaping {v.shape} to {out} splits or merges the channel axis")

        return ch.relayout(v, out, lambda p: p.reshape(out), reduced)


@dataclass
class Roll(_Layout):
    """``torch.roll`` by ``shifts`` along ``dims`` (cyclic shift of positions)."""

    shifts: tuple[int, ...]
    dims: tuple[int, ...]

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins

        def reduced(pos, cax):
            if cax in [d % v.rank for d in self.dims]:
                raise NotAffine("rolls along the channel axis")
            return np.roll(pos, self.shifts, self.dims), cax

        return ch.relayout(v, v.shape, lambda p: np.roll(p, self.shifts, self.dims), reduced)


@dataclass
class CopyPad(_Layout):
    """A pad whose new positions copy existing ones (``numpy.pad`` modes reflect, edge, wrap).

    ``widths`` holds one ``(before, after)`` pair per axis. A per-channel
    affine commutes with it exactly, constant included; a zero pad does not.
    """

    widths: tuple[tuple[int, int], ...]
    mode: str

    def pad(self, positions: np.ndarray) -> np.ndarray:
        return np.pad(positions, self.widths, mode=self.mode)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        if len(self.widths) != v.rank or any(a < 0 or b < 0 for a, b in self.widths):
            raise NotAffine(f"pads {self.widths} do not fit a rank-{v.rank} value")
        shape = tuple(n + a + b for n, (a, b) in zip(v.shape, self.widths))

        def reduced(pos, cax):
            if any(self.widths[cax]):
                raise NotAffine("pads the channel axis")
            return self.pad(pos), cax

        return ch.relayout(v, shape, self.pad, reduced)


@dataclass
class ZeroPad(CopyPad):
    """A pad with zeros: exact for ``M·x`` (``M·0 = 0``), not for a constant ``c``, which the new positions
    do not hold. Those hold no position of the source (-1)."""

    mode: str = "constant"

    def pad(self, positions: np.ndarray) -> np.ndarray:
        return np.pad(positions, self.widths, constant_values=-1)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        if np.any(ins[0].c):
            raise NotAffine("pads with zeros a value with a constant (the new positions hold 0, not the constant; "
                            "an adapter inserted with bias=False has none)")
        return super().transfer(ins, ch)


_FX_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_ONNX_PAD_MODES = ("reflect", "edge", "wrap")  # the same names as numpy.pad's


@dataclass
class Slice(_Layout):
    """Basic indexing by a tuple of slices (one per leading axis), channel axis untouched."""

    index: tuple[slice, ...]

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        shape = np.empty(v.shape, dtype=np.bool_)[self.index].shape

        def reduced(pos, cax):
            if cax < len(self.index) and self.index[cax].indices(v.shape[cax]) != (0, v.shape[cax], 1):
                raise NotAffine("slices the channel axis")
            return pos[self.index], cax

        return ch.relayout(v, shape, lambda p: p[self.index], reduced)


@dataclass
class Take(_Layout):
    """``np.take(x, index, axis)`` with a constant integer ``index`` of rank >= 1 (ONNX's Gather of positions:
    the dynamo exporter's ``x.unfold(d, 1, 1)``): positions picked, repeated or reordered along one axis other
    than the channel axis, ``index``'s axes in its place."""

    index: np.ndarray
    axis: int

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        if not v.rank:
            raise NotAffine("gathers from a scalar")
        a, n = self.axis % v.rank, v.shape[self.axis % v.rank]
        idx = np.where(self.index < 0, self.index + n, self.index)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise NotAffine("gathers outside the axis")
        shape = v.shape[:a] + idx.shape + v.shape[a + 1:]

        def reduced(pos, cax):
            if cax == a:
                raise NotAffine("gathers along the channel axis")
            return np.take(pos, idx, axis=a), cax if cax < a else cax + idx.ndim - 1

        return ch.relayout(v, shape, lambda p: np.take(p, idx, axis=a), reduced)


@dataclass
class Concat:
    """``cat`` of several values of one region along a non-channel axis; they must share one map."""

    axis: int
    heavy = False
    layout = True

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        first = ins[0]
        kernel = any(isinstance(v.M, Kernel) for v in ins)
        for v in ins[1:]:
            if v.source != first.source:
                raise NotAffine("concatenates values from different sources")
            same_map = v.M is first.M if kernel else _same(v.M, first.M)  # (kernel maps: one conv's)
            if not (same_map and _same(v.c, first.c)):
                raise NotAffine("concatenates values with different channel maps")
        if kernel:  # one conv's output, moved: the conv may start a region of its own instead
            raise KernelBlocked("concatenates a k×k conv's output")
        axis = self.axis % first.rank
        shape = list(first.shape)
        shape[axis] = sum(v.shape[axis] for v in ins)
        if first.source not in ch.axis:
            pos = np.concatenate([ch._full(v) for v in ins], axis=axis)
            return ch._canonical(Affine(first.source, tuple(shape), first.M, first.c, pos))
        forms = [ch.channel_form(v) for v in ins]
        if any(f.cax != forms[0].cax for f in forms) or forms[0].cax == axis:
            raise NotAffine("concatenates along the channel axis")
        pos = np.concatenate([f.pos if f.pos is not None else ch._identity_reduced(f.source) for f in forms], axis=axis)
        return ch._canonical(Affine(first.source, tuple(shape), first.M, first.c, pos, forms[0].cax))


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and a == b
    return a is b or (a.shape == b.shape and np.array_equal(a, b))


@dataclass
class Same(_Layout):
    """The identity; ``sticky`` when it is one only for the shapes seen (a pad by computed amounts),
    so a fold must replay it rather than drop it."""

    sticky: bool = False
    passes = True  # replayed along with the layout op before it (contiguous before a view)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        return ins[0]


# --- torch.fx --------------------------------------------------------------------------

_FX_SAME_METHODS = {"contiguous", "clone"}


@functools.cache
def _fx_reshapes() -> set:
    return {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", torch.reshape,
            torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


ONNX_OPS = frozenset({"Transpose", "Identity", "Dropout", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                      "Pad", "Slice", "Concat", "Gather", "Col2Im"})


def fx_keys() -> set:
    return {torch.cat, nn.Dropout, nn.Identity, nn.Flatten, *_FX_SAME_METHODS, "to", "type", F.dropout,
            *_fx_reshapes(), "transpose", torch.transpose, "permute", torch.permute, "roll", torch.roll, F.pad,
            operator.getitem, "unfold", torch.ops.aten.unfold.default, F.fold, torch.ops.aten.col2im.default}


def _fx_patches(node, ctx) -> bool:
    """Whether ``x.unfold(dim, 1, 1)`` or ``F.fold`` (ATen's ``col2im``) with 1-pixel patches, stride 1, no
    padding: a reshape (OFT's patches of a 1x1 conv's input, and back)."""
    t = node.target
    if t in ("unfold", torch.ops.aten.unfold.default):
        return len(node.args) == 4 and not node.kwargs and [ctx.value(a) for a in node.args[2:]] == [1, 1]
    names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    if set(args) - set(names):
        return False
    want = {"kernel_size": 1, "dilation": 1, "padding": 0, "stride": 1}
    return all((v := _ints(ctx, args.get(k, d))) is not None and set(v) == {d} for k, d in want.items())


def match_fx(node, ctx) -> Match | None:
    label = f"{node.name} ({_name(node.target)})"
    x = node.args[0] if node.args else None
    if node.op == "call_function" and node.target is torch.cat:
        axis = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if isinstance(x, (list, tuple)) and all(ctx.is_tensor(p) for p in x) and isinstance(axis, int):
            return Match(Concat(axis), tuple(x), label)
        return None
    if node.op == "call_module":
        m = ctx.module(node)
        if isinstance(m, (nn.Dropout, nn.Identity)) and torch_own(m):
            return Match(Same(), (x,), f"{node.target} ({type(m).__name__})")
        if isinstance(m, nn.Flatten) and torch_own(m) and ctx.shape(node) is not None:
            return Match(Reshape(ctx.shape(node)), (x,), f"{node.target} (Flatten)")
        return None
    if node.op not in ("call_method", "call_function") or not ctx.is_tensor(x):
        return None
    t = node.target
    if t in _FX_SAME_METHODS and len(node.args) == 1:
        return Match(Same(), (x,), label)
    if t == "to" or t == "type":
        if ctx.shape(node) is not None and ctx.dtype(node) == ctx.dtype(x):
            return Match(Same(), (x,), label)
        return None
    if t is F.dropout:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return Match(Same(), (x,), label) if training is False else None
    if t in _fx_reshapes() and ctx.shape(node) is not None:
        return Match(Reshape(ctx.shape(node)), (x,), label)
    if t in ("unfold", torch.ops.aten.unfold.default, F.fold, torch.ops.aten.col2im.default):
        return Match(Reshape(ctx.shape(node)), (x,), label) if ctx.shape(node) and _fx_patches(node, ctx) else None
    rank = ctx.rank(x)
    if t in ("transpose", torch.transpose) and len(node.args) == 3 and not node.kwargs:
        return Match(Permute(swap(rank, ctx.value(node.args[1]), ctx.value(node.args[2]))), (x,), label)
    if t in ("permute", torch.permute) and not node.kwargs:
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = [ctx.value(d) for d in dims]
        if all(isinstance(d, int) for d in dims):
            return Match(Permute(tuple(dims)), (x,), label)
        return None
    if t in ("roll", torch.roll):
        shifts = node.kwargs.get("shifts", node.args[1] if len(node.args) > 1 else None)
        dims = node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
        shifts, dims = _ints(ctx, shifts), _ints(ctx, dims)
        if shifts is None or dims is None or len(shifts) != len(dims):
            return None
        return Match(Roll(shifts, dims), (x,), label)
    if t is F.pad:
        arg = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        pads = _ints(ctx, arg)
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        if pads is not None and not any(pads) and isinstance(mode, str):
            literal = isinstance(arg, (tuple, list)) and all(isinstance(p, int) for p in arg)
            return Match(Same(sticky=not literal), (x,), label)
        rank = ctx.rank(x)
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        zeros = mode == "constant" and value in (None, 0, 0.0)
        if pads is not None and (mode in _FX_PAD_MODES or zeros) and len(pads) % 2 == 0 and len(pads) // 2 <= rank:
            pairs = [(pads[i], pads[i + 1]) for i in range(0, len(pads), 2)]  # last axis first
            widths = tuple([(0, 0)] * (rank - len(pairs)) + pairs[::-1])
            return Match(ZeroPad(widths) if zeros else CopyPad(widths, _FX_PAD_MODES[mode]), (x,), label)
        return None
    if t is operator.getitem:
        index = _slices(ctx, node.args[1])
        return None if index is None else Match(Slice(index), (x,), label)
    return None


def _ints(ctx, arg) -> tuple[int, ...] | None:
    """An int or a sequence of ints, literal or computed from shapes, as a tuple; else None."""
    if isinstance(arg, (tuple, list)):
        vals = [ctx.value(a) for a in arg]
    else:
        vals = [ctx.value(arg)]
    return tuple(vals) if all(isinstance(v, int) and not isinstance(v, bool) for v in vals) else None


def _slices(ctx, index) -> tuple[slice, ...] | None:
    parts = index if isinstance(index, tuple) else (index,)
    out = []
    for p in parts:
        if not isinstance(p, slice):
            return None
        bounds = [None if b is None else ctx.value(b) for b in (p.start, p.stop, p.step)]
        if any(b is not None and not isinstance(b, int) for b in bounds):
            return None
        out.append(slice(*bounds))
    return tuple(out)


# --- ONNX ------------------------------------------------------------------------------


def _reorders_unseen_axes(perm, shape, named: set[int]) -> bool:
    """Whether ``perm`` swaps two axes of size 1 to the engine, one of them a named (dynamic) size.

    The engine sees a named size as 1, and two size-1 axes in either order
    look the same, so it could not tell such a transpose from none.
    """
    if shape is None or not named:
        return False
    ones = [a for a in range(len(shape)) if shape[a] == 1]
    place = {a: perm.index(a) for a in ones}
    return any((a in named or b in named) and place[a] > place[b] for a in ones for b in ones if a < b)


def match_onnx(node, ctx) -> Match | None:
    op, x = node.op, (node.inputs[0] if node.inputs else None)
    label = f"{node.name} ({op})"
    if op == "Transpose":
        rank = ctx.rank(x)
        perm = node.attrs.get("perm")
        if perm is None and rank is not None:
            perm = list(reversed(range(rank)))
        if perm is None or _reorders_unseen_axes(perm, ctx.shape(x), ctx.named_axes(x)):
            return None
        return Match(Permute(tuple(perm)), (x,), label)
    if op in ("Identity", "Dropout") and (len(node.outputs) == 1 or not ctx.used(node.outputs[1])):
        return Match(Same(), (x,), label)
    if op == "Cast" and ctx.dtype(x) is not None and ctx.dtype(x) == ctx.dtype(node.outputs[0]):
        return Match(Same(), (x,), label)
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and ctx.const(x) is None:
        shape = ctx.shape(node.outputs[0])
        if shape is None or not _leading_named(ctx.named_axes(x), ctx.named_axes(node.outputs[0])):
            return None
        return Match(Reshape(shape), (x,), label)
    if op == "Pad":
        pads = ctx.raw_const(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is not None and not np.any(pads) and len(node.inputs) < 5:
            return Match(Same(), (x,), label)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        rank = ctx.rank(x)
        zeros = mode == "constant" and (len(node.inputs) < 3 or _zero(ctx, node.inputs[2]))
        if pads is None or (mode not in _ONNX_PAD_MODES and not zeros) or rank is None or len(node.inputs) > 3:
            return None
        pads = [int(p) for p in pads]
        if len(pads) != 2 * rank or any(pads[a] or pads[a + rank] for a in ctx.named_axes(x)):
            return None
        widths = tuple(zip(pads[:rank], pads[rank:]))
        return Match(ZeroPad(widths) if zeros else CopyPad(widths, mode), (x,), label)
    if op == "Slice":
        return _onnx_slice(node, ctx, label)
    if op == "Gather" and len(node.inputs) == 2 and ctx.const(x) is None:
        index, rank = ctx.raw_const(node.inputs[1]), ctx.rank(x)
        axis = node.attrs.get("axis", 0)
        if index is None or not np.issubdtype(index.dtype, np.integer) or index.ndim < 1 or rank is None \
                or axis % rank in ctx.named_axes(x) or ctx.shape(node.outputs[0]) is None:
            return None
        return Match(Take(np.asarray(index, dtype=np.int64), axis), (x,), label)
    if op == "Col2Im" and len(node.inputs) == 3 and ctx.shape(node.outputs[0]) is not None:
        block = ctx.raw_const(node.inputs[2])
        a = node.attrs
        ones = all(set(a.get(k, [1])) <= {1} for k in ("strides", "dilations")) and not any(a.get("pads", [0]))
        if block is not None and set(np.asarray(block).reshape(-1).tolist()) == {1} and ones:
            return Match(Reshape(ctx.shape(node.outputs[0])), (x,), label)  # 1-pixel patches summed back
        return None
    if op == "Concat" and len(node.inputs) > 1 and all(ctx.const(i) is None for i in node.inputs):
        rank = ctx.rank(x)
        if rank is None or any(node.attrs.get("axis", 0) % rank in ctx.named_axes(i) for i in node.inputs):
            return None  # the engine would see a named (dynamic) size as 1: it could not place the parts
        return Match(Concat(node.attrs.get("axis", 0)), tuple(node.inputs), label)
    return None


def _zero(ctx, value) -> bool:
    """Whether a Pad's ``constant_value`` input is omitted (an empty name) or a constant zero."""
    if not value.name:
        return True
    v = ctx.raw_const(value)
    return v is not None and v.size == 1 and not np.any(v)


def _leading_named(before: set[int], after: set[int]) -> bool:
    """Whether a reshape keeps its named (dynamic) sizes as the same leading axes (a dynamic batch).

    The engine sees a named size as 1: it can follow a reshape only where
    those axes stay where they are and are not merged or split.
    """
    return before == after and before == set(range(len(before)))


def _onnx_slice(node, ctx, label) -> Match | None:
    shape = ctx.shape(node.inputs[0])
    vals = [ctx.raw_const(i) for i in node.inputs[1:]]
    if shape is None or len(vals) < 2 or any(v is None for v in vals):
        return None
    starts, ends = vals[0], vals[1]
    axes = vals[2] if len(vals) > 2 else np.arange(len(starts))
    steps = vals[3] if len(vals) > 3 else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * len(shape)
    named = ctx.named_axes(node.inputs[0])
    for s, e, a, st in zip(starts, ends, axes, steps):
        if int(a) % len(shape) in named:
            return None  # the engine sees a named (dynamic) size as 1: it could not tell what the slice keeps
        index[int(a) % len(shape)] = slice(int(s), int(max(min(e, 2**62), -(2**62))), int(st))
    return Match(Slice(tuple(index)), (node.inputs[0],), label)
