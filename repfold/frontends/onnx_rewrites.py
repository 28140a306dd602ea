"""Rewrites of an ONNX graph around a fold: Reshapes written as a merge and a split for the algebra (and joined
again where the fold leaves them), and weight-only moves of stored values stored as weights."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from repfold.frontends.onnx_context import (
    OnnxContext,
    _drop_unread,
    _fresh,
    _read_names,
    _remove,
    _run_node,
    _stored_values,
)
from repfold.patterns.linear import block_matmul

# ops that only move a tensor's values (never round them: no Cast)
_DATA_MOVES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split", "Slice", "Concat", "Gather"}


def _store_moved_weights(graph: gs.Graph, ctx: OnnxContext, dead_before: set[int]) -> None:
    """Store as initializers the float weights the graph computes by moving stored values alone, where
    that stores no more values than the tensors it leaves unread, and drop their computation.

    The TorchScript exporter constant-folds such moves for an eager model, not for the graph ``insert``
    returns (nn.MultiheadAttention's packed projection: ``Split`` of ``in_proj_weight``, a ``Transpose`` of
    each part, ``Split`` of its bias): the folded model then has the base model's operators. The values
    are moved in their own dtype, bitwise what the runtime computes. The weights moved out of one tensor
    (both parts of a Split) are stored together or not at all; a tensor another op reads too stays, and
    what is moved out of it would be stored twice.
    """
    moves = _MovedWeights(graph, ctx)
    cands = moves.candidates(dead_before)
    groups = moves.affordable(cands)
    if groups:
        moves.store(groups, cands)
        _drop_unread(graph, dead_before)


class _MovedWeights:
    """The weights a graph moves out of stored tensors (see :func:`_store_moved_weights`)."""

    def __init__(self, graph: gs.Graph, ctx: OnnxContext) -> None:
        self.graph, self.ctx = graph, ctx
        self.top, self.outputs = {id(n) for n in graph.nodes}, {id(v) for v in graph.outputs}
        self.overridable = {v.name for v in ctx.proto.input}  # initializers listed as inputs: a caller may feed them
        self.inner, todo = set(), [a for n in graph.nodes for a in n.attrs.values() if isinstance(a, gs.Graph)]
        while todo:  # the names If / Loop bodies read
            sub = todo.pop()
            self.inner.update(i.name for n in sub.nodes for i in n.inputs)
            todo += [a for n in sub.nodes for a in n.attrs.values() if isinstance(a, gs.Graph)]
        self.moved = set()  # ids of the values moves compute from stored tensors alone
        for n in graph.nodes:  # topologically sorted
            if n.op in _DATA_MOVES and n.domain in ("", "ai.onnx", None) and n.inputs and all(
                    id(i) in self.moved or self.stored(i) is not None for i in n.inputs if i.name):
                self.moved.update(id(o) for o in n.outputs)

    def readers(self, v) -> list:  # (a value's consumers still list the nodes the fold removed)
        return [r for r in v.outputs if id(r) in self.top]

    def kept(self, v) -> bool:  # read by name: a graph output, or in a subgraph
        return id(v) in self.outputs or v.name in self.inner

    def stored(self, v) -> int | None:  # the values of a stored tensor (initializer, Constant node), else None
        if isinstance(v, gs.Constant):
            return None if v.name in self.overridable else int(np.prod(v.shape))
        value = v.inputs[0].attrs.get("value") if len(v.inputs) == 1 and v.inputs[0].op == "Constant" else None
        return int(np.prod(value.shape)) if isinstance(value, gs.Constant) else None

    def walk(self, var, data: bool) -> tuple[dict, dict]:
        """The nodes computing ``var`` and the stored tensors they read, by id; with ``data``, only the
        tensors whose values it moves (not a Reshape's shape, a Split's sizes, a Gather's indices)."""
        nodes, leaves, todo = {}, {}, [var]
        while todo:
            v = todo.pop()
            if self.stored(v) is not None:
                leaves[id(v)] = v
            elif id(v.inputs[0]) not in nodes:
                n = nodes[id(v.inputs[0])] = v.inputs[0]
                todo += [i for i in (n.inputs[:1] if data and n.op != "Concat" else n.inputs) if i.name]
        return nodes, leaves

    def candidates(self, dead_before: set[int]) -> dict:
        """The moved values an op other than a move reads (a layer, or arithmetic on weights alone: SigLIP's
        query ``probe @ W_qᵀ``): id -> (value, size, its nodes, its stored tensors, those it moves)."""
        cands = {}
        for n in self.graph.nodes:
            if id(n) in dead_before or any(id(o) in self.moved for o in n.outputs):
                continue
            for v in n.inputs:
                if id(v) not in self.moved or id(v) in cands or self.kept(v) or self.stored(v) is not None:
                    continue
                dims, (nodes, leaves), (_, data) = self.ctx.dims(v), self.walk(v, False), self.walk(v, True)
                if dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims) \
                        and np.issubdtype(self.ctx.dtype(next(iter(data.values()))), np.floating):
                    cands[id(v)] = (v, math.prod(int(d) for d in dims), nodes, leaves, data)
        return cands

    def affordable(self, cands: dict) -> list[list[int]]:
        """The groups of candidates (those moved out of one tensor) to store: ``cands`` loses the groups that
        would store more than they free, until none does."""
        groups: list[list[int]] = []
        while cands:
            nodes = {k: n for c in cands.values() for k, n in c[2].items()}
            gone = set()  # the nodes left unread once every candidate's readers read its stored value
            for n in reversed(self.graph.nodes):
                if id(n) in nodes and all(id(o) in cands or not self.kept(o) and all(id(r) in gone for r in self.readers(o))
                                          for o in n.outputs):
                    gone.add(id(n))
            freed = {}  # the moved tensors left unread: id -> (their values, the candidates moved out of them)
            for k, c in cands.items():
                for i, leaf in c[4].items():
                    if not self.kept(leaf) and all(id(r) in gone for r in self.readers(leaf)):
                        freed.setdefault(i, (self.stored(leaf), []))[1].append(k)
            groups, seen = [], set()
            for k in cands:
                if k not in seen:
                    seen.add(k)
                    group, todo = [], [k]
                    while todo:
                        group.append(todo.pop())
                        more = {o for i in cands[group[-1]][4] for o in freed.get(i, (0, ()))[1] if o not in seen}
                        seen |= more
                        todo += more
                    groups.append(group)
            costly = [g for g in groups if sum(cands[c][1] for c in g) >
                      sum(freed[i][0] for i in {i for c in g for i in cands[c][4] if i in freed})]
            if not costly:
                break
            for c in (c for g in costly for c in g):
                del cands[c]
        return groups if cands else []

    def store(self, groups: list[list[int]], cands: dict) -> None:
        """Each group's values, moved as the runtime would move them, as new initializers its readers read."""
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        place = {id(n): k for k, n in enumerate(self.graph.nodes)}
        for group in groups:
            values, new = {}, []
            for c in group:
                var, _, nodes, leaves, _ = cands[c]
                for leaf in leaves.values():
                    if leaf.name not in values:
                        values[leaf.name] = _stored_values(
                            leaf if isinstance(leaf, gs.Constant) else leaf.inputs[0].attrs["value"])
                for n in sorted(nodes.values(), key=lambda n: place[id(n)]):
                    if n.outputs[0].name not in values:
                        ins = {i.name: values[i.name] for i in n.inputs if i.name}
                        outs = _run_node(OnnxExporter.export_node(n), ins, self.ctx.weights.opsets) \
                            or [None] * len(n.outputs)
                        values.update({o.name: v for o, v in zip(n.outputs, outs)})
                like = var
                while self.stored(like) is None:  # named after (and typed like) the first tensor it moves
                    like = like.inputs[0].inputs[0]
                new.append((var, like, values[var.name]))
            if any(v is None or v.dtype != self.ctx.dtype(like) or v.size != cands[id(var)][1] for var, like, v in new):
                continue  # (not expected: the runtime moves them as onnx's reference does)
            for var, like, v in new:
                const = self.ctx.new_const(like, v)
                for r in self.readers(var):
                    for k in [k for k, i in enumerate(r.inputs) if i is var]:
                        r.inputs[k] = const


def _split_regroups(g: onnx.GraphProto, shapes: dict, dtypes: dict, known: dict) -> list[tuple[str, str, str]]:
    """Write some Reshapes as two, a merge of the last axes then the split, so that the value between holds
    the channels on one axis where the algebra needs it. ``shapes``, ``dtypes`` and ``known`` learn the new
    values; the new merges are ``(node, its output, its shape)`` names, for :func:`_join_regroups`, which
    joins them again where the fold leaves them.

    * A Reshape that regroups a value's last two axes for a block matmul, ``(..., h, d) -> (..., r, k)``:
      the dynamo exporter fuses an attention's head merge with PEFT's OFT block split into one Reshape.
      Only the merged value, ``h·d`` channels on one axis, is one a block rotation is a channel map of.
      From another rank or other leading sizes (OFT's patches of a conv's input, ``(B, H, W, C, 1, 1) ->
      (B·H·W, r, k)``, static sizes only) the merge is to ``(B·H·W, r·k)``, and the rotation's way back
      is a merge to ``(B·H·W, r·k)`` before its Reshape to another shape.
    * A Reshape that gives a value other leading sizes and splits its last axis at once, ``(B·N, C) ->
      (B, N, h, d)`` (static sizes): the dynamo exporter writes LeViT's BatchNorm1d over tokens,
      ``bn(x.flatten(0, 1)).reshape_as(x)``, then the attention's head split, as one. The merge to ``(B, N,
      C)`` lays the norm's output out as the layer before it, which it then folds into.
    """
    names = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {v.name for v in g.input}
    names |= {n.name for n in g.node}
    readers = Counter(i for n in g.node for i in n.input) + Counter(o.name for o in g.output)
    einsums = {n.input[0]: n for n in g.node if n.op_type == "Einsum" and len(n.input) == 2}
    made = []

    def merge(before: onnx.NodeProto, x: str, merged: tuple, spec: np.ndarray) -> None:
        """A Reshape of ``x`` to ``spec`` (``merged``, its shape) inserted before node ``before``, which reads it."""
        mid, spec_name, name = (_fresh(names, f"{x}_merged"), _fresh(names, f"{x}_merged_shape"),
                                _fresh(names, f"{before.name or 'Reshape'}_merge"))
        g.initializer.append(onnx.numpy_helper.from_array(spec, spec_name))
        at = next(i for i, b in enumerate(g.node) if b.output and b.output[0] == before.output[0])
        g.node.insert(at, onnx.helper.make_node("Reshape", [x, spec_name], [mid], name))
        before.input[0] = mid
        shapes[mid], dtypes[mid], known[spec_name], shapes[spec_name] = merged, dtypes.get(x), spec, spec.shape
        made.append((name, mid, spec_name))

    static = lambda *shape: all(isinstance(v, int) for v in shape)
    for k in reversed(range(len(g.node))):  # inserting before k leaves the nodes before it in place
        n = g.node[k]
        if n.op_type != "Reshape":
            continue
        before, after = shapes.get(n.input[0]), shapes.get(n.output[0])
        e = einsums.get(n.output[0]) if readers[n.output[0]] == 1 else None
        if before is None or after is None or len(after) < 3:
            continue
        if e is None:  # (B·N, C) -> (B, N, h, d): the merge to (B, N, C) first
            if static(*before, *after) and len(before) >= 2 and before[-1] == after[-2] * after[-1] \
                    and after[-2] > 1 and after[-1] > 1 and math.prod(before[:-1]) == math.prod(after[:-2]) \
                    and tuple(before[:-1]) != tuple(after[:-2]):
                merged = (*after[:-2], before[-1])
                merge(n, n.input[0], merged, np.array(merged, dtype=np.int64))
            continue
        eq = next((a.s.decode() for a in e.attribute if a.name == "equation"), "")
        (r, c), lead = after[-2:], before[:-2]
        if not (block_matmul(eq) and static(r, c)):
            continue
        same_lead = len(before) == len(after) and lead == after[:-2]
        if same_lead:  # (..., h, d) -> (..., r, c): the merge keeps the leading sizes as they are (0: the
            h, d = before[-2:]  # input's own size, allowzero off)
            if not (static(h, d) and h * d == r * c and (h, d) != (r, c)):
                continue
            merge(n, n.input[0], (*lead, h * d), np.array([0] * len(lead) + [h * d], dtype=np.int64))
        elif static(*before, *after) and math.prod(before) == math.prod(after) and tuple(before) != (*after[:-2], r * c):
            merge(n, n.input[0], (*after[:-2], r * c), np.array((*after[:-2], r * c), dtype=np.int64))
        else:
            continue
        out = e.output[0]  # and back: the rotation's output merged to (..., r·c) before a Reshape to another shape
        back = next((b for b in g.node if b.op_type == "Reshape" and b.input and b.input[0] == out), None)
        if same_lead or back is None or readers[out] != 1 or shapes.get(back.output[0]) == (*after[:-2], r * c):
            continue
        merge(back, out, (*after[:-2], r * c), np.array((*after[:-2], r * c), dtype=np.int64))
    return made


def _join_regroups(g: onnx.GraphProto, made: list[tuple[str, str, str]]) -> None:
    """Put each merge :func:`_split_regroups` made back into the Reshapes that read it, where the fold
    left it read by Reshapes alone (a row-major reshape of a reshape is one reshape)."""
    if not made:
        return
    outputs = {o.name for o in g.output}
    for name, mid, spec_name in made:
        at = next((k for k, n in enumerate(g.node) if n.name == name), None)
        readers = [n for n in g.node if mid in n.input]
        if at is None or mid in outputs or any(n.op_type != "Reshape" or list(n.input).index(mid) != 0 or
                                               list(n.input).count(mid) != 1 for n in readers):
            continue
        for n in readers:
            n.input[0] = g.node[at].input[0]
        del g.node[at]
    read = _read_names(g)
    _remove(g.initializer, lambda t: t.name in {s for _, _, s in made} and t.name not in read)
