"""The torch.fx frontend: graph -> steps for the engine, and the rewrite of a plan."""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from repfold.core import driver as _driver
from repfold.core import engine as _engine
from repfold.core import graph as _graph
from repfold.core.affine import NotAffine, Product
from repfold.core.steps import OUTPUT, Plan, Step
from repfold.frontends.classes import GRAPH_HINT, REPLACED_KEY, in_code, into_class, into_own_class, scopes
from repfold.frontends.trace import (
    META_KEY,
    SHAPED_KEY,
    VALUE_KEY,
    PartialShapes,
    TraceError,
    WritesBuffers,
    example_inputs,
    export_quietly,
    fingerprint,
    get_attr,
    has_submodule,
    is_shape_read,
    module_paths,
    own_parameters,
    reads_rank_only,
    set_module,
    shape,
    shaped,
    to_graph_module,
)
from repfold.frontends.writes import ALIAS, index_assignments, restore_aliases
from repfold.patterns import fx_rules
from repfold.patterns._base import as_tensor, torch_own, write_into
from repfold.report import FoldReport, Region, placement


class FxContext:
    """What the fx matchers in ``repfold.patterns`` may ask about a graph."""

    def __init__(self, gm: fx.GraphModule, thaw: set[int] = frozenset(), inplace: bool = False) -> None:
        self.gm, self.graph = gm, gm.graph
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
        # the modules whose tensors a get_attr reads (``a.b`` and ``a`` for ``a.b.weight``)
        self.read_owners = {t.rsplit(".", k)[0] for t in self.reads for k in range(1, t.count(".") + 1)}
        self.thaw = thaw
        self.inplace = inplace
        self.dry = False  # rewrite the graph only: new tensors are made on the meta device, never evaluated
        self._holders: Counter | None = None

    def writable(self, ref, read: fx.Node | None = None) -> bool:
        """Whether a fold in place may write a layer's new values into ``ref`` itself: ``inplace`` was asked
        for, and nothing else holds or reads its memory (a tied weight, a view of it, a get_attr of it) but
        the layer (``read``: the one get_attr a functional layer reads it through, read by that layer only)."""
        if not (self.inplace and isinstance(ref, torch.Tensor)) or ref.device.type == "meta":
            return False
        if self._holders is None:
            held = [t for _, t in self.gm.named_parameters(remove_duplicate=False)]
            held += [t for _, t in self.gm.named_buffers(remove_duplicate=False)]
            held += [t for t in (get_attr(self.gm, target) for target in self.reads for _ in range(self.reads[target]))
                     if isinstance(t, torch.Tensor)]
            self._holders = Counter(_memory(t) for t in held)
        if read is not None and (self.reads[read.target] != 1 or len(read.users) != 1):
            return False
        return self._holders[_memory(ref)] == 1 + (read is not None)

    def tensor(self, value, ref: torch.Tensor) -> torch.Tensor:
        """A new tensor of ``ref``'s shape, dtype and device holding ``value`` (a dry fold's: no values)."""
        if self.dry:
            if isinstance(value, Product):
                value.rounding = 0.0  # (not evaluated: the real fold that follows measures it)
            return torch.empty(ref.shape, dtype=ref.dtype, device="meta")
        return as_tensor(value, ref)

    def trainable(self, ref: torch.Tensor) -> bool:
        """Whether a tensor made from ``ref`` requires grad: as ``ref`` does, or it was frozen only by insert."""
        return ref.requires_grad or id(ref) in self.thaw

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def rank(self, arg) -> int | None:
        sh = self.shape(arg)
        return None if sh is None else len(sh)

    def shape(self, arg) -> tuple[int, ...] | None:
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def dtype(self, arg):
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return meta.dtype if isinstance(meta, TensorMetadata) else None

    def value(self, arg):
        """A literal, or the value shape propagation recorded for a node computing one (sizes)."""
        if isinstance(arg, fx.Node):
            return arg.meta.get(VALUE_KEY)
        return arg

    def is_tensor(self, arg) -> bool:
        return self.rank(arg) is not None

    def const(self, arg) -> np.ndarray | float | None:
        """The float64 value of a constant argument, else None: a number, a get_attr tensor, or a value
        computed from such tensors alone (a weight-only subgraph: PEFT's LoHa ``ΔW``, BEiT's concatenated
        qkv bias), evaluated in float64 (see :class:`WeightOnly`)."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if isinstance(arg, fx.Node) and arg.op != "placeholder":
            value = self.weights.value(arg)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.detach().to(torch.float64).cpu().numpy()
        return None

    def evaluable(self, arg, size: int) -> bool:
        """Whether the weight-only value ``arg`` (of ``size`` values) may be stored in place of its
        computation at no more cost: the module tensors it is computed from, that nothing else reads, hold
        at least as many values (HRA's weight and its reflections; not a model's own factored ``A @ B``,
        nor a weight computed from a tensor other layers share)."""
        if not isinstance(arg, fx.Node) or arg.op == "get_attr" or arg not in self.weights.members:
            return False
        inside, todo = set(), [arg]
        while todo:
            m = todo.pop()
            if m not in inside:
                inside.add(m)
                todo.extend(m.all_input_nodes)
        if all(m.op == "get_attr" or _name(m).partition(".")[0] in _MOVES for m in inside):
            return False  # a stored weight laid out another way (``x @ Wᵀ``): no computation to remove
        if len(arg.users) != 1 or any(u not in inside for m in inside - {arg} if m.op != "get_attr" for u in m.users):
            return False  # read by more than one layer (or by other ops): storing it for each would cost more
        targets = {m.target for m in inside if m.op == "get_attr"}
        for n in self.gm.graph.nodes:  # a tensor other ops read too stays: it does not count
            if n.op == "get_attr" and n.target in targets and (n not in inside or any(u not in inside for u in n.users)):
                targets.discard(n.target)
        return sum(get_attr(self.gm, t).numel() for t in targets) >= size

    @functools.cached_property
    def weights(self) -> WeightOnly:
        return WeightOnly(self.gm)

    def new_param(self, hint: str, value: np.ndarray, like: fx.Node, shape=None) -> fx.Node:
        """Register ``value`` as a new parameter (dtype, device and shape of the tensor ``like`` gives);
        its get_attr node.

        The name is ``hint`` made unique, so a tensor others still read is never replaced. ``like`` is a
        get_attr node or a weight-only value (whose dtype is the one the model computed it in).
        """
        if like.op == "get_attr" and shape is None:
            ref = get_attr(self.gm, like.target)
            trainable = self.trainable(ref)
            if self.writable(ref, like) and int(np.prod(np.shape(value))) == ref.numel():
                write_into(value, ref)  # the model's own tensor takes its new values (fold(..., inplace=True))
                return self.graph.get_attr(like.target)
        else:  # ``shape`` (where it is not ``like``'s), ``like``'s dtype and device
            roots = self.weights.roots(like)
            ref = torch.empty(shape or self.shape(like), dtype=self.dtype(like),
                              device=roots[0].device if roots else None)
            trainable = any(self.trainable(r) for r in roots)
        t = self.tensor(value, ref)
        base, i = hint.replace(".", "_") + "_folded", 0
        name = base
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_parameter(name, nn.Parameter(t, requires_grad=trainable))
        same = like.op == "get_attr" and tuple(t.shape) == tuple(get_attr(self.gm, like.target).shape)
        # the new values of a tensor of the model's, under a new name (or None: a bias it had none of)
        self.gm.meta.setdefault(REPLACED_KEY, {})[name] = like.target if same else None
        return self.graph.get_attr(name)

    def replace_module(self, node: fx.Node, new: nn.Module) -> str:
        """Install ``new`` in place of ``node``'s module; a new name if others call the old one or read its
        tensors (a tied head's ``F.linear(h, self.embed.weight)``: at the old path, it would read the new ones)."""
        target = node.target
        if self.calls[target] > 1 or target in self.read_owners:
            base, i = f"{target}_folded", 0
            while has_submodule(self.gm, target):
                target = f"{base}_{i}" if i else base
                i += 1
        set_module(self.gm, target, new)
        return target


# Methods and functions that only move or cast a tensor's values.
_MOVES = {"t", "transpose", "permute", "reshape", "view", "contiguous", "to", "float", "clone", "detach", "flatten",
          "unsqueeze", "squeeze", "expand", "type", "lift_fresh_copy", "detach_", "alias"}
# Functions that make a tensor from nothing but numbers (OFT's identity matrix): a weight-only value may use them.
_MAKERS = {"eye", "zeros", "ones", "full", "arange", "tensor", "linspace", "scalar_tensor"}
# Draws and writes: never part of a weight-only value.
_RANDOM = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "normal_",
           "bernoulli", "multinomial", "poisson", "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
           "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_"}
_TO_DOUBLE = {"float", "half", "bfloat16"}  # casting methods, kept in float64 while a weight is evaluated


class WeightOnly:
    """The values of an fx graph computed from its tensors alone, with no graph input upstream, and their
    float64 values on demand.

    A fold reads such a value as the constant it is (PEFT's LoHa ``ΔW = (A₁B₁)⊙(A₂B₂)``, OFT's Cayley
    rotation, DoRA's weight norm, BEiT's ``cat(q_bias, 0, v_bias)``): every tensor it starts from is taken
    in float64 and every floating cast on the way stays float64, so the value is cast once, when the fold
    writes it into a layer. Nothing in the graph changes unless a fold uses the value; the subgraph then
    goes with the other ops the fold made unread. Random draws, in-place writes and calls of modules are
    never part of one.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.private_writes: set[fx.Node] = set()  # in-place ops that act as pure ones (FourierFT's index_put_)
        written = set()  # values a write may change (but one that only the write reads): never constants
        for n in gm.graph.nodes:
            if Effects.mutates_node(gm, n) and n.args and isinstance(n.args[0], fx.Node) \
                    and not self._only_written(n.args[0]):
                written.add(Effects.root_of(gm, n.args[0]))
        self.members: set[fx.Node] = set()
        self._position: dict[fx.Node, int] = {}
        for k, n in enumerate(gm.graph.nodes):
            if n not in written and self._pure_call(n, [i in self.members for i in n.all_input_nodes]):
                self.members.add(n)
                self._position[n] = k
        self._values: dict[fx.Node, Any] = {}

    def _pure_call(self, n: fx.Node, inputs: list[bool]) -> bool:
        if n.op == "get_attr":
            return isinstance(get_attr(self.gm, n.target), torch.Tensor)
        if n.op == "call_function" and n.target is getattr and n.args[1] == "dtype" and _dtype_of(n.args[0]):
            return True  # ``x.dtype`` (PEFT casts its ΔW to the input's): known from the trace
        if n.op not in ("call_function", "call_method") or not all(inputs) or not n.users:
            return False
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "").partition(".")[0]
        if name in _RANDOM:
            return False
        if Effects.mutates_node(self.gm, n):
            # a write into a value made here that nothing else reads: a pure op by another name
            if not self._only_written(n.args[0]):
                return False
            self.private_writes.add(n)
        if not inputs:  # no tensor in: only a maker of constant tensors
            return n.op == "call_function" and name in _MAKERS
        return True

    @staticmethod
    def _only_written(x) -> bool:
        """``x`` is made here (not a module tensor, not a view of one) and its one reader writes into it."""
        return isinstance(x, fx.Node) and x.op != "get_attr" and len(x.users) == 1 and _name(x) not in _VIEWS

    def roots(self, n: fx.Node) -> list[torch.Tensor]:
        """The module tensors the weight-only value ``n`` is computed from."""
        return [get_attr(self.gm, m.target) for m in _graph.upstream(n, _inputs) if m.op == "get_attr"]

    def value(self, n: fx.Node):
        """The float64 value of weight-only ``n`` (None when ``n`` is not one, or cannot be evaluated)."""
        if n not in self.members:
            return None
        if n not in self._values:
            need, todo = set(), [n]
            while todo:  # the nodes ``n`` depends on, not yet evaluated
                m = todo.pop()
                if m in self.members and m not in need and m not in self._values:
                    need.add(m)
                    todo.extend(m.all_input_nodes)
            for m in sorted(need, key=self._position.__getitem__):
                self._values[m] = self._evaluate(m)
        return self._values[n]

    def _evaluate(self, n: fx.Node):
        if n.op == "call_function" and n.target is getattr and n.args[1] == "dtype":
            return _dtype_of(n.args[0])
        if n.op == "get_attr":  # a copy: an op of the subgraph may write into its input
            t = get_attr(self.gm, n.target).detach()
            return t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone()
        if any(self._values.get(i) is None for i in n.all_input_nodes):
            return None
        args = fx.node.map_aggregate(fx.node.map_arg(n.args, self._values.get), _double)
        kwargs = fx.node.map_aggregate(fx.node.map_arg(n.kwargs, self._values.get), _double)
        try:
            with torch.no_grad():
                if n.op == "call_method":
                    method = "double" if n.target in _TO_DOUBLE else n.target
                    out = getattr(args[0], method)(*args[1:], **kwargs)
                else:
                    out = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 (not computable here, in float64 say: not a constant to the fold)
            return None
        # a maker's default dtype (float32 zeros) joins the float64 values it is combined with
        return out.double() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def _dtype_of(n):
    """The dtype shape propagation recorded for node ``n``, or None."""
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return meta.dtype if isinstance(meta, TensorMetadata) else None


def _double(a):
    """A floating dtype argument as float64 (``.to(torch.float32)`` of a weight stays float64)."""
    return torch.float64 if isinstance(a, torch.dtype) and a.is_floating_point else a


def _is_leaf(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "")


def inline_submodules(gm: fx.GraphModule, shapes: PartialShapes | None = None) -> bool:
    """Trace through every call of a non-torch module (adapters included), in place; with ``shapes``, the
    ops spliced in are shaped from their inputs' recorded shapes. Returns whether every spliced op was.

    The graph changes; ``gm``'s code is not regenerated (the caller recompiles when it is done).
    """
    graph, ok = gm.graph, True
    for node in list(graph.nodes):
        if node.op != "call_module" or _is_leaf(gm.get_submodule(node.target)):
            continue
        sub = gm.get_submodule(node.target)
        try:
            sub_graph = fx.Tracer().trace(sub)  # a graph only: no GraphModule, no code generated
        except Exception:  # noqa: BLE001, S112 (a leaf the user or timm named: it stays whole, opaque to folds)
            continue
        result, copied = _splice(graph, node, sub_graph)
        if isinstance(result, fx.Node):
            if shapes is not None and ok:
                try:
                    shapes.run(copied)
                except Exception:  # noqa: BLE001 (the caller shapes the whole graph instead)
                    ok = False
            node.replace_all_uses_with(result)
            graph.erase_node(node)
        else:  # a tuple or dict result: the module stays whole, and its copied ops must not run as well
            for new in reversed(copied):
                graph.erase_node(new)
    return ok


def _splice(graph: fx.Graph, call: fx.Node, sub: fx.Graph):
    """Copy ``sub`` in before ``call`` with its inputs bound to ``call``'s arguments.

    Returns what the copy computes in place of ``call``, and the copied nodes in order.
    """
    args, env, result, copied = list(call.args), {}, None, []
    with graph.inserting_before(call):
        for sn in sub.nodes:
            if sn.op == "placeholder":
                if args:
                    env[sn] = args.pop(0)
                elif sn.target in call.kwargs:
                    env[sn] = call.kwargs[sn.target]
                else:
                    env[sn] = sn.args[0] if sn.args else None
            elif sn.op == "output":
                result = fx.node.map_arg(sn.args[0], lambda n: env[n])
            else:
                new = graph.node_copy(sn, lambda n: env[n])
                if new.op in ("call_module", "get_attr"):
                    new.target = f"{call.target}.{sn.target}"
                env[sn] = new
                copied.append(new)
    return result, copied


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Operator counts of a graph: modules by class, functions and methods by name."""
    counts: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[type(gm.get_submodule(n.target)).__name__] += 1
        elif n.op in ("call_function", "call_method"):
            t = operator.getitem if n.meta.get(ALIAS) else n.target  # (an alias read as a clone: a view)
            counts[t if isinstance(t, str) else getattr(t, "__name__", str(t))] += 1
    return dict(counts)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _exported(model: nn.Module, inputs: tuple, why: TraceError) -> fx.GraphModule:
    """``model`` as the graph of its torch.export program, where torch.fx cannot trace it (a Hugging Face
    model, say), as ``insert`` traces it: an eval-mode copy sharing the model's parameters."""
    import copy

    if isinstance(model, fx.GraphModule) or isinstance(why, WritesBuffers):
        raise why  # (shapes are found by running the graph once: a written buffer would move)
    own = copy.deepcopy(model, {id(p): p for p in model.parameters()}).eval()
    try:
        ep = export_quietly(own, inputs)
    except Exception as e:  # both tracers failed: say why for each
        raise TraceError(f"{why}; torch.export failed too: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    gm = to_graph_module(ep.module(), share_parameters=True)
    gm.meta[META_KEY] = {"trace": "torch.export"}
    return gm


@dataclass
class Prepared:
    """A private, shaped copy of a model with its fold planned, before any rewrite."""

    gm: fx.GraphModule
    ctx: FxContext
    plan: Plan
    report: FoldReport
    nodes: dict[str, fx.Node]
    effects: Effects
    read_before: set[str]
    live_before: set[fx.Node]
    by_name: dict[str, Step]
    label: Any
    inputs: tuple = ()


def prepare(model: nn.Module, example=None, *, scales: bool = True, leaf_modules=(), leaf_functions=(),
            cut: frozenset[str] = frozenset(), inplace: bool = False) -> Prepared:
    """Trace, shape and plan the fold of ``model``: every region found, and how each would fold.

    The copy shares the caller's parameters (adapters and absorbed weights are
    never cloned); ``fold_fx`` rewrites it, ``insert`` only reads the plan.
    ``cut``: ops whose readers see a source of their own (ops of a forward's own code, which a fold into
    the model's class must leave where they are: the regions they are in end there).
    """
    inputs = example_inputs(model, example)
    # a graph insert shaped, unchanged since (code, modules, tensors, inputs): its shapes are still right
    known = isinstance(model, fx.GraphModule) and shaped(model) and \
        model.meta.get(META_KEY, {}).get(SHAPED_KEY) == fingerprint(model, inputs)
    try:
        gm = to_graph_module(model, leaf_modules, leaf_functions, share_parameters=True)
    except TraceError as e:
        gm = _exported(model, inputs, e)
    gm.eval()
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    known = inline_submodules(gm, PartialShapes(gm, device) if known else None) and known and shaped(gm)
    if not known:
        shape(gm, inputs)  # shapes by interpreting the graph: no code is generated until the end
    index_assignments(gm)  # writes into views spelled as the exporters keep them (repfold.frontends.writes)
    traced = gm.meta.get(META_KEY, {}).get("trace")  # insert's: torch.export where fx could not
    report = FoldReport("fx" if traced in (None, "torch.fx") else f"fx, traced by {traced}",
                        ops_before=op_counts(gm), params_before=n_params(gm))

    # ``insert`` froze the model's own parameters to train adapters; the folded model gets them back trainable
    # (as the model was before insert, and as an export expects: a frozen nn.MultiheadAttention takes a fused path).
    frozen = set(gm.meta.get(META_KEY, {}).get("frozen", ()))
    thaw = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in frozen}
    ctx = FxContext(gm, thaw, inplace)
    read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    effects = Effects(gm, ctx.weights.private_writes)
    live_before = effects.live()
    steps, step_of = _driver.match(  # weight-only values are constants to the rules, never ops of a region
        [n for n in gm.graph.nodes if n not in ctx.weights.members], lambda n: fx_rules(n, ctx.module(n) if n.op == "call_module" else None),
        lambda rule, node: rule.match_fx(node, ctx), _name_of, _name_of)

    def consumers(name: str) -> list[str]:  # users that run for a reason: live, and not shape reads
        # (a user that a step of several nodes covers, OFT's reshape -> einsum -> reshape: that step)
        return [OUTPUT if u.op == "output" else step_of.get(id(u), u.name) for u in nodes[name].users
                if u in live_before and not is_shape_read(u)]

    def label(name: str) -> str:
        n = nodes[name]
        if n.op == "call_module":
            return f"{n.target} ({type(ctx.module(n)).__name__})"
        scope = (module_paths(n) or [None])[-1]
        what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.name)
        return f"{scope} ({what})" if scope else n.name

    def shape_reads(name: str) -> list[tuple[str, int, bool]]:
        return [(label(u.name), order[u.name], reads_rank_only(u)) for u in nodes[name].users
                if is_shape_read(u) and u in live_before]

    def shared(name: str) -> bool:  # a layer whose weights another call reads too
        n = nodes[name]
        if n.op == "call_module":
            return ctx.calls[n.target] > 1
        w = n.args[1] if n.op == "call_function" and len(n.args) > 1 else None
        return isinstance(w, fx.Node) and w.op == "get_attr" and (ctx.reads[w.target] > 1 or len(w.users) > 1)

    plan = _engine.plan(
        steps, consumers, lambda n: ctx.shape(nodes[n]), label, scales=scales, dtype=lambda n: ctx.dtype(nodes[n]),
        shape_reads=shape_reads, position=order.__getitem__, hazard=lambda n: effects.hazard(nodes[n], label, order),
        written={n.name for n in effects.written()} | cut, shared=shared,
    )
    report.regions = plan.regions + _lost_adapters(gm, plan.regions, label)
    report.unseen = plan.unseen
    by_name = {s.name: s for s in steps}
    return Prepared(gm, ctx, plan, report, nodes, effects, read_before, live_before, by_name, label, inputs)


def _lost_adapters(gm: fx.GraphModule, regions, label) -> list[Region]:
    """A kept region for each adapter of ``repfold.insert`` that no region found holds, so that the report
    names every adapter (one the fold cannot even see stays in the model: the report must say so)."""

    lost = []
    for scope, target in gm.meta.get(META_KEY, {}).get("adapters", {}).items():
        mine = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(target + ".")]
        if not mine or any(op.startswith(target + ".") for r in regions for op in r.ops):
            continue
        source = next((a for a in mine[0].all_input_nodes), mine[0])
        lost.append(Region(label(source.name), [label(n.name) for n in mine], folded=False,
                           reason=f"the adapter {placement(scope)} forms no region: no Linear or convolution next to it "
                                  "with only channel-affine ops between"))
    return lost


def fold_fx(
    model: nn.Module, example=None, *, scales: bool = True, leaf_modules=(), leaf_functions=(), into=None,
    own_class: bool = False, inplace: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every adapter region of ``model``; returns a new GraphModule and the report.

    No dead-code pass runs on the user's graph: the only nodes removed are
    those the fold itself made unread (see :func:`_remove_unread`), so in-place
    writes, asserts and random ops whose results nobody reads stay.

    With ``into`` (the module ``model`` was made from, of the user's class),
    the result is a copy of ``into`` holding the fold as module edits
    (``repfold.frontends.classes``), checked against the folded graph; a region
    that did not fold refuses it. With ``own_class``, the result is a copy of
    ``model`` itself, of its class: regions the class cannot hold the fold of
    (ops written in a forward's own code, which the class would still run) are
    planned again as kept, with the reason, so that the copy computes exactly
    the folded graph.

    With ``inplace`` the result is ``model`` itself (``into`` itself), edited:
    each re-weighted layer's new values are written into its own tensors, a
    block of rows at a time, so that the fold adds one layer's working set to
    the model's memory, not a copy. A fold into the class plans its cuts first
    without writing anything (no weight is written twice).
    """
    cut: set[str] = set()
    why: dict[str, str] = {}  # a region's source (its label) -> the code the class still runs of it
    folded_first: set[str] = set()
    for attempt in range(_ATTEMPTS):
        dry = inplace and own_class  # (an in-place fold into the class writes once, with the last plan's cuts)
        p = prepare(model, example, scales=scales, leaf_modules=leaf_modules, leaf_functions=leaf_functions,
                    cut=frozenset(cut), inplace=inplace and not dry)
        p.ctx.dry = dry
        before = scopes(p.gm) if into is not None or own_class else None
        reads = {n.name: [i.name for i in n.all_input_nodes if i.op != "get_attr"]  # (before the rewrite
                 for n in p.gm.graph.nodes} if own_class else {}  # erases what it removes)
        gm, report = _rewritten(p, model, scales, leaf_modules, leaf_functions)
        if into is not None:
            return into_class(into, gm, before, p.inputs, report, inplace=inplace), report
        if not own_class:
            return (take_over(model, gm) if inplace else gm), report
        if attempt == 0:
            folded_first = {r.source for r in report.folded}
        found = {op: v for op, v in in_code(before, gm, p.plan.members, p.nodes, model).items() if op not in cut}
        if not found:
            break
        for op in found:  # the op alone: no region may hold it, from what it reads or into what reads it
            cut |= {op, *reads[op]}
        why.update({p.label(src): reason for src, reason in found.values()})
    if inplace:  # the plan settled: carried out once more, for real, into the model's own tensors
        p = prepare(model, example, scales=scales, leaf_modules=leaf_modules, leaf_functions=leaf_functions,
                    cut=frozenset(cut), inplace=True)
        before = scopes(p.gm)
        gm, report = _rewritten(p, model, scales, leaf_modules, leaf_functions)
    for r in report.kept:  # what the class made the fold leave, with where
        if r.source in why or r.source in folded_first:
            r.reason = why.get(r.source) or f"{r.reason}; the class's own code ends it there: {GRAPH_HINT}"
    return into_own_class(model, gm, before, p.inputs, report, inplace=inplace), report


def take_over(model: fx.GraphModule, gm: fx.GraphModule) -> fx.GraphModule:
    """``model`` made the folded ``gm`` (its graph, submodules, parameters and buffers): a fold in place."""
    for store in ("_modules", "_parameters", "_buffers"):
        held = getattr(model, store)
        held.clear()
        held.update(getattr(gm, store))
    model.meta = gm.meta
    model.graph = gm.graph  # (recompiles)
    model.train(False)
    return model


_ATTEMPTS = 4  # plans of a fold into the model's own class: each keeps the regions the last one found in code


def _rewritten(p: Prepared, model: nn.Module, scales: bool, leaf_modules, leaf_functions
               ) -> tuple[fx.GraphModule, FoldReport]:
    """The prepared graph with its plan carried out: the folded GraphModule and the report."""
    gm, ctx, plan, report = p.gm, p.ctx, p.plan, p.report
    _driver.rewrite(plan, p.by_name.values(), _FxEdits(p), p.label)
    gm.delete_all_unused_submodules()
    _drop_unread_tensors(gm, p.read_before)
    if ctx.inplace:  # the model's own tensors, written where they changed: trainable again, as before insert
        for t in gm.parameters():
            if id(t) in ctx.thaw:
                t.requires_grad_(True)
    elif not ctx.dry:
        own_parameters(gm, model, ctx.thaw)
    gm.meta.get(META_KEY, {}).pop("frozen", None)
    restore_aliases(gm)
    gm.graph.lint()
    gm.recompile()
    if not ctx.dry:  # (a dry fold's new tensors hold no values: it is only planned)
        _fold_leaves(gm, p.inputs, report, scales, leaf_modules, leaf_functions)
    report.ops_after, report.params_after = op_counts(gm), n_params(gm)
    gm.train(False)
    return gm, report


def _fold_leaves(gm: fx.GraphModule, inputs: tuple, report: FoldReport, scales: bool, leaf_modules=(),
                 leaf_functions=()) -> None:
    """Fold inside the modules the trace kept whole (timm's blocks that fx cannot trace: TinyViT's, the
    windowed attention of EfficientViT-MSRA), as timm's own merge does: each of their submodules that traces
    on its own is folded as a model of its own, on the inputs it received in one run of ``gm``, checked
    against the submodule on those inputs, and put back where it was. Its regions join the report, under
    the submodule's path; one that does not trace, or is called more than once, is looked into in turn."""
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module" and not torch_own(gm.get_submodule(n.target))
              and next(gm.get_submodule(n.target).children(), None) is not None]
    if not leaves:
        return
    calls: dict[int, list] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: calls.setdefault(id(m), []).append((args, kwargs)),
                                         with_kwargs=True)
             for path in leaves for m in gm.get_submodule(path).modules()]
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()

    def visit(owner: nn.Module, name: str, m: nn.Module, path: str) -> None:
        if next(m.children(), None) is None:
            return
        seen = calls.get(id(m), [])
        if len(seen) == 1 and not seen[0][1] and all(isinstance(a, torch.Tensor) for a in seen[0][0]):
            args = seen[0][0]
            try:
                folded, sub = fold_fx(m, args, scales=scales, leaf_modules=leaf_modules, leaf_functions=leaf_functions)
            except (TraceError, NotAffine):
                folded = None
            if folded is not None and _same(folded, m, args) and sub.params_after <= sub.params_before:
                if sub.ops_after != sub.ops_before or sub.regions:
                    for k, v in vars(m).items():  # what the block reads of it besides calling it (``attn.resolution``)
                        if not k.startswith("_") and not hasattr(folded, k):
                            setattr(folded, k, v)
                    setattr(owner, name, folded)
                    for r in sub.regions:
                        r.source = f"{path}.{r.source}"
                        r.ops = [f"{path}.{o}" for o in r.ops]
                        r.into = [f"{path}.{o}" for o in r.into]
                    report.regions.extend(sub.regions)
                return
        for child_name, child in list(m.named_children()):
            visit(m, child_name, child, f"{path}.{child_name}")

    for path in leaves:
        leaf = gm.get_submodule(path)
        seen = calls.get(id(leaf), [])
        if len(seen) != 1:
            continue
        args, kwargs = seen[0]
        before, n_regions = copy.deepcopy(leaf), len(report.regions)
        for name, child in list(leaf.named_children()):
            visit(leaf, name, child, f"{path}.{name}")
        try:  # the block as a whole, on its inputs of that run: what it computed before
            same = _same(functools.partial(leaf, **kwargs), functools.partial(before, **kwargs), args)
        except Exception:  # noqa: BLE001 (the block reads its submodules in a way the folded ones do not serve)
            same = False
        if not same:
            owner, _, name = path.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, name, before)
            del report.regions[n_regions:]


def _same(folded: nn.Module, m: nn.Module, args: tuple) -> bool:
    """Whether ``folded`` computes what ``m`` does on ``args``, within the rounding of their element type."""
    with torch.no_grad():
        a, b = folded(*args), m(*args)
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if not isinstance(y, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            return False
        if y.is_floating_point():
            tol = 1e-9 if y.dtype == torch.float64 else 1e-4 if y.dtype == torch.float32 else 5e-2
            scale = float(y.double().abs().max()) or 1.0
            if float((x.double() - y.double()).abs().max()) > tol * scale:
                return False
        elif not torch.equal(x, y):
            return False
    return True


# Augmented assignments on tensors write into their left operand.
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}
# Ops whose result may share memory with their first argument: a write to one is a write to the other.
_VIEWS = {
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "swapaxes", "swapdims", "t", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "movedim", "moveaxis",
    "contiguous", "detach", "split", "chunk", "unbind", "unfold", "as_strided", "diagonal", "getitem", "type_as",
    "to", "float", "half", "double", "bfloat16", "type", "real", "imag", "view_as_real", "view_as_complex",
    "tensor_split", "split_with_sizes",
}


class Effects:
    """What an fx graph does besides computing values: writes in place, asserts, random draws.

    Those ops are roots of liveness (they run whether or not their result is
    read), and a value written in place cannot be read at another point of the
    graph than where it was read before.
    """

    def __init__(self, gm: fx.GraphModule, private: set[fx.Node] = frozenset()) -> None:
        self.gm = gm
        self.private = private  # writes into a value nothing else reads (:class:`WeightOnly`): no effect
        self.writes: dict[fx.Node, list[fx.Node]] = {}  # alias root -> the in-place ops that write it
        self.effect_roots = {n for n in gm.graph.nodes if self.for_effect(n)}  # as the input had them
        for n in gm.graph.nodes:
            if self.mutates(n) and n.args and isinstance(n.args[0], fx.Node):
                self.writes.setdefault(self.root(n.args[0]), []).append(n)
            elif n in self.effect_roots:  # may write any tensor it is given (MViT's wrapped ``_add_shortcut``)
                for a in n.all_input_nodes:
                    self.writes.setdefault(self.root(a), []).append(n)

    @staticmethod
    def for_effect(n: fx.Node) -> bool:
        """A call whose result nobody reads: it is only there for what it does besides (a write, a check)."""
        return n.op in ("call_function", "call_method", "call_module") and not n.users and not is_shape_read(n)

    def mutates(self, n: fx.Node) -> bool:
        """Whether ``n`` writes into its first argument."""
        return self.mutates_node(self.gm, n)

    @staticmethod
    def mutates_node(gm: fx.GraphModule, n: fx.Node) -> bool:
        """Whether ``n`` of ``gm``'s graph writes into its first argument."""
        if n.op == "call_method":
            t = n.target
            dunder = t.startswith("__") and getattr(operator, t.strip("_"), None) in _INPLACE_OPERATORS  # __iadd__
            return (t.endswith("_") and not t.startswith("_")) or dunder or bool(n.kwargs.get("inplace"))
        if n.op == "call_function":
            if n.target in _INPLACE_OPERATORS:
                return True
            name = getattr(n.target, "__name__", "").partition(".")[0]  # ATen's overloads: index_put_.default
            return (name.endswith("_") and not name.startswith("_")) or _inplace_flag(n)
        if n.op == "call_module":
            return getattr(gm.get_submodule(n.target), "inplace", False) is True
        return False

    def impure(self, n: fx.Node) -> bool:
        if n in self.private:
            return False
        if n.op == "output" or self.mutates(n) or n in self.effect_roots:
            return True
        try:
            return n.is_impure()
        except Exception:  # noqa: BLE001 (purity unknown, a call fx cannot look into: it runs)
            return True

    def root(self, n: fx.Node) -> fx.Node:
        """The value whose memory ``n`` may share, through views and in-place writes."""
        return self.root_of(self.gm, n)

    @classmethod
    def root_of(cls, gm: fx.GraphModule, n: fx.Node) -> fx.Node:
        """:meth:`root` of node ``n`` of ``gm``'s graph."""
        while n.args and isinstance(n.args[0], fx.Node) and (_name(n) in _VIEWS or cls.mutates_node(gm, n)
                                                             or _returns_its_input(gm, n)):
            n = n.args[0]
        return n

    def written(self) -> set[fx.Node]:
        """The values read after an op wrote into them in place (directly or through another view of the same
        memory) since they were made: what such a reader sees is not what made the value computed."""
        order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        found = set()
        for n in self.gm.graph.nodes:
            writers = [w for w in self.writes.get(self.root(n), ()) if w not in self.private]
            last = max((order[u] for u in n.users if not is_shape_read(u)), default=-1)
            if any(order[n] < order[w] < last for w in writers):
                found.add(n)
        return found

    def live(self) -> set[fx.Node]:
        """The nodes that run for a reason: impure ones and what they read, directly or not."""
        g = _graph.digraph((i, n) for n in self.gm.graph.nodes for i in n.all_input_nodes)
        g.add_nodes_from(self.gm.graph.nodes)
        return _graph.live(g, [n for n in self.gm.graph.nodes if self.impure(n)])

    def hazard(self, n: fx.Node, label, order: dict[str, int]) -> str | None:
        """Why ``n`` may not be read later than it is now: it is written in place after it is first read.

        A fold reads a region's source again where the layer it folds into
        was (after the region's own reads), so a write in between would be
        seen. Writes before every read (``x = act(x); x.mul_(2)``) are not.
        """
        writers = self.writes.get(self.root(n), [])
        reads = [order[u.name] for u in n.users if u not in writers and not is_shape_read(u)]
        late = [w for w in writers if reads and order[w.name] > min(reads)]
        if not late:
            return None
        return f"is written in place by {label(late[0].name)} after it is read: a fold cannot move where it is read"


def _returns_its_input(gm: fx.GraphModule, n: fx.Node) -> bool:
    """An eval-mode dropout or an identity: its result is its input tensor itself."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
        return type(m) is nn.Identity or (type(m) in dropouts and not m.training)
    return n.op == "call_function" and _name(n) in ("dropout", "alpha_dropout", "feature_alpha_dropout") and \
        n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True) is False


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


_SIGNATURES: dict = {}


def _inputs(n: fx.Node) -> list[fx.Node]:
    return n.all_input_nodes


def _inplace_flag(n: fx.Node) -> bool:
    """Whether a call passes ``inplace=True`` (by keyword or by position: ``F.relu(x, True)``)."""
    if n.kwargs.get("inplace") is True:
        return True
    if n.target not in _SIGNATURES:
        try:
            _SIGNATURES[n.target] = inspect.signature(n.target)
        except (TypeError, ValueError):
            _SIGNATURES[n.target] = None
    sig = _SIGNATURES[n.target]
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        return sig.bind(*n.args, **n.kwargs).arguments.get("inplace") is True
    except TypeError:
        return False


def _remove_unread(graph: fx.Graph, live_before: set[fx.Node], before: set[fx.Node], effects: Effects) -> None:
    """Erase the nodes the fold made unread: live before (or made by the fold), not now, and the dead ops
    that read them.

    Nothing else goes: a node that was already unread in the input stays, as
    does every in-place write, assert and random op (they are roots).
    """
    live_after = effects.live()
    doomed = {n for n in graph.nodes if (n in live_before or n not in before) and n not in live_after}
    for n in graph.nodes:  # topological order: dead readers of doomed nodes go with them
        if n not in doomed and n not in live_after and any(i in doomed for i in n.all_input_nodes):
            doomed.add(n)
    for n in reversed(list(graph.nodes)):
        if n in doomed:
            graph.erase_node(n)


def _drop_unread_tensors(gm: fx.GraphModule, read_before: set[str]) -> None:
    """Delete parameters and buffers the graph read through get_attr before the fold and no longer does.

    Those are the old weights of ``F.linear``-style layers that now read new
    ones; a tensor that a called module reads in its own forward is kept.
    """
    now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in read_before - now:
        owner, _, name = target.rpartition(".")
        if any(owner == c or owner.startswith(c + ".") for c in called) or not has_submodule(gm, owner):
            continue  # read by a module's own forward, or already gone with its unused module
        mod = gm.get_submodule(owner)
        mod._parameters.pop(name, None)
        mod._buffers.pop(name, None)


def _memory(t: torch.Tensor) -> tuple:
    """Where ``t``'s values live (two views of one storage share it)."""
    return (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else (id(t),)


def _name_of(n: fx.Node) -> str:
    return n.name


class _FxEdits:
    """The graph edits of a fold (:class:`repfold.core.driver.Edits`) on an fx graph."""

    def __init__(self, p: Prepared) -> None:
        self.p, self.graph, self.nodes = p, p.gm.graph, p.nodes
        self.replaced: list[tuple[fx.Node, fx.Node]] = []
        self.instead: dict[str, fx.Node] = {}  # filled by commit()
        self._present: set[fx.Node] | None = None

    def value(self, name: str) -> fx.Node:
        return self.instead.get(name) or self.nodes[name]

    def swap(self, pairs) -> dict:
        return dict(pairs)

    def emit(self, step, swap, W, b, *, producer: bool) -> fx.Node:
        old = self.nodes[step.name]
        # "into": where the layer was (the plan counts on it); a producer's: right after it (before the node
        # after it: an emit of several nodes, a pad and its conv, would come out reversed after it)
        with self.graph.inserting_before(old.next if producer else old):
            new = step.emit(swap, W, b)
        new.meta = dict(old.meta)
        return new

    def copy_layout(self, name: str, ins: list, perm) -> fx.Node:
        orig = self.nodes[name]
        with self.graph.inserting_after(orig):
            if perm is not None:
                return self.graph.call_method("permute", (ins[0], *perm))
            swap = {self.nodes[old]: new for old, new in zip(self.p.by_name[name].inputs, ins)}
            return self.graph.node_copy(orig, lambda a: swap.get(a, a))

    def replace(self, target: str, new: fx.Node) -> None:
        self.replaced.append((self.nodes[target], new))

    def commit(self) -> None:
        for old, new in self.replaced:
            old.replace_all_uses_with(new)
            self.instead[old.name] = new

    def redirect(self, name: str, to: fx.Node) -> None:
        node = self.nodes[name]
        for user in [u for u in node.users if is_shape_read(u)]:
            user.replace_input_with(node, to)

    def remove_unread(self) -> None:
        _remove_unread(self.graph, self.p.live_before, set(self.nodes.values()), self.p.effects)

    def present(self, name: str) -> bool:
        if self._present is None:
            self._present = set(self.graph.nodes)
        return self.nodes[name] in self._present

    def dtype(self, name: str):
        return self.p.ctx.dtype(self.nodes[name])
