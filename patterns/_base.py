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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from repfold.core.affine import Product, cast, fetch, matvec

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
    tensor: Callable[[], Any] | None = None  # the torch tensor holding them, as ``shape`` (fx): never converted


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


def as_tensor(value, ref) -> torch.Tensor:
    """``value`` (an array, or a product the fold left unevaluated) as a tensor of ``ref``'s shape, dtype and
    device. A product is evaluated a block of rows at a time straight into the new tensor (see
    :func:`write_product`); the largest change the cast made to a 16-bit float is kept on it
    (``value.rounding``) for the report."""
    if isinstance(value, Product):
        out = torch.empty(value.shape, dtype=ref.dtype)
        value.rounding = write_product(value, out)
        return out.reshape(ref.shape).to(ref.device)
    return torch.from_numpy(as_numpy(value, ref)).reshape(ref.shape).to(ref)


def write_into(value, ref: torch.Tensor) -> None:
    """Write ``value`` (an array, or a product left unevaluated) into the tensor ``ref`` itself, a block of
    rows at a time where ``ref`` is a contiguous CPU tensor (no copy of the layer), else through one tensor
    of the layer's size."""
    with torch.no_grad():
        if isinstance(value, Product) and ref.device.type == "cpu" and ref.is_contiguous():
            value.rounding = write_product(value, ref.view(value.shape))
        else:
            ref.copy_(as_tensor(value, ref))


def weight_matvec(W, c) -> np.ndarray:
    """``W·c`` in float64 for a weight that may be :class:`~repfold.core.affine.OnDemand` with the tensor
    behind it (fx): read a block of rows at a time as stored, never converted whole."""
    raw = getattr(W, "tensor", None)
    if raw is None:
        return matvec(fetch(W), c)
    T = raw().detach()
    n, m = T.shape
    vec = torch.from_numpy(np.full(m, c) if isinstance(c, float) else np.asarray(c, dtype=np.float64))
    out = np.empty(n)
    dest = torch.from_numpy(out)
    step = max(1, _ROWS // max(1, m))
    with torch.no_grad():
        for r in range(0, n, step):
            block = T[r:r + step]
            wide = _scratch(0, block.numel(), torch.float64).view(block.shape)
            wide.copy_(block)
            torch.mv(wide, vec, out=dest[r:r + step])
    return out


_ROWS = 1 << 20  # values in a block of rows of write_product (8 MB in float64: large enough for two threads)
_SCRATCH = threading.local()  # one set of buffers per thread: folds in two threads never share one


def _scratch(slot: int, n: int, dtype) -> torch.Tensor:
    """A reusable CPU buffer of at least ``n`` values (its first ``n``): blocks are converted into the same
    memory again and again, never into fresh pages (which the kernel zeroes, or a VM's host maps, one page
    at a time)."""
    mine = vars(_SCRATCH)
    buf = mine.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = mine[(slot, dtype)] = torch.empty(max(n, _ROWS), dtype=dtype)
    return buf[:n]


def write_product(P: Product, out: torch.Tensor) -> float:
    """Write ``diag(g)·W·(diag(d) + U·V)`` into ``out`` (a CPU tensor of the product's shape, any float dtype)
    a block of rows at a time: ``W`` is converted once per block, multiplied by the factors in the adapter's
    own rank (``out·in·r`` flops, never the dense ``in × in`` map), and rounded once into ``out``.

    The arithmetic is float64 for a float32 or float64 ``out`` and float32 for a 16-bit one (float32 holds a
    16-bit float's weights exactly and rounds the sum 2⁻¹⁶ closer than the 16-bit cast does). Returns the
    largest absolute change the cast to a 16-bit ``out`` made (0.0 for wider types).
    """
    raw = getattr(P.W, "tensor", None)  # the layer's own tensor (a bfloat16 one is then never copied whole)
    W = raw().detach() if raw is not None else torch.from_numpy(np.asarray(fetch(P.W)))
    half = out.dtype.itemsize < 4
    acc = torch.float32 if half else torch.float64
    F = P.F
    U = torch.from_numpy(np.asarray(F.U, dtype=np.float64)).to(acc) if F.rank else None
    V = torch.from_numpy(np.asarray(F.V, dtype=np.float64)).to(acc) if F.rank else None
    d = F.d if isinstance(F.d, float) else torch.from_numpy(np.asarray(F.d, dtype=np.float64)).to(acc)
    g = P.g if isinstance(P.g, float) else torch.from_numpy(np.asarray(P.g, dtype=np.float64)).to(acc)
    n = W.shape[0]
    step, worst = max(1, _ROWS // max(1, W.shape[1])), 0.0
    with torch.no_grad():
        for r in range(0, n, step):
            rows = slice(r, min(n, r + step))
            block = W[rows]
            w = _scratch(0, block.numel(), acc).view(block.shape)
            w.copy_(block)
            WU = w @ U if U is not None else None
            if isinstance(d, float) and d == 0.0:
                y = WU @ V if WU is not None else w.zero_()
            else:
                y = w if isinstance(d, float) and d == 1.0 else w.mul_(d)
                if WU is not None:
                    y.addmm_(WU, V)
            if not isinstance(g, float):
                y.mul_(g[rows, None])
            elif g != 1.0:
                y.mul_(g)
            o = out[rows]
            o.copy_(y)
            if half and o.numel():
                moved = _scratch(1, o.numel(), acc).view(o.shape)
                moved.copy_(o)
                worst = max(worst, float(moved.sub_(y).abs_().max()))
    return worst


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
        shared = [*current.values(), *old.parameters(), *old.buffers()] if ctx.inplace else current.values()
        new = copy.deepcopy(old, {id(t): t for t in shared if t is not None})
        for name, p in old.named_parameters():
            if name not in values and ctx.trainable(p):
                new.get_parameter(name).requires_grad_(True)
        for name, value in values.items():
            ref = current[name]
            if ref is not None and ctx.writable(ref) and int(np.prod(np.shape(value))) == ref.numel():
                write_into(value, ref)  # the model's own tensor takes its new values (fold(..., inplace=True))
                setattr(new, name, ref)
                continue
            if ref is None:  # a layer without a bias taking one: the weight's dtype, device and training
                ref, grad = old.weight.new_empty(np.shape(value)), ctx.trainable(old.weight)
            else:
                grad = ctx.trainable(ref)
            t = ctx.tensor(value, ref)
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
