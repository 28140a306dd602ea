"""The ONNX frontend: graph -> steps for the engine (read through onnx-graphsurgeon), and the plan
written back by editing the model proto in place."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from repfold.core import driver as _driver
from repfold.core import engine as _engine
from repfold.core.steps import OUTPUT
from repfold.frontends.onnx_context import _FLOATS, OnnxContext, _drop_unread, _live, _read_names, _remove
from repfold.frontends.onnx_rewrites import _join_regroups, _split_regroups, _store_moved_weights
from repfold.frontends.onnx_shapes import _infer
from repfold.patterns import onnx_rules
from repfold.report import FoldReport


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def n_weights(model: onnx.ModelProto) -> int:
    """Elements in initializers and Constant nodes (exporters store buffers as either)."""
    n = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.name == "value")
    return n


def n_params(model: onnx.ModelProto) -> int:
    """The values of the graph's initializers and of its float Constant nodes (an exporter may store a
    weight in one: the TorchScript exporter does for a weight it computes from another)."""
    consts = (a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer) + sum(
        int(np.prod(t.dims)) for t in consts if t.data_type in _FLOATS)


def fold_onnx(
    model: onnx.ModelProto, *, scales: bool = True, own: bool = False, pending: dict | None = None
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every adapter region of an ONNX model.

    The input proto is not modified, unless ``own`` says the caller hands it
    over (the command line does, to hold one copy of the weights, not two).
    With ``pending`` (a dict), new weights are left there by name, for a
    writer in ``onnx_io`` to take, instead of being copied into the proto.
    """
    report = FoldReport("onnx", ops_before=op_counts(model), params_before=n_params(model))
    if own:
        private = model
    else:
        private = onnx.ModelProto()
        private.CopyFrom(model)  # the fold edits the proto it is given
    shapes, dtypes, known = _infer(private)
    regroups = _split_regroups(private.graph, shapes, dtypes, known)
    graph = gs.import_onnx(private)  # initializer values stay in ``private``'s protos until read
    if len(graph.nodes) != len(private.graph.node):
        raise AssertionError("onnx-graphsurgeon imported a different node list")
    protos = {id(n): (n, p) for n, p in zip(graph.nodes, private.graph.node)}  # holding n keeps its id unique
    read_before = _read_names(private.graph)
    graph.toposort()
    live = _live(graph)
    dead_before = {id(n) for n in graph.nodes if id(n) not in live}
    ctx = OnnxContext(graph, private.graph, shapes, dtypes, known, pending=pending, opsets=model.opset_import)
    tensors = graph.tensors()

    steps, step_of = _driver.match(  # step_of: node id -> step name; weight-only values are constants, not ops
        [n for n in graph.nodes if id(n) not in ctx.weights.members], onnx_rules, lambda rule, node: rule.match_onnx(node, ctx), lambda c: c.outputs[0].name,
        lambda v: v.name)

    others: dict[str, gs.Node] = {}  # consumers no rule matched, by id

    def consumers(name: str) -> list[str]:
        var = tensors[name]
        out = []
        for c in var.outputs:
            if c.op != "Shape" and id(c) not in step_of:
                others[f"node:{id(c)}"] = c
            if c.op != "Shape":
                out.append(step_of.get(id(c), f"node:{id(c)}"))
        return out + ([OUTPUT] if id(var) in ctx.outputs else [])

    def label(name: str) -> str:
        if name.startswith("node:"):  # an op no rule knows: named with its type (and domain)
            c = others[name]
            what = f"{c.op}, {c.domain}" if c.domain not in ("", "ai.onnx", None) else c.op
            return f"{c.name} ({what})" if c.name else what
        var = tensors.get(name)
        if var is not None and var.inputs:
            return f"{var.inputs[0].name} ({var.inputs[0].op})"
        return name

    order = {}  # value name -> its producer's place in the (sorted) node list; graph inputs first
    for k, node in enumerate(graph.nodes):
        for v in node.outputs:
            order[v.name] = k

    def shape_reads(name: str) -> list[tuple[str, int]]:
        return [(f"{c.name} (Shape)" if c.name else "Shape", order.get(c.outputs[0].name, 0) if c.outputs else 0)
                for c in tensors[name].outputs if c.op == "Shape"]

    def shared(name: str) -> bool:  # a layer whose weight initializer another node reads too
        node = tensors[name].inputs[0] if tensors[name].inputs else None
        if node is not None and node.op == "Add" and node.inputs and node.inputs[0].inputs:
            node = node.inputs[0].inputs[0]  # a MatMul and its bias Add are one step
        if node is None or node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            return False
        return isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].outputs) > 1

    plan = _engine.plan(
        steps, consumers, lambda n: ctx.shape(tensors[n]), label, scales=scales,
        dtype=lambda n: ctx.dtype(tensors[n]), shape_reads=shape_reads, position=lambda n: order.get(n, -1),
        shared=shared,
    )
    ctx.release()  # the plan holds the new weights; the float64 copies of the old ones can go
    for s in steps:
        vars(s.op).pop("W", None)
    report.regions = plan.regions
    report.unseen = plan.unseen
    if not plan.folds:  # nothing to fold: the model as it came, not even re-sorted (bitwise the same run)
        _join_regroups(private.graph, regroups)
        report.ops_after, report.params_after = report.ops_before, report.params_before
        return private, report
    made_by = {name: tensors[name].inputs[0] for name in plan.members if tensors[name].inputs}  # before the rewrite
    _driver.rewrite(plan, steps, _OnnxEdits(ctx, graph, tensors, steps, made_by, dead_before), label, release=True)
    graph.toposort()
    _store_moved_weights(graph, ctx, dead_before)  # (no region: ``report.ops_after`` shows it)
    _write_back(graph, protos, private.graph, read_before | ctx.added)
    _join_regroups(private.graph, regroups)
    report.ops_after, report.params_after = op_counts(private), n_params(private)
    return private, report


def _write_back(
    graph: gs.Graph, protos: dict[int, tuple[gs.Node, onnx.NodeProto]], g: onnx.GraphProto, droppable: set[str]
) -> None:
    """Make ``g`` the folded ``graph`` by editing it in place.

    Nodes the fold kept are the input's own protos (attributes, subgraphs and
    doc strings untouched); new nodes are added (their initializers already
    are), and what the fold left unread is removed: initializers named in
    ``droppable`` (what the input read, and what the fold added), their
    graph-input entries (models that list initializers as inputs) and
    value_info. Weights that stay are never copied.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    produced_before = {o for _, p in protos.values() for o in p.output}
    rank, new = {}, []  # rank: id of a node proto -> its place in the folded order
    for k, node in enumerate(graph.nodes):
        if id(node) not in protos:
            new.append((k, OnnxExporter.export_node(node)))
            continue
        proto = protos[id(node)][1]
        names = [t.name for t in node.inputs]
        if list(proto.input) != names:  # a Shape node pointed at a value that stays
            del proto.input[:]
            proto.input.extend(names)
        rank[id(proto)] = k
    # upb hands out one wrapper per message while a reference is held (``protos`` holds them all),
    # so identities name the protos: drop the unread ones, append the new, sort into place.
    _remove(g.node, lambda p: id(p) not in rank)
    g.node.extend(p for _, p in new)
    added = list(g.node[len(g.node) - len(new):])
    rank.update({id(p): k for (k, _), p in zip(new, added)})
    g.node.sort(key=lambda p: rank[id(p)])
    del added

    read = _read_names(g)
    removed = set()
    for k in reversed(range(len(g.initializer))):
        name = g.initializer[k].name
        if name in droppable and name not in read:
            removed.add(name)
            del g.initializer[k]
    produced = {o for n in g.node for o in n.output}
    _remove(g.input, lambda v: v.name in removed)
    _remove(g.value_info, lambda v: v.name in produced_before and v.name not in produced)


class _OnnxEdits:
    """The graph edits of a fold (:class:`repfold.core.driver.Edits`) on an onnx-graphsurgeon graph."""

    def __init__(self, ctx: OnnxContext, graph: gs.Graph, tensors, steps, made_by, dead_before) -> None:
        self.ctx, self.graph, self.tensors = ctx, graph, tensors
        self.by_name = {s.name: s for s in steps}
        self.made_by, self.dead_before = made_by, dead_before
        self._present: set[int] | None = None

    def value(self, name: str):
        return self.tensors[name]

    def swap(self, pairs) -> _ById:
        return _ById(pairs)

    def emit(self, step, swap, W, b, *, producer: bool):
        return step.emit(swap, W, b)  # where it goes in the node list: the final toposort decides

    def copy_layout(self, name: str, ins: list, perm):
        if perm is not None:
            return self.ctx.new_node("Transpose", [ins[0]], {"perm": list(perm)}, like=self.tensors[name])
        node = self.tensors[name].inputs[0]
        swap = {id(self.tensors[old]): new for old, new in zip(self.by_name[name].inputs, ins)}
        return self.ctx.copy_node(node, [swap.get(id(i), i) for i in node.inputs])

    def replace(self, target: str, new) -> None:
        """The new node writes the target's own value (its name, so every reader and graph output)."""
        var = self.tensors[target]
        var.inputs.clear()
        producer = new.inputs[0]
        producer.outputs.clear()
        producer.outputs.append(var)

    def commit(self) -> None:
        pass  # every replacement took effect at once: a new node writes the old value itself

    def redirect(self, name: str, to) -> None:
        for node in [n for n in self.tensors[name].outputs if n.op == "Shape"]:
            node.inputs[0] = to

    def remove_unread(self) -> None:
        _drop_unread(self.graph, self.dead_before)

    def present(self, name: str) -> bool:
        if self._present is None:
            self._present = {id(n) for n in self.graph.nodes}
        return name in self.made_by and id(self.made_by[name]) in self._present

    def dtype(self, name: str):
        return self.ctx.dtype(self.tensors[name])


class _ById:
    """A mapping keyed by object identity (graph-surgeon values are not hashable)."""

    def __init__(self, pairs) -> None:
        self._m = {id(k): v for k, v in pairs}

    def get(self, key, default=None):
        return self._m.get(id(key), default)
