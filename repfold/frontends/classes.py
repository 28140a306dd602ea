"""A fold written back into the user's own class: module-level edits on a copy of the model.

``fold_fx`` folds a graph; a user of timm, PEFT or ultralytics deploys their own class. The folded graph
says, for every module scope of the model, what is left of it:

* nothing computing (all its ops went into an absorber: a BatchNorm, a LayerScale, an adapter module; a
  shape check may stay): the submodule becomes an identity (:class:`Folded` for a BatchNorm);
* a chain of calls of its own layers and nothing else (a PEFT tuner layer folded into its ``base_layer``,
  a RepVGG block summed into its 3x3 conv): the scope becomes those layers (one, or an ``nn.Sequential``
  named as they were), where the identities alone do not compute the fold (the wrapper's code still runs
  its adapters); the innermost scope holding the chain takes it, and a container the code indexes
  (``ModuleList``) is never replaced;
* a layer the fold rebuilt at the path the model has, or a tensor it rebuilt under a new name
  (``REPLACED_KEY``): the new values go into the model's tensors (a bias where the layer had none is added).

What module edits cannot say (a layer rebuilt under a new name because other code reads its weights, a
tensor the model does not hold) refuses the write-back with the reason. The copy is then run once on the
example inputs against the folded graph: a difference beyond float rounding refuses it too. An op of a
forward's own code that a fold removes (``x * self.gamma``) is one the class would still run:
:func:`in_code` finds them, so that the fold is planned again with each such op cut off from every region
(``fx.fold_fx``), and :func:`into_own_class` reports what that left.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import fx, nn

from repfold.frontends.trace import get_attr, has_submodule, module_paths
from repfold.frontends.trace import set_module as _set_module
from repfold.report import FoldReport

REPLACED_KEY = "repfold_replaced"  # gm.meta: a tensor the fold made -> the model's tensor whose values it
# replaces (None: a new one, such as a bias where a layer had none)
TOLERANCE = 1e-5  # relative to the output's largest magnitude: float32 rounding, not a different computation


class Folded(nn.Identity):
    """An identity in place of a submodule whose ops all folded into a neighbouring layer.

    Code of the model's own may still read a folded BatchNorm's statistics (ultralytics' ``fuse()``, which
    its exporter runs, folds every ``Conv.bn`` into its conv): :meth:`of` gives the identity those of a
    BatchNorm that changes nothing (mean 0, variance 1, weight 1, bias 0, eps 0), which such a fold takes
    exactly (it multiplies by 1 / sqrt(0 + 1) = 1 and adds 0). They are buffers kept out of the state dict:
    no parameter is added, and ``forward`` runs nothing.
    """

    @classmethod
    def of(cls, module: nn.Module) -> nn.Identity:
        """The identity for ``module``: a plain ``nn.Identity`` unless it held a BatchNorm's statistics."""
        if not all(isinstance(getattr(module, k, None), torch.Tensor) for k in ("running_mean", "running_var")):
            return nn.Identity()
        out = cls()
        like = module.running_mean
        for name, value in (("running_mean", 0.0), ("running_var", 1.0), ("weight", 1.0), ("bias", 0.0)):
            out.register_buffer(name, torch.full_like(like, value), persistent=False)
        out.eps = 0.0
        return out


class NotWritable(ValueError):
    """The fold cannot be written into the model's class as module edits."""


def scopes(gm: fx.GraphModule) -> dict[str, list[str]]:
    """The names of the nodes that run inside each module scope of ``gm`` (``blocks.0.attn``): for a module
    call or an attribute read, the paths its target lies under (a call of torch.export's own ``_guards_fn``
    lies under none); for any other op, what the trace recorded."""
    out: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op in ("call_module", "get_attr"):
            parts = n.target.split(".")
            paths = {".".join(parts[:k]) for k in range(1, len(parts) + (n.op == "call_module"))}
        else:  # (with every path above them: torch.export's stack may start below the root's children)
            paths = {".".join(parts[:k]) for path in module_paths(n) if path
                     for parts in [path.split(".")] for k in range(1, len(parts) + 1)}
        for p in paths:
            out.setdefault(p, []).append(n.name)
    return out


def write_back(model: nn.Module, folded: fx.GraphModule, before: dict[str, list[str]], inputs: tuple,
               label: str = "the model", inplace: bool = False) -> tuple[nn.Module, list[str], float]:
    """A copy of ``model`` (never modified) holding the fold of its graph: ``(copy, edits, error)``; the
    edits in words and the copy's largest difference from ``folded`` on ``inputs``. ``before``: the
    :func:`scopes` of the graph the fold started from. Raises :class:`NotWritable`.

    The fewest structural edits first: layers re-weighted and folded submodules made identities, so that
    the copy's state dict keeps the model's layout (a conv's BatchNorm becomes an identity, the conv stays
    where it was); only where that does not compute the fold (a wrapper whose forward still runs the
    adapters it held: PEFT's tuner layers) are wrappers replaced by the one layer left of them.

    With ``inplace`` the edits are made on ``model`` itself (whose tensors the fold wrote already), and
    undone where they do not compute the fold.
    """
    error, why = float("inf"), ""
    after = scopes(folded)
    for wrappers in (False, True):
        undo: list[Callable[[], None]] = []
        own, edits = _edited(model, folded, before, after, label, wrappers, undo if inplace else None)
        why = ""
        try:
            error, allowed = difference(own, folded, inputs)
        except Exception as e:  # noqa: BLE001 (the class's own code failing on the edits is the answer: not these)
            error, allowed, why = float("inf"), TOLERANCE, f"{type(e).__name__}: {e}"
        if error <= allowed:
            return own, edits, error
        for step in reversed(undo):
            step()
    calls = {n.name for n in folded.graph.nodes}
    gone = sorted({name for names in before.values() for name in names if name not in calls})
    raise NotWritable(f"{label} with the fold's module edits computes something else than the folded graph "
                      f"({why or f'max error {error:.1e}'}): the fold removed ops its code still runs"
                      + (f" ({', '.join(gone[:3])}, ...)" if gone else ""))


def _edited(model: nn.Module, folded: fx.GraphModule, before: dict[str, list[str]], after: dict[str, list[str]],
            label: str, wrappers: bool, undo: list | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with the fold's module edits (with ``wrappers``, a scope left with one call of one
    of its submodules becomes that submodule, one left with a chain of them an ``nn.Sequential`` of them,
    named as they were), and the edits in words. With ``undo`` (a list), ``model`` itself is edited and
    ``undo`` gets the steps that take each module edit back."""
    own = model if undo is not None else copy.deepcopy(model, _shared_tensors(model, folded))
    mods = dict(own.named_modules())
    originals = dict(model.named_modules())  # (what a tensor was: the copy may hold the fold's already)

    def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
        if undo is not None:
            undo.append(functools.partial(_set_module, root, path, mods[path]))
        _set_module(root, path, new)

    def take(layer: nn.Module, rebuilt: nn.Module, path: str, was: nn.Module | None) -> bool:
        if undo is not None:
            missing = [k for k, t in layer._parameters.items() if t is None]
            undo.append(lambda: [layer._parameters.__setitem__(k, None) for k in missing])
        return _take(layer, rebuilt, path, was)

    settled: list[str] = []  # scopes replaced whole: nothing under them is edited again
    edits: list[str] = []

    def inside(path: str) -> bool:
        return any(path == s or path.startswith(s + ".") for s in settled)

    replaced = folded.meta.get(REPLACED_KEY, {})
    read = {n.target for n in folded.graph.nodes if n.op == "get_attr"}
    nodes = {n.name: n for n in folded.graph.nodes}
    for path, _ in model.named_modules():
        if not path or inside(path) or path not in before:
            continue
        left = after.get(path, [])
        if not callable_module(mods[path]):
            continue  # a container its owner's code indexes (ModuleList, ModuleDict): its entries are edited
        if not computing(nodes, left):  # every op of the scope went into an absorber (a shape check may stay)
            if not isinstance(mods[path], nn.Identity):
                set_module(own, path, Folded.of(mods[path]))
                edits.append(f"{path} ({type(mods[path]).__name__}) -> Identity")
            settled.append(path)
            continue
        chain = chained(nodes, path, left) if wrappers else None
        if chain and all(sub in mods for _, sub in chain):  # a wrapper around the layers left of it
            layers = []
            for n, sub in chain:
                if n.op == "call_module":  # (a call of a function's: its tensors are taken below)
                    take(mods[sub], folded.get_submodule(sub), sub, originals.get(sub))
                layers.append((sub[len(path) + 1:].replace(".", "_"), mods[sub]))
            new = layers[0][1] if len(layers) == 1 else nn.Sequential(OrderedDict(layers))
            set_module(own, path, new)
            settled.append(path)
            edits.append(f"{path} ({type(mods[path]).__name__}) -> its {' -> '.join(k for k, _ in layers)} "
                         f"({' -> '.join(type(m).__name__ for _, m in layers)}), re-weighted")
    for n in folded.graph.nodes:
        if n.op not in ("call_module", "get_attr") or inside(n.target):
            continue
        if n.op == "call_module":
            if n.target not in mods and n.target in before:
                continue  # a module of the trace's own (torch.export's ``_guards_fn``), there before the fold
            if n.target not in mods:
                raise NotWritable(f"the fold rebuilt a layer as {n.target!r}, a module {label} does not have "
                                  "(its weights are read elsewhere too)")
            rebuilt = folded.get_submodule(n.target)
            held = mods[n.target]
            if next(held.children(), None) is not None and _restructured(held, rebuilt):  # a block the trace
                # kept whole, folded inside
                set_module(own, n.target, rebuilt)  # (the folded graph's own: not returned, so not copied; a
                # GraphModule's deepcopy would drop what the block reads of it besides calling it)
                settled.append(n.target)
                edits.append(f"{n.target} ({type(mods[n.target]).__name__}) -> its folded copy (submodules "
                             "folded one by one)")
            elif take(mods[n.target], rebuilt, n.target, originals.get(n.target)):
                edits.append(f"{n.target} ({type(mods[n.target]).__name__}) re-weighted")
            continue
        new = get_attr(folded, n.target)
        if not isinstance(new, torch.Tensor):
            continue
        target = replaced.get(n.target) or n.target  # a new tensor in place of one of the model's, read no more
        owner, _, name = target.rpartition(".")
        held = getattr(mods.get(owner), name, None) if owner in mods else None
        if held is None and n.target not in replaced:
            continue  # a constant of the trace's own (``_tensor_constant0``), there before the fold
        if not isinstance(held, torch.Tensor) or held.shape != new.shape or (target != n.target and target in read):
            raise NotWritable(f"the fold made a tensor {n.target!r} that {label} does not hold")
        if held is not new and not torch.equal(held, new):
            with torch.no_grad():
                held.copy_(new)
        old = get_attr(model, target) if owner in originals else None
        if not (isinstance(old, torch.Tensor) and torch.equal(old, new)):
            edits.append(f"{target} re-weighted")
    own.train(False)
    return own, edits


def callable_module(module: nn.Module) -> bool:
    """Whether ``module`` is called (has a forward of its own), not a container the code indexes: only a
    called module can be replaced by an identity or by the layers left of it."""
    return type(module).forward is not nn.Module.forward


def chained(nodes: dict[str, fx.Node], path: str, left: list[str]) -> list[tuple[fx.Node, str]] | None:
    """The calls of ``path``'s submodules that are all that is left of scope ``path`` in ``folded``, with
    the submodule each stands for, when they form a chain (the first reads one value from outside, each
    next one only the one before): then the scope computes what the chain does (a multi-branch block
    summed into one conv, a PEFT tuner layer folded into its base layer); else None. A call is a module
    call, or an op of a submodule's own code that reads no other value (``F.embedding(ids, self.weight)``
    in a graph of ATen ops)."""
    out = []
    for n in computing(nodes, left):
        sub, data = _stands_for(n, path)
        if sub is None or len(data) != 1 or (out and (data[0] is not out[-1][0] or
                                                      [u for u in out[-1][0].users if not _checks(u)] != [n])):
            return None
        out.append((n, sub))
    children = {f"{path}.{sub[len(path) + 1:].split('.')[0]}" for _, sub in out}
    if len(children) == 1 and all(sub not in children for _, sub in out):
        return None  # all inside one child: that child (or one inside it) is the wrapper, not this scope
    return out or None


def _stands_for(n: fx.Node, path: str) -> tuple[str | None, list[fx.Node]]:
    """The submodule of ``path`` whose call ``n`` is (or None), and the values it reads besides tensors."""
    if n.op == "call_module":
        plain = not n.kwargs and len(n.args) == 1
        return (n.target if plain and n.target.startswith(path + ".") else None), list(n.all_input_nodes)
    inner = (module_paths(n) or [""])[-1]
    data = [i for i in n.all_input_nodes if i.op != "get_attr"]
    replaced = n.graph.owning_module.meta.get(REPLACED_KEY, {})
    own = {(replaced.get(i.target) or i.target).rpartition(".")[0] for i in n.all_input_nodes if i.op == "get_attr"}
    layer = n.op == "call_function" and inner.startswith(path + ".") and own == {inner}  # on its own tensors
    return (inner if layer else None), data


def computing(nodes: dict[str, fx.Node], left: list[str]) -> list[fx.Node]:
    """The nodes named ``left`` (of ``nodes``, a graph's by name) that compute tensors, or feed ops that do:
    not shape checks."""
    return [n for n in (nodes[name] for name in left) if not _checks(n)]


def _checks(n: fx.Node) -> bool:
    """Whether ``n`` computes no tensor and feeds none (a shape check: ``assert x.ndim == 4``), so that a
    chain replacing its scope may leave it out."""
    def plain(m: fx.Node) -> bool:
        return m.op in ("call_function", "call_method") and m.meta.get("tensor_meta") is None
    return plain(n) and all(plain(u) for u in n.users)


def _shared_tensors(model: nn.Module, folded: fx.GraphModule) -> dict[int, torch.Tensor]:
    """A deepcopy memo: each tensor of ``model`` that ``folded`` holds a copy of at the same path (of the same
    shape and dtype: the fold's own copy, re-weighted or not) stands for itself in the copy of ``model``,
    so that the class costs no second copy of the weights. ``folded`` is the fold's private graph, never
    returned beside the class; a tensor it still shares with ``model`` is copied as usual."""
    def tensors(m: nn.Module) -> dict[str, torch.Tensor]:
        return {**dict(m.named_parameters(remove_duplicate=False)), **dict(m.named_buffers(remove_duplicate=False))}

    ours = tensors(folded)
    return {id(t): ours[k] for k, t in tensors(model).items()
            if k in ours and ours[k] is not t and ours[k].shape == t.shape and ours[k].dtype == t.dtype}


def _restructured(held: nn.Module, rebuilt: nn.Module) -> bool:
    """Whether ``rebuilt`` differs from ``held`` in its submodules' paths or classes (a block that the trace
    kept whole, in which submodules were folded as models of their own)."""
    mine = {path: type(m) for path, m in held.named_modules()}
    return mine != {path: type(m) for path, m in rebuilt.named_modules()}


def _take(layer: nn.Module, rebuilt: nn.Module, path: str, was: nn.Module | None) -> bool:
    """``rebuilt``'s own tensors into ``layer`` (a bias it had none of is added); whether any differs from
    the model's layer ``was`` (``layer`` may hold the fold's tensors already: see :func:`_shared_tensors`)."""
    changed = False
    for name, t in [*rebuilt.named_parameters(recurse=False), *rebuilt.named_buffers(recurse=False)]:
        held = getattr(layer, name, None)
        if held is None and name in getattr(layer, "_parameters", {}):
            layer.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            changed = True
            continue
        if not isinstance(held, torch.Tensor) or held.shape != t.shape:
            raise NotWritable(f"the fold rebuilt {path!r} with a {name} of another shape than the model's layer")
        if held is not t and not torch.equal(held, t):
            with torch.no_grad():
                held.copy_(t)
        old = getattr(was, name, None)
        changed |= not (isinstance(old, torch.Tensor) and torch.equal(old, t))
    return changed


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def difference(own: nn.Module, folded: fx.GraphModule, inputs: tuple) -> tuple[float, float]:
    """``own``'s largest difference from ``folded`` on ``inputs``, relative to the output's largest
    magnitude, and the rounding allowed in the outputs' element type (:data:`TOLERANCE`, or a few of a
    half type's steps: the two may order the same ops differently)."""
    with torch.no_grad():
        got, want = _tensors(own(*inputs)), _tensors(folded(*inputs))
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf"), TOLERANCE
    floats = [b for b in want if b.numel() and b.is_floating_point()]
    scale = max((float(b.abs().max()) for b in floats), default=1.0)
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, want)
                if a.numel() and a.is_floating_point()), default=0.0)
    allowed = max([TOLERANCE, *(4 * torch.finfo(b.dtype).eps for b in floats)])
    return diff / max(scale, 1e-30), allowed


def into_class(into: nn.Module, gm: fx.GraphModule, before: dict, inputs: tuple, report: FoldReport,
               inplace: bool = False) -> nn.Module:
    """The fold written into a copy of ``into`` (its own class), when every adapter region folded; with
    ``inplace``, into ``into`` itself."""
    name = type(into).__name__
    kept = report.kept
    if kept:
        raise NotWritable(f"cannot write the fold into {name}: {len(kept)} region(s) did not fold, first "
                          f"{kept[0].source}: {kept[0].reason}")
    try:
        own, edits, error = write_back(into, gm, before, inputs, label=name, inplace=inplace)
    except NotWritable as e:
        if inplace:
            raise _written_in_place(name, e) from e
        raise
    report.into, report.edits, report.into_error = name, edits, error
    return own


def into_own_class(model: nn.Module, gm: fx.GraphModule, before: dict, inputs: tuple, report: FoldReport,
                   inplace: bool = False) -> nn.Module:
    """The fold written into a copy of ``model``, of its own class. Where the class cannot hold it even so
    (its code reads the folded modules in a way the edits do not serve), the copy is the model as it was and
    every adapter region is reported kept, with why; either way a warning names the adapters left running.
    With ``inplace``, into ``model`` itself (whose tensors the fold wrote already: there is no model as it
    was to fall back on, so that case raises)."""
    name = type(model).__name__
    try:
        own, edits, error = write_back(model, gm, before, inputs, label=name, inplace=inplace)
    except NotWritable as e:
        if inplace:
            raise _written_in_place(name, e) from e
        own, edits, error = copy.deepcopy(model), [], 0.0
        own.train(False)
        report.regions = [r for r in report.regions if not (r.scale and r.folded)]  # the model's own, as it was
        for r in report.regions:
            if r.folded:
                r.folded, r.into = False, []
                r.reason = f"{name} cannot hold the fold ({e}): {GRAPH_HINT}"
        report.ops_after, report.params_after = dict(report.ops_before), report.params_before
    report.into, report.edits, report.into_error = name, edits, error
    if not report.kept:
        own = _unwrapped(own, gm, inputs, report)
    left = [r for r in report.kept if not r.scale and r.reason and r.reason.endswith(GRAPH_HINT)]
    if left:
        warnings.warn(f"repfold.fold: {len(left)} adapter region(s) left running in {name}, first {left[0].source}: "
                      f"{left[0].reason}", UserWarning, stacklevel=4)
    return own


def _unwrapped(own: nn.Module, gm: fx.GraphModule, inputs: tuple, report: FoldReport) -> nn.Module:
    """The model a wrapper says it wraps (``get_base_model()``: a PEFT model's), once nothing of what it
    wraps it for is left, when that model alone computes the folded graph: what PEFT's ``merge_and_unload``
    returns. Otherwise ``own``."""
    get = getattr(own, "get_base_model", None)
    base = get() if callable(get) else None
    if not isinstance(base, nn.Module) or base is own or not any(m is base for m in own.modules()):
        return own
    try:
        error, allowed = difference(base, gm, inputs)
    except Exception:  # noqa: BLE001 (it does not take the wrapper's inputs: the wrapper stays)
        return own
    if error > allowed:
        return own
    report.edits.append(f"{report.into} -> its get_base_model() ({type(base).__name__})")
    report.into, report.into_error = type(base).__name__, max(report.into_error or 0.0, error)
    return base


def _written_in_place(name: str, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"repfold.fold(..., inplace=True): the folded weights were written into the model, but {name} cannot "
        f"hold the fold's module edits ({e}); this is repfold's failure, please report it. The model's weights "
        f"are folded while its modules are not: load its weights again, then fold without inplace=True (a copy "
        f"is returned, the model as it was where the class cannot hold the fold)")


GRAPH_HINT = "left in the class (fold(..., graph=True) folds it in a GraphModule)"


def in_code(before: dict[str, list[str]], gm: fx.GraphModule, members: dict[str, str], nodes: dict[str, fx.Node],
            model: nn.Module) -> dict[str, tuple[str, str]]:
    """The ops of folded regions that a class cannot drop, each with its region's source and why: an op the
    fold removed that runs in a forward's own code (``x * self.gamma``, ``x + self.up(self.down(x))`` written
    inline), not inside a submodule that the fold empties (made ``nn.Identity``) or leaves with one layer
    (a wrapper around it: PEFT's tuner layers), which module edits can express. ``members``: each op a
    fold removes, with its region's source; ``nodes``: the graph's nodes before the fold, by name."""
    after = scopes(gm)
    called = {path for path, m in model.named_modules() if callable_module(m)}
    now = {n.name: n for n in gm.graph.nodes}
    removable = {path for path in before if path in called and not computing(now, after.get(path, []))}  # identity
    removable |= {path for path, left in after.items() if path in before and path in called
                  and chained(now, path, left)}  # a wrapper
    kept = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}  # re-weighted where they are
    replaced = gm.meta.get(REPLACED_KEY, {})
    kept |= set(replaced.values())  # re-weighted where they are, under a new name in the graph
    rebuilt = {((module_paths(n) or [""])[-1], n.target) for n in gm.graph.nodes if n.op == "call_function"
               and any(i.op == "get_attr" and i.target in replaced for i in n.all_input_nodes)}
    out: dict[str, tuple[str, str]] = {}
    for name, src in members.items():
        n = nodes.get(name)
        if n is None or (n.op in ("call_module", "get_attr") and n.target in kept):
            continue
        if n.op == "call_function" and ((module_paths(n) or [""])[-1], n.target) in rebuilt:
            continue  # an op of a layer's own code that the fold rebuilt with new tensors, where it was
        chain = ([*_parents(n.target), n.target] if n.op == "call_module" else
                 _parents(n.target) if n.op == "get_attr" else module_paths(n))
        if any(path in removable for path in chain):
            continue
        where = chain[-1] if chain else ""
        owner = type(model.get_submodule(where) if has_submodule(model, where) else model).__name__
        place = f"{where!r} ({owner})" if where else "the model"
        out[name] = (src, f"its {n.name} is written in {place}'s forward code, which the class still runs: {GRAPH_HINT}")
    return out


def _parents(target: str) -> list[str]:
    parts = target.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]
