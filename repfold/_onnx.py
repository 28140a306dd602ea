"""The ONNX frontend: graph -> steps for the engine, and the rewrite of a plan (onnx-graphsurgeon)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from repfold.patterns import RULES

from . import _engine
from ._report import FoldReport


class OnnxContext:
    """What the ONNX matchers in ``repfold.patterns`` may ask about a graph."""

    def __init__(self, graph: gs.Graph, ranks: dict[str, int]) -> None:
        self.graph, self.ranks = graph, ranks
        self.outputs = {id(v) for v in graph.outputs}
        self.names = set(graph.tensors())
        self.names.update(n.name for n in graph.nodes)

    def rank(self, var) -> int | None:
        if isinstance(var, gs.Constant):
            return len(var.shape)
        if var.shape is not None:
            return len(var.shape)
        return self.ranks.get(var.name)

    def const(self, var) -> np.ndarray | None:
        """The float64 value of a constant (initializer, Constant node, Identity of one), else None."""
        raw = self.raw_const(var)
        if raw is None or not np.issubdtype(raw.dtype, np.floating):
            return None
        return raw.astype(np.float64)

    def raw_const(self, var) -> np.ndarray | None:
        if isinstance(var, gs.Constant):
            return np.asarray(var.values)
        if len(var.inputs) == 1:
            producer = var.inputs[0]
            if producer.op == "Constant" and "value" in producer.attrs:
                value = producer.attrs["value"]
                return np.asarray(value.values) if isinstance(value, gs.Constant) else None
            if producer.op == "Identity":
                return self.raw_const(producer.inputs[0])
        return None

    def used(self, var) -> bool:
        return bool(var.outputs) or id(var) in self.outputs

    def only_consumer(self, var):
        if len(var.outputs) == 1 and id(var) not in self.outputs:
            return var.outputs[0]
        return None

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def new_const(self, like, values: np.ndarray) -> gs.Constant:
        """A new initializer named after ``like``, in ``like``'s dtype (cast once from float64)."""
        dtype = self.raw_const(like).dtype
        return gs.Constant(self.unique(f"{like.name}_folded"), np.ascontiguousarray(np.asarray(values).astype(dtype)))

    def copy_node(self, node: gs.Node, inputs: list) -> gs.Variable:
        out = gs.Variable(self.unique(f"{node.outputs[0].name}_folded"), dtype=node.outputs[0].dtype)
        new = gs.Node(node.op, self.unique(f"{node.name or node.op}_folded"), dict(node.attrs), list(inputs), [out], domain=node.domain)
        self.graph.nodes.append(new)
        return out


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value shape inference can tell, without copying weight data.

    Initializers are handed to the inferencer as typed inputs, so it sees
    their shapes but not their bytes (fast, and fine for models over 2 GB).
    """
    g = model.graph
    light = onnx.helper.make_graph(
        list(g.node),
        g.name,
        [*g.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in g.initializer)],
        list(g.output),
        value_info=list(g.value_info),
    )
    probe = onnx.helper.make_model(light, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
    except Exception:  # shape inference is a help, not a requirement
        inferred = light
    out = {}
    for vi in [*inferred.input, *inferred.output, *inferred.value_info]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _keep_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, f, getattr(src, f))
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every adapter region of an ONNX model; the input proto is not modified."""
    report = FoldReport("onnx", ops_before=op_counts(model), params_before=n_params(model))
    private = onnx.ModelProto()
    private.CopyFrom(model)  # onnx-graphsurgeon writes into the protos it imports
    graph = gs.import_onnx(private)
    graph.toposort()
    ctx = OnnxContext(graph, _ranks(model))
    tensors = graph.tensors()

    steps, step_of = [], {}  # step_of: node id -> step name
    for node in graph.nodes:
        if id(node) in step_of:
            continue
        for rule in RULES:
            m = rule.match_onnx(node, ctx)
            if m is not None:
                covers = m.covers or (node,)
                name = covers[-1].outputs[0].name
                steps.append(_engine.Step(name, m.op, tuple(v.name for v in m.inputs), m.label, m.emit))
                step_of.update({id(c): name for c in covers})
                break

    def consumers(name: str) -> list[str]:
        var = tensors[name]
        out = [step_of.get(id(c), f"node:{c.name}") for c in var.outputs]
        return out + ([_engine.OUTPUT] if id(var) in ctx.outputs else [])

    def label(name: str) -> str:
        if name.startswith("node:"):
            return name[5:]
        var = tensors.get(name)
        if var is not None and var.inputs:
            return f"{var.inputs[0].name} ({var.inputs[0].op})"
        return name

    plan = _engine.plan(steps, consumers, lambda n: ctx.rank(tensors[n]), label)
    report.regions = plan.regions
    emitters = {s.name: s.emit for s in steps}
    for f in plan.folds:
        exit_var = tensors[f.exit]
        new_out = emitters[f.absorber](tensors[f.source], f.W, f.b)
        exit_var.inputs.clear()
        producer = new_out.inputs[0]
        producer.outputs.clear()
        producer.outputs.append(exit_var)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    _keep_model_fields(model, out)
    report.ops_after, report.params_after = op_counts(out), n_params(out)
    return out, report
