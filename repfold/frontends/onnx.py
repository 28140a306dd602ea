"""The ONNX frontend: graph -> steps for the engine (read through onnx-graphsurgeon), and the plan
written back by editing the model proto in place."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from repfold.core import driver as _driver
from repfold.core import engine as _engine
from repfold.core import graph as _graph
from repfold.core.steps import OUTPUT
from repfold.frontends.onnx_io import ANCHORED, PLAIN_DTYPES, Later, left_out, mark_pending, read_external
from repfold.patterns import onnx_rules
from repfold.patterns._base import Deferred
from repfold.patterns.linear import block_matmul
from repfold.report import FoldReport

# Ops whose value ``raw_const`` computes when all their inputs are constants and
# the result is integer: the shape and index arithmetic exporters emit (pad
# amounts built by Concat / ConstantOfShape / Transpose / Cast, and the like).
_INDEX_ARITHMETIC = {
    "Cast", "Concat", "ConstantOfShape", "Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Gather",
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Range", "Expand", "Flatten", "Abs", "Min", "Max", "Tile",
    # comparisons on shapes (TorchScript exports a Python ``if`` on a shape as an If node)
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Where",
}
_EVALUATE_LIMIT = 4096  # elements in all inputs: never weights
# Never part of a weight-only value: draws, and ops that hold graphs of their own.
_NOT_CONSTANT = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
                 "Dropout", "If", "Loop", "Scan", "SequenceMap"}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


# ops that only move or cast a tensor's values
_MOVES = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Constant"}


class WeightOnly:
    """The values of an ONNX graph computed from initializers and constants alone, and their float64 values
    on demand.

    A fold reads such a value as the constant it is (PEFT's LoHa ``ΔW``, VeRA's scaled shared matrices,
    the Householder product of HRA, as an exporter left them): each node is run by onnx's reference
    runtime on float64 inputs, with every cast to a floating type made a cast to double, so the value is
    cast once, when the fold writes it into a layer. Nothing changes unless a fold uses the value; its
    nodes then go with the other ops the fold made unread.
    """

    def __init__(self, graph: gs.Graph, proto: onnx.GraphProto, opsets) -> None:
        self.members: set[int] = set()  # ids of the nodes computing weight-only values
        self.names: set[str] = set()
        for node in graph.nodes:  # topologically sorted
            if node.domain not in ("", "ai.onnx", None) or node.op in _NOT_CONSTANT or not node.outputs:
                continue
            if (node.inputs or node.op == "Constant") and all(
                    isinstance(i, gs.Constant) or not i.name or i.name in self.names for i in node.inputs):
                self.members.add(id(node))
                self.names.update(o.name for o in node.outputs)
        self.proto, self.opsets = proto, opsets
        self._tensors = graph.tensors()
        self._values: dict[str, np.ndarray | None] = {}
        self._made_by: dict[str, tuple[int, onnx.NodeProto]] | None = None  # output -> (place, node)

    def value(self, var, read) -> np.ndarray | None:
        """The value of weight-only ``var`` (float64 if floating; None if it is not one or cannot be
        evaluated); ``read(constant)`` gives an initializer's stored values."""
        if var.name not in self.names:
            return None
        if self._made_by is None:
            self._made_by = {o: (k, n) for k, n in enumerate(self.proto.node) for o in n.output if o}
        need, todo = {}, [var.name]
        while todo:  # the nodes ``var`` depends on, not yet evaluated
            name = todo.pop()
            made = self._made_by.get(name)
            if name in self._values or made is None or made[0] in need:
                continue
            need[made[0]] = made[1]
            todo.extend(i for i in made[1].input if i)
        for k in sorted(need):
            self._run(need[k], read)
        return self._values.get(var.name)

    def _run(self, n: onnx.NodeProto, read) -> None:
        import onnx.numpy_helper as nh

        ins = {}
        for i in n.input:
            if not i:
                continue
            if i not in self._values:  # an initializer
                t = self._tensors.get(i)
                self._values[i] = _double(read(t)) if isinstance(t, gs.Constant) else None
            ins[i] = self._values[i]
        if any(v is None for v in ins.values()):
            self._values.update(dict.fromkeys(n.output))
            return
        node = onnx.NodeProto()
        node.CopyFrom(n)
        for a in node.attribute:  # casts to floats and float-typed makers: float64
            if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in _FLOATS:
                a.i = onnx.TensorProto.DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _FLOATS:
                a.t.CopyFrom(nh.from_array(_double(nh.to_array(a.t)), a.t.name))
        outs = _run_node(node, ins, self.opsets)
        named = [o for o in n.output if o]
        self._values.update({o: None if v is None else _double(v) for o, v in zip(named, outs or [None] * len(named))})


def _double(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _run_node(n: onnx.NodeProto, inputs: dict[str, np.ndarray], opsets) -> list[np.ndarray] | None:
    """``n``'s outputs, run alone by onnx's reference runtime on ``inputs`` (by name); None if it cannot."""
    import onnx.numpy_helper as nh
    from onnx.reference import ReferenceEvaluator

    one = onnx.helper.make_graph(
        [n], "one", [], [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                         for o in n.output if o],
        [nh.from_array(v, name) for name, v in inputs.items()])
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(onnx.helper.make_model(one, opset_imports=opsets)).run(
            None, {})]
    except Exception:  # noqa: BLE001 (an op the reference runtime does not know: no value)
        return None


class _Shapes:
    """Shapes and dtypes of a graph's values: what the graph declares and what inference tells."""

    shapes: dict[str, tuple]
    dtypes: dict[str, int]

    def dims(self, var) -> tuple | None:
        """``var``'s dims as the graph declares them (its value_info, a graph output's type) or as
        inference tells them, whichever knows an axis's size: an exporter may name the sizes of an output
        it could tell (the TorchScript exporter's ``Mul72_dim_2``), which would read as dynamic."""
        if isinstance(var, gs.Constant):
            return tuple(var.shape)
        declared, inferred = var.shape, self.shapes.get(var.name)
        if declared is None or inferred is None or len(declared) != len(inferred):
            return tuple(declared) if declared is not None else inferred
        return tuple(i if isinstance(i, (int, np.integer)) and i >= 0 else d for d, i in zip(declared, inferred))

    def rank(self, var) -> int | None:
        dims = self.dims(var)
        return None if dims is None else len(dims)

    def shape(self, var) -> tuple[int, ...] | None:
        """The static shape of ``var``, a named (dynamic) dim counted as 1; None if any dim is unknown."""
        dims = self.dims(var)
        if dims is None:
            return None
        out = []
        for d in dims:
            if isinstance(d, (int, np.integer)) and d >= 0:
                out.append(int(d))
            elif isinstance(d, str):
                out.append(1)
            else:
                return None
        return tuple(out)

    def named_axes(self, var) -> set[int]:
        """Axes of ``var`` whose size is a name (dynamic): :meth:`shape` counts them as 1."""
        dims = None if isinstance(var, gs.Constant) else self.dims(var)
        return {a for a, d in enumerate(dims or ()) if isinstance(d, str)}

    def dtype(self, var):
        if isinstance(var, gs.Constant):
            return np.dtype(var.dtype)  # without loading the values
        if self.dtypes.get(var.name):
            return onnx.helper.tensor_dtype_to_np_dtype(self.dtypes[var.name])
        return var.dtype


class _Constants:
    """Constant values, in float64 for the algebra: stored ones (initializers, Constant nodes), small index
    arithmetic on them, and weight-only values computed from them alone (:class:`WeightOnly`)."""

    known: dict[str, np.ndarray]
    weights: WeightOnly
    outputs: set[int]

    def const(self, var) -> np.ndarray | None:
        """The float64 value of a constant (initializer, Constant node, Identity of one), else None.

        Converted once per tensor and shared: callers must not write to it.
        """
        key = id(var)
        if key not in self._float64:
            raw = self.raw_const(var)
            ok = raw is not None and np.issubdtype(raw.dtype, np.floating)
            self._float64[key] = raw.astype(np.float64) if ok else None
        return self._float64[key]

    def release(self) -> None:
        """Drop the float64 weights and computed values kept for matching."""
        self._float64.clear()
        self.weights._values.clear()

    def weight(self, var, transform=None):
        """A float constant as a :class:`~repfold.patterns._base.Deferred` float64 array, else None.

        ``transform`` (a transpose, say) is applied when the array is made;
        the shape it will have is worked out now without converting anything.
        """
        if isinstance(var, gs.Constant):  # an initializer: shape and dtype without loading its values
            dims, dtype = tuple(var.shape), np.dtype(var.dtype)
        else:
            raw = self.raw_const(var)
            if raw is None:
                return None
            dims, dtype = raw.shape, raw.dtype
        if not np.issubdtype(dtype, np.floating):
            return None
        shape = dims if transform is None else transform(np.broadcast_to(np.empty((), dtype=np.bool_), dims)).shape  # a view: no memory
        same = transform or (lambda a: a)
        return Deferred(tuple(shape), lambda: same(self.const(var)), lambda: same(self.raw_const(var)))

    def raw_const(self, var) -> np.ndarray | None:
        if isinstance(var, gs.Constant):
            return _stored_values(var)
        if len(var.inputs) == 1:
            producer = var.inputs[0]
            if producer.op == "Constant" and "value" in producer.attrs:
                value = producer.attrs["value"]
                return np.asarray(value.values) if isinstance(value, gs.Constant) else None
            if producer.op == "Identity":
                return self.raw_const(producer.inputs[0])
            if producer.op in _INDEX_ARITHMETIC and var.name in self.known:
                return self.known[var.name]
        return self.weights.value(var, _stored_values)

    def value_shape(self, var) -> tuple[int, ...]:
        """The shape of constant ``var`` (an initializer's without loading it; a computed one's value's)."""
        return tuple(var.shape) if isinstance(var, gs.Constant) else self.raw_const(var).shape

    def computed(self, var) -> bool:
        """Whether ``var`` is a weight-only value computed by ops (PEFT's LoHa ``ΔW``), not a stored one."""
        if isinstance(var, gs.Constant) or var.name not in self.weights.names:
            return False
        producer = var.inputs[0] if len(var.inputs) == 1 else None
        if producer is not None and producer.op == "Constant":  # a stored tensor, in a node
            return False
        if producer is not None and producer.op == "Identity" and producer.inputs:
            return self.computed(producer.inputs[0])
        return True

    def evaluable(self, var, size: int) -> bool:
        """Whether computed ``var`` (of ``size`` values) may be stored in place of its computation at no
        more cost: the stored tensors it is computed from, that nothing else reads, hold at least as many
        values (HRA's weight and its reflections; not a model's own factored ``A @ B``, nor a weight
        computed from a tensor other layers share)."""
        if not self.computed(var):
            return False
        nodes, ops, leaves, todo = set(), set(), {}, [var]  # leaves: the stored tensors (initializers, Constants)
        producers = []
        while todo:
            v = todo.pop()
            producer = v.inputs[0] if isinstance(v, gs.Variable) and len(v.inputs) == 1 else None
            value = producer.attrs.get("value") if producer is not None and producer.op == "Constant" else None
            if isinstance(v, gs.Constant) or isinstance(value, gs.Constant):
                leaves[id(v)] = (v, v.shape if isinstance(v, gs.Constant) else value.shape)
            elif producer is not None and id(producer) not in nodes:
                nodes.add(id(producer))
                producers.append(producer)
                ops.add(producer.op)
                todo.extend(producer.inputs)
        if len(var.outputs) != 1 or id(var) in self.outputs:
            return False  # read by more than one layer: storing it for each would cost more
        if any(id(c) not in nodes for p in producers if p is not var.inputs[0] for o in p.outputs for c in o.outputs):
            return False  # a step of the computation that other ops read too
        if ops <= _MOVES:  # a stored weight laid out another way (``x @ Wᵀ``): no computation to remove
            return False
        own = [shape for leaf, shape in leaves.values() if all(id(c) in nodes for c in leaf.outputs)]
        return sum(int(np.prod(shape)) for shape in own) >= size


class _Writer:
    """The graph edits a fold makes: new initializers (into the proto, or left ``pending`` for the file
    writer), new nodes and copies, under names the graph does not hold yet."""

    graph: gs.Graph
    proto: onnx.GraphProto
    names: set[str]
    added: set[str]
    pending: dict[str, np.ndarray] | None

    def used(self, var) -> bool:
        return bool(var.outputs) or id(var) in self.outputs

    def only_consumer(self, var):
        if len(var.outputs) == 1 and id(var) not in self.outputs:
            return var.outputs[0]
        return None

    def unique(self, base: str) -> str:
        return _fresh(self.names, base)

    def new_const(self, like, values: np.ndarray) -> gs.Constant:
        """A new initializer named after ``like``, in ``like``'s dtype (cast once from float64).

        It goes into the model proto at once, so ``values`` need not be kept;
        or, with ``pending``, its array goes there and the proto only names it.
        """
        from onnx_graphsurgeon.ir.tensor import LazyValues

        name = self.unique(f"{like.name}_folded")
        tensor = self.proto.initializer.add()
        self.added.add(name)
        later = isinstance(values, Later)  # made when written: nothing reads its values before
        if not later:
            values = np.ascontiguousarray(np.asarray(values).astype(self.dtype(like), copy=False))
        if self.pending is not None:
            mark_pending(tensor, name, values)
            self.pending[name] = values
            return gs.Constant(name, LazyValues(tensor) if later else values)
        _fill_tensor(tensor, name, values)
        return gs.Constant(name, LazyValues(tensor))

    def later(self, like, shape: tuple[int, ...], make):
        """``make()`` (a new weight in ``like``'s dtype, of ``shape``), or, where the command line writes a
        data file and ``like`` is read from one, a :class:`~repfold.frontends.onnx_io.Later` that makes it as it is
        written: the fold's products are computed while the tensors before them are written, and never
        all held at once. (``make`` reads ``like``'s file again then: the input's files stay.)"""
        tensor = _stored_tensor(like)
        if self.pending is None or tensor is None or left_out(tensor) != ANCHORED:
            return make()
        return Later(shape, self.dtype(like), make)

    def new_node(self, op: str, inputs: list, attrs: dict, like: gs.Variable) -> gs.Variable:
        """A new node whose output is named after (and typed like) ``like``."""
        out = gs.Variable(self.unique(f"{like.name}_folded"), dtype=like.dtype)
        self.graph.nodes.append(gs.Node(op, self.unique(f"{op}_folded"), attrs, list(inputs), [out]))
        return out

    def copy_node(self, node: gs.Node, inputs: list) -> gs.Variable:
        out = gs.Variable(self.unique(f"{node.outputs[0].name}_folded"), dtype=node.outputs[0].dtype)
        new = gs.Node(node.op, self.unique(f"{node.name or node.op}_folded"), dict(node.attrs), list(inputs), [out], domain=node.domain)
        self.graph.nodes.append(new)
        return out


class OnnxContext(_Shapes, _Constants, _Writer):
    """What the ONNX matchers in ``repfold.patterns`` may ask about a graph (its shapes, its constants), and
    the edits a fold makes in it."""

    def __init__(
        self, graph: gs.Graph, proto: onnx.GraphProto, shapes: dict[str, tuple], dtypes: dict[str, int],
        known: dict[str, np.ndarray], pending: dict[str, np.ndarray] | None = None, opsets=(),
    ) -> None:
        self.graph, self.proto, self.shapes, self.dtypes = graph, proto, shapes, dtypes
        self.known = known  # small constants and the integer index arithmetic on them, by value name
        self.added: set[str] = set()  # initializers the fold wrote into ``proto``
        self.pending = pending  # where new weights go instead of the proto, if given (see ``onnx_io``)
        self.outputs = {id(v) for v in graph.outputs}
        self.names = set(graph.tensors())
        self.names.update(n.name for n in graph.nodes)
        self._float64: dict[int, np.ndarray | None] = {}
        self.weights = WeightOnly(graph, proto, list(opsets))


def _fresh(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``names`` (which then holds it)."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _stored_tensor(var) -> onnx.TensorProto | None:
    """The initializer proto behind a constant whose values are not loaded yet, else None."""
    tensor = getattr(getattr(var, "_values", None), "tensor", None)
    return tensor if isinstance(tensor, onnx.TensorProto) else None


def _stored_values(var: gs.Constant) -> np.ndarray:
    """An initializer's values, read-only, in one copy of its bytes and not cached on ``var``.

    (``Constant.values`` makes two copies and keeps one for the graph's lifetime.)
    """
    tensor = _stored_tensor(var)
    if tensor is not None and left_out(tensor) == ANCHORED:  # left on disk by the command line
        return read_external(tensor)
    if tensor is not None and tensor.data_type in PLAIN_DTYPES and tensor.raw_data \
            and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return np.frombuffer(tensor.raw_data, dtype=PLAIN_DTYPES[tensor.data_type]).reshape(tuple(tensor.dims))
    return np.asarray(var.values)


def _infer(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int], dict[str, np.ndarray]]:
    """Shape (ints, names of dynamic dims, None) and element type of every value inference can tell, and
    the small values known without running the model.

    Initializers are handed to the inferencer as typed inputs, so it sees
    their shapes but not their bytes (fast, and fine for models over 2 GB).
    Where inference stops short (a Python ``if`` on shapes, a Mod in a
    window's padding: SAM2's Hiera), one more pass in graph order settles
    each node's shapes from its inputs' and the small values known by then.
    """
    g = model.graph
    small = _index_constants(model)  # pad amounts and the like: given as values, so shapes come out static
    light = onnx.helper.make_graph(
        [n for n in g.node if not (n.output and all(o in small for o in n.output))],
        g.name,
        [*g.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                     for t in g.initializer if t.name not in small)],
        list(g.output),
        [onnx.numpy_helper.from_array(v, name) for name, v in small.items()],
        value_info=list(g.value_info),
    )
    probe = onnx.helper.make_model(light, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph
    except Exception:  # noqa: BLE001 (shape inference is a help, not a requirement)
        inferred = light
    # values given to the inferencer as constants: their own shapes and types
    shapes = {name: v.shape for name, v in small.items()}
    dtypes = {name: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for name, v in small.items()}
    for vi in [*inferred.input, *inferred.output, *inferred.value_info]:
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                for d in t.shape.dim
            )
    inputs = {d.dim_param for v in g.input for d in v.type.tensor_type.shape.dim if d.HasField("dim_param")}
    if any(_unsettled(shapes.get(o), inputs) for n in g.node for o in n.output if o and o not in small):
        small = _index_constants(model, shapes, dtypes, inputs, known=small)
    return shapes, dtypes, small


def _unsettled(dims, inputs: set[str]) -> bool:
    """A shape inference left unknown, or with a dimension named by the inferencer, not by the model."""
    return dims is None or any(d is None or isinstance(d, str) and d not in inputs for d in dims)


def _index_constants(
    model: onnx.ModelProto, shapes: dict | None = None, dtypes: dict | None = None, inputs: set[str] = frozenset(),
    known: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Small values known without running the model, by name: initializers and Constant nodes (and
    Identity of them), and the integer index arithmetic on them that exporters emit (a reflect pad's
    amounts are seven such nodes). Weights are never touched: every input of a node evaluated here
    is small.

    With ``shapes`` and ``dtypes`` (inferred), also the Shape and Size of values whose shape is static,
    and the branch taken by an If whose condition is known; and each node whose output shape inference
    left unsettled is inferred again on its own, with the values known by then (``shapes`` and
    ``dtypes`` are updated in place); ``known``: the values of an earlier pass to start from.
    """
    import onnx.numpy_helper as nh

    g = model.graph
    if known is None:
        known = {t.name: nh.to_array(t) for t in g.initializer
                 if t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims) <= _EVALUATE_LIMIT}
    else:
        known = dict(known)  # an earlier pass's values: only what shapes tell now is new
    opsets = list(model.opset_import)

    def visit(n: onnx.NodeProto) -> None:
        if n.op_type == "If" and shapes is not None and n.input[0] in known:
            branch = next(a.g for a in n.attribute if a.name == ("then_branch" if known[n.input[0]].all()
                                                                  else "else_branch"))
            for b in branch.node:
                visit(b)
            for b, o in zip(branch.output, n.output):
                if b.name in known:
                    known[o] = known[b.name]
                if shapes.get(b.name) is not None:
                    shapes[o], dtypes[o] = shapes[b.name], dtypes.get(b.name)
            return
        if n.output and all(o in known for o in n.output):
            return
        value = _evaluate(n, known, shapes, opsets)
        if value is not None:
            known[n.output[0]] = value
            if shapes is not None:
                shapes[n.output[0]] = tuple(int(d) for d in value.shape)
                dtypes[n.output[0]] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        elif shapes is not None and any(_unsettled(shapes.get(o), inputs) for o in n.output if o):
            _reinfer(n, known, shapes, dtypes, opsets, inputs)

    for n in g.node:
        visit(n)
    return known


def _evaluate(n: onnx.NodeProto, known: dict, shapes: dict | None, opsets) -> np.ndarray | None:
    """The value of ``n``'s single output if it is small index arithmetic on known values, else None."""
    import onnx.numpy_helper as nh

    if n.domain not in ("", "ai.onnx") or len(n.output) != 1:
        return None
    if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
        value = nh.to_array(n.attribute[0].t)
        return value if value.size <= _EVALUATE_LIMIT else None
    if n.op_type == "Identity":
        return known.get(n.input[0])
    if n.op_type in ("Shape", "Size"):
        dims = None if shapes is None else shapes.get(n.input[0])
        if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
            return None
        if n.op_type == "Size":
            return np.array(int(np.prod(dims)), dtype=np.int64)
        at = {a.name: a.i for a in n.attribute}
        return np.array(dims[at.get("start", 0):at.get("end", len(dims))], dtype=np.int64)
    if n.op_type not in _INDEX_ARITHMETIC or not n.input or not all(i in known or not i for i in n.input) \
            or sum(known[i].size for i in n.input if i) > _EVALUATE_LIMIT:
        return None
    outs = _run_node(n, {i: known[i] for i in n.input if i}, opsets)
    if outs is None:
        return None
    (value,) = outs
    integral = np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_
    return value if integral and value.size <= _EVALUATE_LIMIT else None


def _reinfer(n: onnx.NodeProto, known: dict, shapes: dict, dtypes: dict, opsets, inputs: set[str]) -> None:
    """Infer ``n``'s output shapes on its own, from its inputs' settled shapes and known values."""
    import onnx.numpy_helper as nh

    types = {}
    for i in n.input:
        if not i:
            continue
        if i not in dtypes or shapes.get(i) is None and i not in known:
            return
        dims = known[i].shape if i in known else shapes[i]
        types[i] = onnx.helper.make_tensor_type_proto(dtypes[i], [d if isinstance(d, (int, str)) else None
                                                                 for d in dims])
    version = next((o.version for o in opsets if o.domain in ("", "ai.onnx")), None)
    try:
        schema = onnx.defs.get_schema(n.op_type, version, n.domain)
        out = onnx.shape_inference.infer_node_outputs(
            schema, n, types, {i: nh.from_array(known[i], i) for i in n.input if i in known}, opset_imports=opsets)
    except Exception:  # noqa: BLE001 (what inference cannot tell stays as it was)
        return
    for name, t in out.items():
        t = t.tensor_type
        if not t.HasField("shape"):
            continue
        new = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        old = shapes.get(name)
        if old is not None and len(old) == len(new):  # a dimension only ever becomes better known
            new = [n if isinstance(n, int) or o is None or n in inputs and isinstance(o, str) else o
                   for n, o in zip(new, old)]
        shapes[name] = tuple(new)
        dtypes[name] = t.elem_type or dtypes.get(name)


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


def _live(graph: gs.Graph) -> set[int]:
    """Ids of the nodes that graph outputs (or subgraphs, by outer names) read, directly or not."""
    roots = [id(v) for v in graph.outputs]
    tensors = graph.tensors()
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):  # If / Loop / Scan bodies read outer values by name
                inner = {t.name for n in attr.nodes for t in n.outputs} | {t.name for t in attr.inputs}
                roots += [id(tensors[t.name]) for n in attr.nodes for t in n.inputs
                          if t.name not in inner and t.name in tensors]
    edges = [(id(v), id(n)) for n in graph.nodes for v in n.inputs]
    edges += [(id(n), id(v)) for n in graph.nodes for v in n.outputs]
    reach = _graph.live(_graph.digraph(edges), roots)
    return {id(n) for n in graph.nodes if id(n) in reach}


def _drop_unread(graph: gs.Graph, dead_before: set[int]) -> None:
    """Remove the nodes the fold left unread; nodes that were already unread in the input stay."""
    live = _live(graph)
    graph.nodes = [n for n in graph.nodes if id(n) in live or id(n) in dead_before]


def _read_names(g: onnx.GraphProto) -> set[str]:
    """Names the nodes of ``g`` (and of its subgraphs, which may read outer values) or its outputs read."""
    names = {o.name for o in g.output}
    for n in g.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in [a.g, *a.graphs] if (a.HasField("g") or a.graphs) else ():
                names |= _read_names(sub)
    return names


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


def _remove(field, drop) -> None:
    for k in reversed([k for k, v in enumerate(field) if drop(v)]):
        del field[k]


def _fill_tensor(t: onnx.TensorProto, name: str, values: np.ndarray) -> None:
    """Fill a tensor already in the graph (``extend()`` would copy the bytes once more)."""
    t.name, t.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    t.raw_data = values.tobytes()


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
