"""Embedding lookups: ``nn.Embedding``, ``F.embedding``, ATen's ``embedding``, ONNX ``Gather`` of a table.

A lookup of rows of a ``(V, C)`` table ``T`` by integer ids is the Linear
``y = Tᵀ·onehot(ids)``: its source is the ids read as one-hot vectors of
width ``V`` along a new last axis, which the graph never holds. Two lookups
of the same ids are then affine in one source, and so is what a channel map
makes of them (PEFT's LoRA on an embedding looks up ``A`` and multiplies by
``B``; DoRA scales both branches; OFT rotates the rows)::

    T[ids] + s·(A[ids] @ B)  =  (T + s·A·B)[ids]

A region whose source is such ids folds only into a lookup of them (the
table takes ``Mᵀ``, and the constant ``c`` is added to every row): no other
layer reads one-hot vectors, so any other absorber is refused by the
engine. A lookup that renormalises rows (``max_norm``) is not linear.
"""

from __future__ import annotations

import numpy as np

from repfold.core.affine import Affine, Channels, NotAffine, Product, cast

from ._base import Deferred, Match, fx_rebuild, numpy_dtype, resolve
from ._torch import F, fx, nn, torch
from .linear import Dense, _hint, _weight


class Lookup(Dense):
    """``y = T[ids]`` for a ``(V, C)`` table: the Dense ``Tᵀ`` (C×V) on the ids' one-hot vectors."""

    reads_ids = True

    def __init__(self, table: np.ndarray | Deferred, *, computed: bool = False, evaluable: bool = False) -> None:
        V, C = table.shape
        if isinstance(table, Deferred):
            stored = (lambda: table.stored().T) if table.stored else None
            weight = Deferred((C, V), lambda: np.ascontiguousarray(resolve(table).T), stored)
        else:
            weight = np.ascontiguousarray(table.T)
        super().__init__(weight, None, -1, kind="Embedding", computed=computed, evaluable=evaluable)

    @property
    def vocab(self) -> int:
        return self.weight.shape[1]

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        ids = ins[0]
        known = ch.tokens.get(ids.source)
        if not ids.is_identity or (known is None and ids.source in ch.axis) or known not in (None, self.vocab):
            raise NotAffine("an embedding reads token ids, not values of a region")
        rank = len(ids.shape)
        if known is None:  # the ids as one-hot vectors: a channel axis of width V after the ids' own axes
            ch.tokens[ids.source] = self.vocab
            ch.shapes[ids.source] = (*ids.shape, self.vocab)
            ch.axis[ids.source] = rank
        onehot = Affine(ids.source, (*ids.shape, self.vocab), cax=rank)
        return super().transfer([onehot], ch)

    def absorb(self, v: Affine, ch: Channels):
        if v.source not in ch.tokens:
            raise NotAffine("an embedding's table takes only a region of the token ids it looks up")
        return super().absorb(v, ch)


def table(W, b, dtype) -> np.ndarray:
    """The new ``(V, C)`` table for a lookup taking ``(W, b)`` (``W`` C×V), in ``dtype`` (NumPy's, or float64):
    computed in float64 and cast once."""
    if b is None or not np.any(b):
        return np.ascontiguousarray(cast(W, dtype, transpose=True) if isinstance(W, Product)
                                    else np.asarray(W).T.astype(dtype))
    T = cast(W, np.float64, transpose=True) if isinstance(W, Product) else np.asarray(W, dtype=np.float64).T
    return np.ascontiguousarray((T + np.asarray(b, dtype=np.float64)[None, :]).astype(dtype))


# --- torch.fx --------------------------------------------------------------------------

ONNX_OPS = frozenset({"Gather"})


def fx_keys() -> set:
    return {nn.Embedding, F.embedding, torch.ops.aten.embedding.default}


def _ids(ctx, x) -> bool:
    """Whether ``x`` is an integer tensor that varies (token ids, not a stored index buffer)."""
    dtype = ctx.dtype(x)
    return ctx.is_tensor(x) and dtype is not None and not dtype.is_floating_point and dtype != torch.bool \
        and not (isinstance(x, fx.Node) and x.op == "get_attr")


def match_fx(node, ctx) -> Match | None:
    if node.op == "call_module":
        m = ctx.module(node)
        if type(m) is not nn.Embedding or m.max_norm is not None or len(node.args) != 1 or node.kwargs \
                or not _ids(ctx, node.args[0]):
            return None
        op = Lookup(_weight(m.weight, tuple(m.weight.shape)))
        emit = fx_rebuild(node, ctx, lambda old, W, b: {"weight": table(W, b, numpy_dtype(old.weight) or np.float64)})
        return Match(op, (node.args[0],), f"{node.target} (Embedding)", emit=emit)
    if node.op != "call_function":
        return None
    if node.target is F.embedding:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        if args.get("max_norm") is not None:
            return None
    elif node.target is torch.ops.aten.embedding.default:
        names = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")
        args = dict(zip(names, node.args)) | dict(node.kwargs)
    else:
        return None
    ids, weight = args.get("input"), args.get("weight")
    T = ctx.const(weight)
    if not isinstance(T, np.ndarray) or T.ndim != 2 or not _ids(ctx, ids):
        return None
    computed = weight.op != "get_attr"
    op = Lookup(T, computed=computed, evaluable=computed and ctx.evaluable(weight, T.size))

    def emit(swap: dict, W, b):
        ref = ctx.dtype(weight)
        values = table(W, b, np.float64 if ref is None else numpy_dtype(torch.empty((), dtype=ref)) or np.float64)
        new = dict(args, input=swap.get(ids, ids), weight=ctx.new_param(_hint(weight), values, weight,
                                                                        shape=T.shape))
        return ctx.graph.call_function(node.target, tuple(new[k] for k in names if k in new))

    where = node.name if computed else weight.target.removesuffix(".weight")  # a stored table: its layer's path
    return Match(op, (ids,), f"{where} (embedding)", emit=emit)


# --- ONNX ------------------------------------------------------------------------------


def match_onnx(node, ctx) -> Match | None:
    """``Gather(table, ids, axis=0)`` of a float table (stored, or computed from stored tensors alone) by
    integer ids the graph computes or takes as input."""
    if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
        return None
    data, ids = node.inputs
    T = ctx.weight(data)
    dtype = ctx.dtype(ids)
    if T is None or len(T.shape) != 2 or ctx.raw_const(ids) is not None or dtype is None \
            or not np.issubdtype(np.dtype(dtype), np.integer) or ctx.rank(ids) is None:
        return None
    computed = ctx.computed(data)
    op = Lookup(T, computed=computed, evaluable=computed and ctx.evaluable(data, int(np.prod(T.shape))))

    def emit(swap: dict, W, b):
        values = table(W, b, np.float64)
        return ctx.copy_node(node, [ctx.new_const(data, values), swap.get(ids, ids)])

    return Match(op, (ids,), f"{node.name} (Gather)", (node,), emit)


__all__ = ["Lookup", "match_fx", "match_onnx", "table"]
