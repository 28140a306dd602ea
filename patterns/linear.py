"""Linear maps along one axis: ``nn.Linear``, ``F.linear``, 1×1 convolutions, ONNX MatMul/Gemm/Conv.

Transfer (the layer reads a region value ``v = M·x + c``)::

    W·v + b  ->  (W·M)·x + (W·c + b)

Absorb (the layer takes over a whole region whose exit is ``M·x + c``)::

    region(x) -> layer'(x) with W' = M, b' = c

A grouped 1×1 conv is the block-diagonal dense ``W`` it stands for; it
absorbs only an ``M`` that keeps those blocks (anything else would densify
it). A layer without a bias takes one for ``c ≠ 0`` (a Linear, a conv, a
Gemm: no new operator), except ONNX's bare MatMul, where a bias would be an
Add more: it absorbs only ``c = 0``, but in a region of the model's own
scales whose per-channel shift the Add replaces (LeViT's BatchNorm1d after
a bias-less Linear, as timm's merge turns it into a Linear with a bias).

A bias computed at run time (Swin V2's ``F.linear(x, W, b)`` with ``b`` a
copy of the qkv bias whose key slice is zeroed on every call) is no constant
the algebra can carry: such a layer (:class:`RuntimeBias`) ends a region, and
takes one on its input only where the region's constant is zero,
``W' = W·M`` with its bias input as it is. (``W·c`` would have to be added to
the computed bias: an op more, and Swin V2's zeroing would undo part of it.)
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from repfold.core.affine import (
    Affine,
    Channels,
    Kernel,
    LowRank,
    NotAffine,
    OnDemand,
    Product,
    cast,
    collapse_groups,
    expand_groups,
    matmul,
)

from ._base import Deferred, Match, fx_rebuild, numpy_dtype, resolve, stored, torch_own, weight_matvec
from ._torch import F, fx, nn, torch


@dataclass
class Dense:
    """``y = W·v + b`` along ``axis`` of a rank-``rank`` input; ``W`` is (out, in), float64.

    ``weight`` is ``W`` or a :class:`~._base.Deferred` that makes it when first needed.
    """

    weight: np.ndarray | Deferred
    b: np.ndarray | None
    axis: int
    groups: int = 1
    kind: str = "Linear"
    computed: bool = False  # its weight is computed at run time (PEFT's LoHa ΔW): an adapter's, not stored
    evaluable: bool = False  # computed, and storing it costs no more (HRA's W·H): a region even alone
    # a bias-less layer may take one without a new operator; ONNX's bare MatMul ("add") only with an Add more,
    # which it takes only in a region of the model's own scales whose shift op the Add replaces (a BatchNorm)
    takes_bias: bool | str = True
    bias_computed: bool = False  # a value computed at run time is added after it (ONNX's MatMul + Add of one)
    # a layer only an adapter has (OFT's rotation of a layer's input, its weight computed at run time): a region
    # even alone, so that where nothing can take it the report says so
    adapter_only: bool = False

    heavy = True

    @functools.cached_property
    def W(self) -> np.ndarray:
        return resolve(self.weight)

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        v = ch.require(ins[0], self.axis, self.kind)
        M = v.M
        plain = isinstance(M, float) and isinstance(v.c, float) and v.c == 0.0
        if plain and "W" not in vars(self) and self.groups == 1:
            # A scaled source (most of a backbone's own layers): the map is the weight itself, needed only
            # if a fold takes it. Kept as the product with a factored identity, it is read (and converted)
            # then, not for every layer of the model.
            n = self.weight.shape[1]
            M = LowRank(M, np.zeros((n, 0)), np.zeros((0, n)))
        if "W" in vars(self) or not isinstance(M, LowRank) or self.groups != 1:
            W = self.W
        else:
            # A factored map: multiply the weight as stored (float32, say) a block at a time, in float64,
            # and read it again when the product is written out rather than keep it.
            W = OnDemand(self.weight.shape, lambda: stored(self.weight), getattr(self.weight, "tensor", None))
        c = 0.0 if plain else self._times(W, v.c)
        return v.with_map(matmul(W, M), c if self.b is None else c + self.b, W.shape[0])

    def _times(self, W, c) -> np.ndarray:
        """``W·c``, kept for the next planning pass (which reaches this layer with the same constant)."""
        last = vars(self).get("_product")
        if last is not None and np.array_equal(last[0], c):
            return last[1]
        out = weight_matvec(W, c)
        self._product = (np.copy(c), out)
        return out

    def absorb(self, v: Affine, ch: Channels) -> tuple[np.ndarray | Product, np.ndarray | None]:
        """New ``(W, b)`` for this layer reading the source directly; NotAffine if it can't.

        ``W`` may be an unevaluated :class:`~repfold.core.affine.Product`: the
        frontend evaluates it straight into the model's dtype.
        """
        ch.require(v, self.axis, self.kind)
        shape = self.weight.shape
        if isinstance(v.M, Kernel):
            raise NotAffine(f"the region is a k×k conv's kernel map, which a {self.kind} cannot take")
        if isinstance(v.M, float) or v.M.shape != shape:
            got = "a scaled identity" if isinstance(v.M, float) else "x".join(map(str, v.M.shape))
            raise NotAffine(f"needs a {shape[0]}x{shape[1]} map, the region is {got}")
        M = v.M if isinstance(v.M, Product) and self.groups == 1 else np.asarray(v.M)
        if collapse_groups(M, self.groups) is None:
            raise NotAffine(densify_reason(self.groups, shape[1]))
        if self.b is None and self.bias_computed and np.any(v.c):
            raise NotAffine(no_constant_reason())
        if self.b is None and np.any(v.c) and (self.takes_bias is True or self.takes_bias == "add" and ch.shift_adds):
            return M, np.full(shape[0], v.c) if isinstance(v.c, float) else v.c
        return M, bias_for(v.c, self.b, shape[0], self.kind)


RUNTIME_BIAS = "its bias is computed at run time"


def no_constant_reason() -> str:
    return (f"{RUNTIME_BIAS}, so the region's constant W·c has no bias to go into; "
            "insert the adapter with bias=False (W·M alone folds)")


@dataclass
class RuntimeBias:
    """``y = W·v + b`` along ``axis``, ``b`` computed at run time (no constant): the bias input stays as it is.

    Its output is no affine map of its input with a constant shift, so a region ends here; the layer takes a
    region on its input (a forward fold, ``W' = W·M``) only where the region's constant ``c`` is zero: the
    constant ``W·c`` has no stored bias to go into (an adapter inserted with ``bias=False`` has none).
    """

    weight: np.ndarray
    axis: int
    kind: str = "Linear"

    heavy = True

    @property
    def W(self) -> np.ndarray:
        return self.weight

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        raise NotAffine(f"{RUNTIME_BIAS}: its output is no constant shift of its input")

    def absorb_input(self, v: Affine, ch: Channels, slots=(0,)) -> tuple[np.ndarray | Product, None]:
        v = ch.require(v, self.axis, self.kind)
        n = self.weight.shape[1]
        if isinstance(v.M, Kernel):
            raise NotAffine(f"the region is a k×k conv's kernel map, which a {self.kind} cannot take")
        if not isinstance(v.M, float) and v.M.shape != (n, n):
            raise NotAffine(f"needs a {n}x{n} map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
        if np.any(v.c):
            raise NotAffine(no_constant_reason())
        W = matmul(self.weight, v.M)
        return (np.asarray(W) if isinstance(W, LowRank) else W), None

    def absorb_output(self, v: Affine, ch: Channels) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotAffine(f"{RUNTIME_BIAS}: the region's map of it would have to be computed too")


def densify_reason(groups: int, channels: int) -> str:
    kind = "depthwise conv" if groups == channels else f"conv with {groups} groups"
    return f"would densify a {kind}: cost x{groups}"


def bias_for(c: np.ndarray | float, b: np.ndarray | None, out: int, kind: str) -> np.ndarray | None:
    """The absorbing layer's new bias ``c``, or None when it has none and ``c`` is zero."""
    c = np.full(out, c) if isinstance(c, float) else c
    if b is None:
        if np.any(c):
            raise NotAffine(f"{kind} has no bias to take the region's constant (an Add would be a new operator)")
        return None
    return c


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def _weight(t: torch.Tensor, shape) -> Deferred:
    """A layer's weight as ``shape``: float64 when first needed, or viewed in place as stored (CPU)."""
    shape = tuple(shape)
    if t.device.type == "cpu" and numpy_dtype(t) is not None:
        stored = lambda: t.detach().numpy().reshape(shape)
    elif t.is_floating_point() and t.dtype.itemsize < 4:  # bfloat16 (NumPy has none): float32 holds it exactly
        stored = lambda: t.detach().float().cpu().numpy().reshape(shape)
    else:
        stored = None
    return Deferred(shape, lambda: _np(t).reshape(shape), stored, lambda: t.detach().reshape(shape))


def _is_pointwise_conv(m: nn.Module) -> bool:
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not torch_own(m):
        return False
    unpadded = m.padding in ("valid", "same") or (
        not isinstance(m.padding, str) and all(p == 0 for p in m.padding)
    )
    return all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and unpadded


def _fx_params(m: nn.Module, W: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
    w = collapse_groups(W, m.groups) if isinstance(m, nn.modules.conv._ConvNd) else W
    return {"weight": w} if b is None else {"weight": w, "bias": b}


ONNX_OPS = frozenset({"MatMul", "Gemm", "Conv", "Reshape"})


def fx_keys() -> set:
    """What ``match_fx`` may match: module classes (subclasses too), functions and method names."""
    return {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, F.linear, torch.matmul, operator.matmul,
            "reshape", "view", torch.reshape}


def block_matmul(equation: str) -> bool:
    """Whether ``equation`` is ``...rk,rkc->...rc`` in any letters: a matmul per block ``r`` of the channels."""
    ins, _, out = equation.replace(" ", "").partition("->")
    a, _, b = ins.partition(",")
    if not (a.startswith("...") and out.startswith("...")):
        return False
    a, out = a[3:], out[3:]
    return len(a) == 2 and len(b) == 3 and len(set(b)) == 3 and b[:2] == a and out == b[0] + b[2]


def blocks(R: np.ndarray) -> np.ndarray:
    """The (out, in) weight of ``...rk,rkc->...rc`` with ``R`` (r, k, c) on channels split into r blocks of k:
    block-diagonal, block ``i`` being ``R[i]ᵀ``."""
    r, k, c = R.shape
    W = np.zeros((r * c, r * k))
    for i in range(r):
        W[i * c:(i + 1) * c, i * k:(i + 1) * k] = R[i].T
    return W


def _block_rotation(x_shape, split_shape, R, merged_shape) -> np.ndarray | None:
    """The weight of ``reshape(einsum('...rk,rkc->...rc', reshape(x, (..., r, k)), R), (..., r·c))`` (OFT's
    rotation of a layer's input, one block per ``k`` channels), or None where the shapes say otherwise."""
    if not isinstance(R, np.ndarray) or R.ndim != 3 or None in (x_shape, split_shape, merged_shape):
        return None
    r, k, c = R.shape
    lead = tuple(x_shape[:-1])
    if tuple(split_shape) != (*lead, r, k) or x_shape[-1] != r * k or tuple(merged_shape) != (*lead, r * c):
        return None
    return blocks(R)


def _fx_block_rotation(node, ctx) -> Match | None:
    """``x.reshape(..., r, k)`` read only by ``einsum('...rk,rkc->...rc', ·, R)`` with a constant ``R``, read only
    by a reshape back to ``(..., r·c)``: one channel map (PEFT's OFT), matched at the first reshape."""
    x = node.args[0] if node.args else None
    if len(node.users) != 1 or not isinstance(x, fx.Node) or ctx.const(x) is not None:
        return None
    e = next(iter(node.users))
    if e.op != "call_function" or getattr(e.target, "__name__", "").partition(".")[0] != "einsum" or e.kwargs:
        return None
    eq, *ops = e.args
    ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
    if not isinstance(eq, str) or len(ops) != 2 or ops[0] is not node or not block_matmul(eq) or len(e.users) != 1:
        return None
    back = next(iter(e.users))
    if back.op not in ("call_method", "call_function") or getattr(back.target, "__name__", back.target) not in (
            "reshape", "view") or back.args[0] is not e:
        return None
    W = _block_rotation(ctx.shape(x), ctx.shape(node), ctx.const(ops[1]), ctx.shape(back))
    if W is None:
        return None
    # never rebuilt: a Linear here would cost more
    op = Dense(W, None, len(ctx.shape(x)) - 1, computed=True, adapter_only=True)
    return Match(op, (x,), f"{e.name} (einsum {eq})", (node, e, back))


def match_fx(node, ctx) -> Match | None:
    if node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in (
            "reshape", "view"):
        return _fx_block_rotation(node, ctx)
    if node.op == "call_module":
        m = ctx.module(node)
        rank = ctx.rank(node.args[0])
        if rank is None:
            return None
        if isinstance(m, nn.Linear) and torch_own(m):
            op = Dense(_weight(m.weight, m.weight.shape), _np(m.bias), rank - 1)
        elif _is_pointwise_conv(m) and m.groups == 1:
            op = Dense(_weight(m.weight, (m.out_channels, m.in_channels)), _np(m.bias), 1, 1, "1x1 Conv")
        elif _is_pointwise_conv(m):
            w = _np(m.weight).reshape(m.out_channels, -1)
            op = Dense(expand_groups(w, m.groups), _np(m.bias), 1, m.groups, "1x1 Conv")
        else:
            return None
        return Match(op, (node.args[0],), f"{node.target} ({type(m).__name__})", emit=fx_rebuild(node, ctx, _fx_params))
    if node.op == "call_function" and node.target in (torch.matmul, operator.matmul) and len(node.args) == 2 \
            and not node.kwargs:
        # ``x @ R`` with a constant 2-D ``R`` (BOFT's rotation of its input): a Linear with weight ``Rᵀ``
        x, r = node.args
        R, rank = ctx.const(r), ctx.rank(x)
        if not isinstance(R, np.ndarray) or R.ndim != 2 or rank is None or rank < 2 or ctx.const(x) is not None:
            return None
        op = Dense(np.ascontiguousarray(R.T), None, rank - 1, computed=r.op != "get_attr",
                   evaluable=ctx.evaluable(r, R.size))
        return Match(op, (x,), f"{node.name} (matmul)", emit=_fx_matmul_emit(node, ctx))
    if node.op == "call_function" and node.target is F.linear:
        x, w = node.args[0], ctx.const(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        b = None if bias is None else ctx.const(bias)
        rank = ctx.rank(x)
        if not isinstance(w, np.ndarray) or w.ndim != 2 or rank is None:
            return None
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if bias is not None and b is None:  # a bias computed at run time (Swin V2's, its key slice zeroed)
            if not isinstance(bias, fx.Node) or ctx.shape(bias) != (w.shape[0],) or ctx.const(x) is not None:
                return None
            return Match(RuntimeBias(w, rank - 1), (x,), f"{node.name} (F.linear)", emit=_fx_runtime_bias_emit(node, ctx))
        op = Dense(w, b, rank - 1, computed=weight.op != "get_attr", evaluable=ctx.evaluable(weight, w.size))
        return Match(op, (x,), f"{node.name} (F.linear)", emit=_fx_linear_emit(node, ctx))
    return None


def _fx_linear_emit(node, ctx):
    """``emit`` for ``F.linear(x, weight, bias)`` whose weights are constants: new ones, same call."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")

    def emit(swap: dict, W: np.ndarray, b: np.ndarray | None):
        x = swap.get(node.args[0], node.args[0])
        w = ctx.new_param(_hint(weight), W, weight)
        if b is None:
            bn = None
        elif bias is None:  # a bias-less layer taking one
            bn = ctx.new_param(_hint(weight) + "_bias", b, weight, shape=(len(b),))
        else:
            bn = ctx.new_param(_hint(bias), b, bias)
        return ctx.graph.call_function(F.linear, (x, w, bn))

    return emit


def _fx_runtime_bias_emit(node, ctx):
    """``emit`` for ``F.linear(x, weight, bias)`` with a computed bias: a new weight, the same bias input."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs["bias"]

    def emit(swap: dict, W, b: None):
        x = swap.get(node.args[0], node.args[0])
        return ctx.graph.call_function(F.linear, (x, ctx.new_param(_hint(weight), W, weight), bias))

    return emit


def _fx_matmul_emit(node, ctx):
    """``emit`` for ``x @ R``: ``x @ R'`` with the new weight; with a bias, ``F.linear(x, W', b)``, as cheap."""
    x0, r = node.args

    def emit(swap: dict, W: np.ndarray, b: np.ndarray | None):
        x = swap.get(x0, x0)
        if b is None:  # the same op on a new ``R``: no operator changes kind (SwiftFormer's ``q @ w_g``)
            return ctx.graph.call_function(node.target, (x, ctx.new_param(_hint(r), cast(W, np.float64, transpose=True), r)))
        shape = tuple(reversed(ctx.shape(r)))
        w = ctx.new_param(_hint(r), W, r, shape=shape)
        bn = ctx.new_param(_hint(r) + "_bias", b, r, shape=(shape[0],))
        return ctx.graph.call_function(F.linear, (x, w, bn))

    return emit


def _hint(node) -> str:
    """A name for the new tensor that replaces ``node``'s: its path, or the name of the op computing it."""
    return node.target if node.op == "get_attr" else node.name


# --- ONNX ------------------------------------------------------------------------------


def _onnx_emit(nodes, ctx, kind: str):
    """Rebuild MatMul(+Add) / Gemm / Conv with new initializers; returns the new output."""

    def emit(swap: dict, W: np.ndarray | Product, b: np.ndarray | None):
        first, weight = nodes[0], nodes[0].inputs[1]
        new_input = swap.get(first.inputs[0], first.inputs[0])
        dtype = ctx.dtype(weight)
        if kind in ("MatMul", "Gemm"):
            transpose = kind == "MatMul" or not first.attrs.get("transB", 0)
            w = ctx.later(weight, W.shape[::-1] if transpose else W.shape, lambda: cast(W, dtype, transpose=transpose))
        else:  # Conv: back to (out, in/groups, 1, ...)
            w = cast(collapse_groups(W, first.attrs.get("group", 1)), dtype).reshape(ctx.value_shape(weight))
        ins = [new_input, ctx.new_const(weight, w)]
        if kind != "MatMul" and b is not None:  # a conv without a bias input takes one
            ins.append(ctx.new_const(first.inputs[2] if len(first.inputs) > 2 else weight, b))
        out = ctx.copy_node(first, ins)
        if len(nodes) == 2:  # MatMul + Add(bias), in the Add's own input order
            add, mm_out = nodes[1], first.outputs[0]
            out = ctx.copy_node(add, [out if i is mm_out else ctx.new_const(i, b) for i in add.inputs])
        elif kind == "MatMul" and b is not None:  # a bare MatMul taking a BatchNorm's shift: an Add replaces it
            out = ctx.new_node("Add", [out, ctx.new_const(weight, b)], {}, first.outputs[0])
        return out

    return emit


def _onnx_block_rotation(node, ctx) -> Match | None:
    """The ONNX form of :func:`_fx_block_rotation`: Reshape -> Einsum -> Reshape."""
    x, split = node.inputs[0], node.outputs[0]
    e = ctx.only_consumer(split)
    if e is None or e.op != "Einsum" or len(e.inputs) != 2 or e.inputs[0] is not split or ctx.weight(x) is not None:
        return None
    eq = e.attrs.get("equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    back = ctx.only_consumer(e.outputs[0])
    if not block_matmul(eq) or back is None or back.op != "Reshape" or back.inputs[0] is not e.outputs[0]:
        return None
    W = _block_rotation(ctx.shape(x), ctx.shape(split), ctx.const(e.inputs[1]), ctx.shape(back.outputs[0]))
    if W is None:
        return None
    # never rebuilt: a MatMul here would cost more
    op = Dense(W, None, len(ctx.shape(x)) - 1, computed=True, adapter_only=True)
    return Match(op, (x,), f"{e.name} (Einsum {eq})", (node, e, back))


def match_onnx(node, ctx) -> Match | None:
    op = node.op
    if op == "Reshape":
        return _onnx_block_rotation(node, ctx)
    if op == "MatMul":
        x, w = node.inputs
        W, rank = ctx.weight(w, lambda a: a.T), ctx.rank(x)
        if W is None or len(W.shape) != 2 or rank is None or rank < 2 or ctx.weight(x) is not None:
            return None
        covers, b, computed_bias = (node,), None, False
        nxt = ctx.only_consumer(node.outputs[0])
        if nxt is not None and nxt.op == "Add":
            other = next(i for i in nxt.inputs if i is not node.outputs[0])
            bv = ctx.const(other)
            if bv is not None and bv.size == W.shape[0] and bv.shape[-1] == W.shape[0] and bv.ndim <= rank:
                covers, b = (node, nxt), bv.reshape(-1)
            elif bv is None:  # a bias computed at run time (not from stored tensors alone): the Add stays
                sh = ctx.shape(other)  # (one value per channel: not a residual sum)
                computed_bias = bool(sh) and sh[-1] == W.shape[0] and all(n == 1 for n in sh[:-1]) \
                    and len(sh) <= rank and not ctx.named_axes(other)
        op = Dense(W, b, rank - 1, computed=ctx.computed(w), evaluable=ctx.evaluable(w, int(np.prod(W.shape))),
                   kind="MatMul", takes_bias="add", bias_computed=computed_bias)
        return Match(op, (x,), f"{node.name} (MatMul)", covers, _onnx_emit(covers, ctx, "MatMul"))
    if op == "Gemm":
        a = node.attrs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        W = ctx.weight(node.inputs[1], None if a.get("transB", 0) else (lambda B: B.T))
        C = ctx.const(node.inputs[2]) if len(node.inputs) > 2 else None
        if W is None or len(W.shape) != 2 or (len(node.inputs) > 2 and (C is None or C.size != W.shape[0])):
            return None
        op = Dense(W, None if C is None else C.reshape(-1), 1, computed=ctx.computed(node.inputs[1]),
                   evaluable=ctx.evaluable(node.inputs[1], int(np.prod(W.shape))))
        return Match(op, (node.inputs[0],), f"{node.name} (Gemm)", (node,), _onnx_emit((node,), ctx, "Gemm"))
    if op == "Conv":
        w = ctx.weight(node.inputs[1])
        a = node.attrs
        if w is None or len(w.shape) < 3 or any(k != 1 for k in w.shape[2:]):
            return None
        if any(s != 1 for s in a.get("strides", [1])) or any(p != 0 for p in a.get("pads", [0])):
            return None
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
            return None
        b = ctx.const(node.inputs[2]) if len(node.inputs) > 2 else None
        if len(node.inputs) > 2 and b is None:
            return None
        g = a.get("group", 1)
        flat = (w.shape[0], w.shape[1] * g)
        if g == 1:
            W = Deferred(flat, lambda: resolve(w).reshape(flat), lambda: stored(w).reshape(flat))
        else:
            W = Deferred(flat, lambda: expand_groups(resolve(w).reshape(w.shape[0], -1), g))
        computed = ctx.computed(node.inputs[1])
        op = Dense(W, b, 1, g, "1x1 Conv", computed, computed and ctx.evaluable(node.inputs[1], int(np.prod(w.shape))))
        return Match(op, (node.inputs[0],), f"{node.name} (Conv 1x1)", (node,), _onnx_emit((node,), ctx, "Conv"))
    return None
