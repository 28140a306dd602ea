"""Shapes, dtypes and small integer constants of an ONNX graph: onnx's shape inference, completed by evaluating
the index arithmetic exporters write on shapes."""

from __future__ import annotations

import numpy as np
import onnx

from repfold.frontends.onnx_context import _EVALUATE_LIMIT, _INDEX_ARITHMETIC, _run_node


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
