"""Writes into views, spelled so that torch's TorchScript ONNX exporter keeps them.

An in-place op into a view of a value writes into the value: ``m[0:4].mul_(2)``.
torch's TorchScript ONNX exporter carries such a write into the file only in
some spellings, and silently drops it in others, so that a graph which
computes exactly what the model computes can export to a file that does
not (measured, torch 2.14):

* the write is kept where the view is a temporary (``m[0:4].mul_(2)`` in the
  model's code) or the write an index assignment (``m[0:4] = v``);
* it is lost where the traced code names the view (``v = m[0:4]; v.mul_(2)``,
  which is how fx writes every graph), or where the op is called as an ATen
  overload (``aten.fill_.Tensor(v, c)``, how torch.export writes
  ``m[a:b] = c``); a chain of indexes (``m[0:4][:, 2:6]``, torch.export's one
  slice per axis) fails in the exporter.

So every such write becomes the index assignment it stands for, which computes
the same values bitwise::

    v = m[k1][k2]; v.fill_(c)      ->  m[k1, k2] = c
    v = m[k]; v.mul_(a)            ->  m[k] = v.mul(a)

Only a view that one op alone reads, indexed from a tensor, written by an op
whose result nothing reads, is rewritten; index links are merged only where
each axis is sliced by at most one of them.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from repfold.core.graph import upstream

# in-place methods whose out-of-place namesake is no elementwise rewrite of the view (metadata edits, random
# draws whose out-of-place forms are other functions)
_NOT_ELEMENTWISE = {
    "resize_", "resize_as_", "set_", "requires_grad_", "share_memory_", "as_strided_", "squeeze_", "unsqueeze_",
    "transpose_", "t_", "swapdims_", "swapaxes_", "detach_", "random_", "normal_", "uniform_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "bernoulli_", "retain_grad",
}
_FILLS = {"fill_": 2, "copy_": 2, "zero_": 1}  # writes of a value (its arity): an assignment of the value itself


def aten_writes_self(t) -> bool:
    """Whether the ATen overload ``t`` writes into its first argument and is a Tensor method of its name
    (``aten.fill_.Tensor``, ``aten.mul_.Tensor``)."""
    schema = getattr(t, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    info = schema.arguments[0].alias_info
    return bool(info is not None and info.is_write) and hasattr(torch.Tensor, t.__name__.partition(".")[0])


def as_method(n: fx.Node) -> bool:
    """An in-place ATen call, ``aten.fill_.Tensor(v, a)``, as the Tensor method ``v.fill_(a)``: the same
    write, in the spelling the TorchScript exporter keeps; whether it was rewritten. A call with a list
    that holds ``None`` (``index_put_``'s indices of ``x[:, i]``, which the method does not take) stays."""
    if any(isinstance(a, (list, tuple)) and any(e is None for e in a) for a in (*n.args, *n.kwargs.values())):
        return False
    n.op, n.target = "call_method", n.target.__name__.partition(".")[0]
    n.args = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in n.args)
    return True


def index_assignments(gm: fx.GraphModule) -> int:
    """Rewrite, in place, every in-place method call into a private view of a tensor of ``gm``'s graph as an
    index assignment (the module docstring); the number rewritten. Nodes need their ``val`` (torch.export)
    or ``tensor_meta`` (shape propagation) to tell a tensor from a tuple."""
    done = 0
    for n in list(gm.graph.nodes):
        if n.target in ("index_put_", torch.ops.aten.index_put_.default):
            done += _index_put(gm, n)
        elif n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") \
                and not n.target.startswith("_"):
            done += _assignment(gm, n)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _assignment(gm: fx.GraphModule, n: fx.Node) -> bool:
    view = n.args[0] if n.args else None
    fills = n.target in _FILLS
    if fills and (len(n.args) != _FILLS[n.target] or n.kwargs):
        return False
    if not fills and (n.target in _NOT_ELEMENTWISE or not callable(getattr(torch.Tensor, n.target[:-1], None))):
        return False
    if n.users or not _private_index(view):
        return False
    while _private_index(view.args[0]):
        inner = view.args[0]
        key = _merged_key(inner.args[1], view.args[1])
        if key is None:
            break
        view.args = (inner.args[0], key)
        gm.graph.erase_node(inner)
    base, key = view.args
    if fills:
        value = n.args[1] if n.target != "zero_" else 0
        n.op, n.target, n.args = "call_function", operator.setitem, (base, key, _number(gm, value))
        gm.graph.erase_node(view)
        if isinstance(value, fx.Node) and not value.users:
            gm.graph.erase_node(value)
        return True
    with gm.graph.inserting_before(n):
        value = gm.graph.call_method(n.target[:-1], n.args, dict(n.kwargs))
    value.meta = dict(n.meta)
    n.op, n.target, n.args, n.kwargs = "call_function", operator.setitem, (base, key, value), {}
    return True


def _index_put(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``index_put_(m, [None, i], v)`` as the ``m[:, i] = v`` it stands for (torch.export's spelling of an
    index assignment, which the TorchScript exporter cannot export: its ``None``s, its lifted scalar)."""
    args = list(n.args) + [n.kwargs.get(k) for k in ("accumulate",) if k in n.kwargs]
    if len(args) not in (3, 4) or len(args) == 4 and args[3] is not False or not _is_tensor(args[0]) \
            or not _reads_input(n):
        return False  # (a write of weights alone, FourierFT's ΔW, is a constant to the exporters: left as it is)
    x, indices, value = args[:3]
    if not isinstance(indices, (list, tuple)) or not all(i is None or isinstance(i, fx.Node) for i in indices):
        return False
    key = tuple(slice(None) if i is None else i for i in indices)
    n.replace_all_uses_with(x)  # (it returns the value it wrote into)
    n.op, n.target, n.args, n.kwargs = "call_function", operator.setitem, (x, key, _number(gm, value)), {}
    if isinstance(value, fx.Node) and not value.users:
        gm.graph.erase_node(value)
    return True


def _reads_input(n: fx.Node) -> bool:
    """Whether ``n`` depends on an input of the graph (a placeholder), directly or not."""
    return any(a.op == "placeholder" for a in upstream(n, lambda a: a.all_input_nodes))


def _is_tensor(n) -> bool:
    return isinstance(n, fx.Node) and (isinstance(n.meta.get("val"), torch.Tensor)
                                       or isinstance(n.meta.get("tensor_meta"), TensorMetadata))


def _private_index(v) -> bool:
    """Whether ``v`` is an index (``m[k]``) of a tensor, that one op alone reads."""
    return isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.getitem \
        and len(v.users) == 1 and len(v.args) == 2 and _is_tensor(v.args[0])


def _merged_key(first, second) -> tuple | None:
    """One index for ``x[first][second]``, both slices or tuples of slices; None where an axis is sliced by
    both, or a key holds anything else (an int, None, Ellipsis, a tensor)."""
    full = slice(None)
    first, second = (k if isinstance(k, tuple) else (k,) for k in (first, second))
    if not all(isinstance(s, slice) for s in first + second):
        return None
    size = max(len(first), len(second))
    a, b = first + (full,) * (size - len(first)), second + (full,) * (size - len(second))
    if any(s != full and t != full for s, t in zip(a, b)):
        return None
    return tuple(t if s == full else s for s, t in zip(a, b))


def _number(gm: fx.GraphModule, value):
    """The Python number a write's value stands for where torch.export made a scalar a lifted constant
    (``m[k] = 3`` as ``fill_(v, lift_fresh_copy(c))``: the TorchScript exporter has no ``lift_fresh_copy``);
    else ``value``."""
    const = value.args[0] if isinstance(value, fx.Node) and value.target is torch.ops.aten.lift_fresh_copy.default \
        and len(value.users) == 1 else None
    if not isinstance(const, fx.Node) or const.op != "get_attr":
        return value
    owner, _, name = const.target.rpartition(".")
    t = getattr(gm.get_submodule(owner) if owner else gm, name, None)
    return t.item() if isinstance(t, torch.Tensor) and t.dim() == 0 else value


ALIAS = "repfold_alias"  # node meta: a ``clone`` that stands for torch.export's ``aten.alias`` (``x[:, :n]`` of all n)


def restore_aliases(gm: fx.GraphModule) -> None:
    """Spell each ``clone`` that stands for an ``aten.alias`` (the fold rules read it as the identity it is) as
    ``x[...]`` again: a view, as the model had it, which torch.export writes as ``aten.alias`` (a ``clone`` is a
    copy at run time: GhostNet's program had 32 more)."""
    for n in gm.graph.nodes:
        if n.meta.get(ALIAS) and n.op == "call_method" and n.target == "clone" and len(n.args) == 1 and not n.kwargs:
            n.op, n.target, n.args = "call_function", operator.getitem, (n.args[0], Ellipsis)

