"""The torch.fx frontend: graph -> steps for the engine, and the rewrite of a plan."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from repfold.patterns import RULES
from repfold.patterns._base import as_numpy

from . import _engine
from ._report import FoldReport
from ._trace import META_KEY, VALUE_KEY, example_inputs, is_shape_read, own_parameters, shape, to_graph_module


class FxContext:
    """What the fx matchers in ``repfold.patterns`` may ask about a graph."""

    def __init__(self, gm: fx.GraphModule, thaw: set[int] = frozenset()) -> None:
        self.gm, self.graph = gm, gm.graph
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.thaw = thaw

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
        """The value of a constant argument (a number or a get_attr tensor), else None."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = _get_attr(self.gm, arg.target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.detach().to(torch.float64).cpu().numpy()
        return None

    def new_param(self, hint: str, value: np.ndarray, like: fx.Node) -> fx.Node:
        """Register ``value`` as a new parameter (dtype and device of ``like``'s tensor); its get_attr node.

        The name is ``hint`` made unique, so a tensor others still read is never replaced.
        """
        ref = _get_attr(self.gm, like.target)
        t = torch.from_numpy(as_numpy(value, ref)).reshape(ref.shape).to(ref)
        base, i = hint.replace(".", "_") + "_folded", 0
        name = base
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_parameter(name, nn.Parameter(t, requires_grad=self.trainable(ref)))
        return self.graph.get_attr(name)

    def replace_module(self, node: fx.Node, new: nn.Module) -> str:
        """Install ``new`` in place of ``node``'s module; a new name if others call the old one."""
        target = node.target
        if self.calls[target] > 1:
            base, i = f"{target}_folded", 0
            while _has_submodule(self.gm, target):
                target = f"{base}_{i}" if i else base
                i += 1
        _set(self.gm, target, new)
        return target


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_submodule(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False


def _set(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    if not _has_submodule(gm, parent):
        gm.add_submodule(target, new)
    else:
        setattr(gm.get_submodule(parent), name, new)


def _is_leaf(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "")


def inline_submodules(gm: fx.GraphModule) -> None:
    """Trace through every call of a non-torch module (adapters included), in place.

    The graph changes; ``gm``'s code is not regenerated (the caller recompiles when it is done).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or _is_leaf(gm.get_submodule(node.target)):
            continue
        sub = gm.get_submodule(node.target)
        try:
            sub_graph = fx.Tracer().trace(sub)  # a graph only: no GraphModule, no code generated
        except Exception:  # a leaf the user or timm named: it stays whole, and opaque to folds
            continue
        result = _splice(graph, node, sub_graph)
        if isinstance(result, fx.Node):
            node.replace_all_uses_with(result)
            graph.erase_node(node)


def _splice(graph: fx.Graph, call: fx.Node, sub: fx.Graph):
    """Copy ``sub`` in before ``call`` with its inputs bound to ``call``'s arguments."""
    args, env, result = list(call.args), {}, None
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
    return result


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Operator counts of a graph: modules by class, functions and methods by name."""
    counts: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[type(gm.get_submodule(n.target)).__name__] += 1
        elif n.op in ("call_function", "call_method"):
            t = n.target
            counts[t if isinstance(t, str) else getattr(t, "__name__", str(t))] += 1
    return dict(counts)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_fx(
    model: nn.Module, example=None, *, scales: bool = False, leaf_modules=(), leaf_functions=()
) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every adapter region of ``model``; returns a new GraphModule and the report."""
    # The copy shares the caller's parameters until the end: adapters and absorbed weights are never cloned.
    gm = to_graph_module(model, leaf_modules, leaf_functions, share_parameters=True)
    gm.eval()
    inline_submodules(gm)
    gm.graph.eliminate_dead_code()  # shapes are found by interpreting the graph: no code is generated until the end
    shape(gm, example_inputs(model, example))
    report = FoldReport("fx", ops_before=op_counts(gm), params_before=n_params(gm))

    # ``insert`` froze the model's own parameters to train adapters; the folded model gets them back trainable
    # (as the model was before insert, and as an export expects: a frozen nn.MultiheadAttention takes a fused path).
    frozen = set(gm.meta.get(META_KEY, {}).get("frozen", ()))
    thaw = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in frozen}
    ctx = FxContext(gm, thaw)
    read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    nodes = {n.name: n for n in gm.graph.nodes}
    steps = []
    for node in gm.graph.nodes:
        for rule in RULES:
            m = rule.match_fx(node, ctx)
            if m is not None:
                ins = tuple(i.name for i in m.inputs)
                steps.append(_engine.Step(node.name, m.op, ins, m.label, m.emit))
                break

    def consumers(name: str) -> list[str]:
        return [_engine.OUTPUT if u.op == "output" else u.name for u in nodes[name].users if not is_shape_read(u)]

    def label(name: str) -> str:
        n = nodes[name]
        if n.op == "call_module":
            return f"{n.target} ({type(ctx.module(n)).__name__})"
        scope = next(reversed(n.meta.get("nn_module_stack", {None: None})))
        what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.name)
        return f"{scope} ({what})" if scope else n.name

    plan = _engine.plan(steps, consumers, lambda n: ctx.shape(nodes[n]), label, scales=scales)
    report.regions = plan.regions
    by_name = {s.name: s for s in steps}
    copies: dict[tuple[str, str], fx.Node] = {}  # (base, layout step) -> its replay on base
    replaced: list[tuple[fx.Node, fx.Node]] = []
    for f in plan.folds:
        absorber = nodes[f.absorber]
        if f.kind == "producer":
            with gm.graph.inserting_after(absorber):
                new = by_name[f.absorber].emit({}, f.W, f.b)
            new.meta = dict(absorber.meta)
            new = _replay(gm.graph, f, new, nodes, by_name, copies)
        else:
            x = _replay(gm.graph, f, nodes[f.source], nodes, by_name, copies)
            swap = {nodes[f.exit if f.kind == "sink" else by_name[f.absorber].inputs[0]]: x}
            with gm.graph.inserting_before(nodes[f.target]):
                new = by_name[f.absorber].emit(swap, f.W, f.b)
            new.meta = dict(absorber.meta)
        replaced.append((nodes[f.target], new))
        f.region.note_cast(ctx.dtype(nodes[f.target]), f.W, f.b)
    # Rewired only now: a fold's ``swap`` names the original nodes, which an earlier rewiring would hide.
    for old, new in replaced:
        old.replace_all_uses_with(new)
    _redirect_shape_reads(gm.graph, plan.members, nodes, copies)
    gm.graph.eliminate_dead_code()  # the replaced regions, now unread
    gm.delete_all_unused_submodules()
    _drop_unread_tensors(gm, read_before)
    own_parameters(gm, model, thaw)
    gm.meta.get(META_KEY, {}).pop("frozen", None)
    gm.graph.lint()
    gm.recompile()
    report.ops_after, report.params_after = op_counts(gm), n_params(gm)
    return gm, report


def _drop_unread_tensors(gm: fx.GraphModule, read_before: set[str]) -> None:
    """Delete parameters and buffers the graph read through get_attr before the fold and no longer does.

    Those are the old weights of ``F.linear``-style layers that now read new
    ones; a tensor that a called module reads in its own forward is kept.
    """
    now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in read_before - now:
        owner, _, name = target.rpartition(".")
        if any(owner == c or owner.startswith(c + ".") for c in called) or not _has_submodule(gm, owner):
            continue  # read by a module's own forward, or already gone with its unused module
        mod = gm.get_submodule(owner)
        mod._parameters.pop(name, None)
        mod._buffers.pop(name, None)


def _replay(graph: fx.Graph, f: _engine.Fold, base: fx.Node, nodes, by_name, copies) -> fx.Node:
    """Copy the fold's layout steps onto ``base`` (each right after its original); the last copy."""
    env = {_engine.SOURCE: base}
    for name, ins, perm in f.via:
        key = (base.name, name)
        if key not in copies:
            orig = nodes[name]
            with graph.inserting_after(orig):
                if perm is not None:
                    copies[key] = graph.call_method("permute", (env[ins[0]], *perm))
                else:
                    swap = {nodes[old]: env[new] for old, new in zip(by_name[name].inputs, ins)}
                    copies[key] = graph.node_copy(orig, lambda a: swap.get(a, a))
        env[name] = copies[key]
    return env[f.start]


def _redirect_shape_reads(graph: fx.Graph, members: dict[str, str], nodes, copies) -> None:
    """Point shape reads of folded ops at a value of the same shape that stays: a replay or the source."""
    for name, src in members.items():
        node = nodes[name]
        for user in [u for u in node.users if is_shape_read(u)]:
            target = next((c for (_, orig), c in copies.items() if orig == name), None)
            if target is None and nodes[src].meta.get("tensor_meta") is not None:
                same = nodes[src].meta["tensor_meta"].shape == node.meta["tensor_meta"].shape
                target = nodes[src] if same else None
            if target is not None:
                user.replace_input_with(node, target)
