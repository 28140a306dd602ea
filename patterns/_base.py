"""What a rule hands the engine when it recognises a node, and the op semantics it hands.

A rule file in this package holds, for one op family:

* the op's IR-free semantics: a small class that implements :class:`Op`
  (and, for a layer that can take over a region, :class:`Layer` or
  :class:`Absorber`; for a layout op, :class:`Layout`);
* ``match_fx(node, ctx)``: the torch.fx forms of the op (torch.export graphs
  reach it too, their ATen ops rewritten as torch's by ``repfold.frontends.export``);
* ``match_onnx(node, ctx)``: the ONNX forms of the op.

A matcher returns a :class:`Match` or None (the node is not in this family).
The engine reads an op only through these protocols.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from repfold.core.affine import cast

from ._torch import fx, nn, torch

if TYPE_CHECKING:
    from repfold.core.affine import Affine, Channels


class Op(Protocol):
    """What every op tells the engine."""

    heavy: bool  # a layer of its own (Linear, 1x1 conv): the ops a fold removes are counted in these

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        """The affine state of the op's output from its inputs' states; raises NotAffine with the reason."""


class Layer(Op, Protocol):
    """A layer that reads a region's exit and can be rebuilt to read the region's source (Linear, 1x1 conv)."""

    def absorb(self, v: Affine, ch: Channels) -> tuple[Any, Any]:
        """New ``(W, b)`` for the layer reading the source of ``v`` directly; raises NotAffine if it can't."""


class Absorber(Op, Protocol):
    """A layer that carries no region through but takes one on either side (a k×k or strided conv)."""

    def absorb_input(self, v: Affine, ch: Channels) -> tuple[Any, Any]:
        """New ``(W, b)`` when the region ``v`` is the layer's input."""

    def absorb_output(self, v: Affine, ch: Channels) -> tuple[Any, Any]:
        """New ``(W, b)`` when the region ``v`` (on the layer's output) goes into the layer."""


class Layout(Op, Protocol):
    """An op that moves values without arithmetic; a fold may replay it on the region's source.

    ``layout`` is True; ``perm`` is set for a pure permutation (transposes in
    a row merge into one); ``passes`` marks an identity replayed along with
    the layout op before it (contiguous before a view); ``sticky`` an
    identity only for the shapes seen (a pad by computed amounts), which a
    fold must keep rather than drop.
    """

    layout: bool
    perm: tuple[int, ...] | None
    passes: bool
    sticky: bool


@dataclass
class Match:
    """One recognised op: its semantics, its data inputs and how to rebuild it.

    ``inputs`` are the frontend's own handles (fx ``Node`` or onnx-graphsurgeon
    ``Variable``); ``covers`` the ONNX nodes the op spans (MatMul + Add is one
    Linear); ``emit(swap, W, b)`` rebuilds the layer with new weights, reading
    ``swap.get(i, i)`` for each of its inputs ``i``, and returns the value that
    replaces its old output.
    """

    op: Any
    inputs: tuple
    label: str
    covers: tuple = ()
    emit: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Deferred:
    """A float64 weight of known ``shape`` made by ``make()`` on first use.

    Matching a graph sees every layer; only the layers near an adapter ever
    need their weights in float64, so the others are never converted.
    """

    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]
    stored: Callable[[], np.ndarray] | None = None  # the same values in the file's dtype (often a view)


def torch_own(m) -> bool:
    """Whether module ``m`` computes what its torch.nn class computes: no subclass overrides its forward
    (timm's ``ScaledStdConv2dSame`` is an ``nn.Conv2d`` that pads and standardises its weight first)."""
    for method in ("forward", "_conv_forward"):
        f = getattr(type(m), method, None)
        if f is not None and not getattr(f, "__module__", "").startswith("torch.nn.modules"):
            return False
    return True


def resolve(w):
    """The array behind a weight that may be :class:`Deferred`."""
    return w.make() if isinstance(w, Deferred) else w


def stored(w):
    """The weight in its stored dtype, unconverted, where the frontend can give it; else float64."""
    if isinstance(w, Deferred):
        return w.stored() if w.stored is not None else w.make()
    return w


_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def numpy_dtype(t) -> type | None:
    """The NumPy dtype of tensor ``t``'s float type, or None where NumPy has none (bfloat16)."""
    return _NUMPY.get(str(t.dtype).removeprefix("torch."))


def as_numpy(value, ref) -> np.ndarray:
    """``value`` (an array, or a product the fold left unevaluated) as a C-ordered array for tensor
    ``ref``: in its dtype where NumPy has it, so a product is evaluated straight into it; else float64."""
    return cast(value, numpy_dtype(ref) or np.float64)


def const_vector(t: np.ndarray | float, rank: int) -> tuple[int | None, np.ndarray | float]:
    """Split a broadcast constant into (axis it varies along, values).

    Returns ``(None, s)`` for a constant that is the same everywhere and
    ``(k, vector)`` when it varies along axis ``k`` only of a rank-``rank``
    value. Raises ValueError for a constant that varies along several axes or
    would raise the value's rank through broadcasting.
    """
    if isinstance(t, float):
        return None, t
    t = np.asarray(t, dtype=np.float64)
    if t.ndim > rank:
        raise ValueError("broadcasting the constant raises the value's rank")
    varying = [i for i, n in enumerate(t.shape) if n != 1]
    if not varying:
        return None, float(t.reshape(-1)[0]) if t.size else 0.0
    if len(varying) > 1:
        raise ValueError(f"the constant varies along {len(varying)} axes")
    return rank - t.ndim + varying[0], t.reshape(-1)


def fx_rebuild(node, ctx, params: Callable[[nn.Module, Any, Any], dict[str, np.ndarray]]):
    """``emit`` for a call_module layer: a copy of its module with ``params(module, W, b)`` set."""

    def emit(swap: dict, W, b):
        old = ctx.module(node)
        values = params(old, W, b)
        # the tensors about to be replaced are shared, not cloned, by the copy
        current = {name: getattr(old, name) for name in values}
        new = copy.deepcopy(old, {id(t): t for t in current.values() if t is not None})
        for name, p in old.named_parameters():
            if name not in values and ctx.trainable(p):
                new.get_parameter(name).requires_grad_(True)
        for name, value in values.items():
            ref = current[name]
            if ref is None:  # a layer without a bias taking one: the weight's dtype, device and training
                ref, grad = old.weight.new_empty(np.shape(value)), ctx.trainable(old.weight)
            else:
                grad = ctx.trainable(ref)
            t = torch.from_numpy(as_numpy(value, ref)).reshape(ref.shape).to(ref)
            setattr(new, name, nn.Parameter(t, requires_grad=grad))
        args = fx.node.map_arg(node.args, lambda a: swap.get(a, a))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: swap.get(a, a))
        return ctx.graph.call_module(ctx.replace_module(node, new), args, kwargs)

    return emit


def onnx_rebuild(node, ctx, inits: Callable[[Any, Any], dict[int, np.ndarray]]):
    """``emit`` for one ONNX node: a copy with new initializers at the input indices ``inits(W, b)`` gives."""

    def emit(swap: dict, W, b):
        new = dict(inits(W, b))
        ins = [
            ctx.new_const(i, new[k]) if k in new else swap.get(i, i)
            for k, i in enumerate(node.inputs)
        ]
        # an optional input the node did not have (a conv's bias): named and typed after the first new one
        like = node.inputs[min(new)]
        ins += [ctx.new_const(like, new[k]) for k in range(len(ins), max(new) + 1)]
        return ctx.copy_node(node, ins)

    return emit
