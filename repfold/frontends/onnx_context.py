"""What the ONNX matchers may ask about a graph (:class:`OnnxContext`: shapes, constants, weight-only values)
and the edits a fold makes in it (new initializers and nodes, unread nodes dropped)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from repfold.core import graph as _graph
from repfold.frontends.onnx_io import ANCHORED, PLAIN_DTYPES, Later, left_out, mark_pending, read_external
from repfold.patterns._base import Deferred

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


def _fill_tensor(t: onnx.TensorProto, name: str, values: np.ndarray) -> None:
    """Fill a tensor already in the graph (``extend()`` would copy the bytes once more)."""
    t.name, t.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    t.raw_data = values.tobytes()


def _read_names(g: onnx.GraphProto) -> set[str]:
    """Names the nodes of ``g`` (and of its subgraphs, which may read outer values) or its outputs read."""
    names = {o.name for o in g.output}
    for n in g.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in [a.g, *a.graphs] if (a.HasField("g") or a.graphs) else ():
                names |= _read_names(sub)
    return names


def _remove(field, drop) -> None:
    for k in reversed([k for k, v in enumerate(field) if drop(v)]):
        del field[k]
