"""A fold written back into the user's own class: module-level edits on a copy of the model.

``fold_fx`` returns a GraphModule; a user of timm, PEFT or ultralytics deploys their own class. The folded
graph says, for every module scope of the model, what is left of it:

* nothing (all its ops went into an absorber: a BatchNorm, a LayerScale, an adapter module): the
  submodule becomes ``nn.Identity``;
* one call of one of its submodules and nothing else (a wrapper whose adapters folded into the layer it
  wraps, as a PEFT tuner layer's into its ``base_layer``): the scope becomes that submodule, where the
  identities alone do not compute the fold (the wrapper's code still runs its adapters);
* a layer the fold rebuilt at the path the model has: its tensors go into the model's layer (a bias where
  the layer had none is added).

What module edits cannot say (a layer rebuilt under a new name because other code reads its weights, a
tensor the model does not hold) refuses the write-back with the reason. The copy is then run once on the
example inputs against the folded graph: a difference beyond float rounding refuses it too (an op of the
model's own functional code that the fold removed: the class would still run it).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from repfold.frontends.trace import get_attr, module_paths, set_module

TOLERANCE = 1e-5  # relative to the output's largest magnitude: float32 rounding, not a different computation


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
        else:
            paths = set(module_paths(n))
        for p in paths:
            out.setdefault(p, []).append(n.name)
    return out


def write_back(model: nn.Module, folded: fx.GraphModule, before: dict[str, list[str]], inputs: tuple,
               label: str = "the model") -> tuple[nn.Module, list[str], float]:
    """A copy of ``model`` (never modified) holding the fold of its graph: ``(copy, edits, error)``; the
    edits in words and the copy's largest difference from ``folded`` on ``inputs``. ``before``: the
    :func:`scopes` of the graph the fold started from. Raises :class:`NotWritable`.

    The fewest structural edits first: layers re-weighted and folded submodules made identities, so that
    the copy's state dict keeps the model's layout (a conv's BatchNorm becomes an identity, the conv stays
    where it was); only where that does not compute the fold (a wrapper whose forward still runs the
    adapters it held: PEFT's tuner layers) are wrappers replaced by the one layer left of them.
    """
    error, why = float("inf"), ""
    after = scopes(folded)
    for wrappers in (False, True):
        own, edits = _edited(model, folded, before, after, label, wrappers)
        why = ""
        try:
            error = _difference(own, folded, inputs)
        except Exception as e:  # noqa: BLE001 (the class's own code failing on the edits is the answer: not these)
            error, why = float("inf"), f"{type(e).__name__}: {e}"
        if error <= TOLERANCE:
            return own, edits, error
    calls = {n.name for n in folded.graph.nodes}
    gone = sorted({name for names in before.values() for name in names if name not in calls})
    raise NotWritable(f"{label} with the fold's module edits computes something else than the folded graph "
                      f"({why or f'max error {error:.1e}'}): the fold removed ops its code still runs"
                      + (f" ({', '.join(gone[:3])}, ...)" if gone else ""))


def _edited(model: nn.Module, folded: fx.GraphModule, before: dict[str, list[str]], after: dict[str, list[str]],
            label: str, wrappers: bool) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with the fold's module edits (with ``wrappers``, a scope left with one call of one
    of its submodules becomes that submodule), and the edits in words."""
    own = copy.deepcopy(model)
    mods = dict(own.named_modules())
    settled: list[str] = []  # scopes replaced whole: nothing under them is edited again
    edits: list[str] = []

    def inside(path: str) -> bool:
        return any(path == s or path.startswith(s + ".") for s in settled)

    calls = {n.name: n for n in folded.graph.nodes}
    for path, _ in model.named_modules():
        if not path or inside(path) or path not in before:
            continue
        left = after.get(path, [])
        if not left:  # every op of the scope went into an absorber
            set_module(own, path, nn.Identity())
            settled.append(path)
            edits.append(f"{path} ({type(mods[path]).__name__}) -> Identity")
            continue
        only = calls[left[0]] if len(left) == 1 else None
        if wrappers and only is not None and only.op == "call_module" and only.target.startswith(path + ".") \
                and only.target in mods:  # a wrapper around the one layer left of it
            layer = mods[only.target]
            _take(layer, folded.get_submodule(only.target), only.target)
            set_module(own, path, layer)
            settled.append(path)
            edits.append(f"{path} ({type(mods[path]).__name__}) -> its {only.target[len(path) + 1:]} "
                         f"({type(layer).__name__}), re-weighted")
    for n in folded.graph.nodes:
        if n.op not in ("call_module", "get_attr") or inside(n.target):
            continue
        if n.op == "call_module":
            if n.target not in mods and n.target in before:
                continue  # a module of the trace's own (torch.export's ``_guards_fn``), there before the fold
            if n.target not in mods:
                raise NotWritable(f"the fold rebuilt a layer as {n.target!r}, a module {label} does not have "
                                  "(its weights are read elsewhere too)")
            if _take(mods[n.target], folded.get_submodule(n.target), n.target):
                edits.append(f"{n.target} ({type(mods[n.target]).__name__}) re-weighted")
            continue
        owner, _, name = n.target.rpartition(".")
        new = get_attr(folded, n.target)
        held = getattr(mods.get(owner), name, None) if owner in mods else None
        if not isinstance(new, torch.Tensor):
            continue
        if not isinstance(held, torch.Tensor) or held.shape != new.shape:
            raise NotWritable(f"the fold made a tensor {n.target!r} that {label} does not hold")
        if not torch.equal(held, new):
            with torch.no_grad():
                held.copy_(new)
            edits.append(f"{n.target} re-weighted")
    own.train(False)
    return own, edits


def _take(layer: nn.Module, rebuilt: nn.Module, path: str) -> bool:
    """``rebuilt``'s own tensors into ``layer`` (a bias it had none of is added); whether any changed."""
    changed = False
    for name, t in [*rebuilt.named_parameters(recurse=False), *rebuilt.named_buffers(recurse=False)]:
        held = getattr(layer, name, None)
        if held is None and name in getattr(layer, "_parameters", {}):
            layer.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            changed = True
        elif not isinstance(held, torch.Tensor) or held.shape != t.shape:
            raise NotWritable(f"the fold rebuilt {path!r} with a {name} of another shape than the model's layer")
        elif not torch.equal(held, t):
            with torch.no_grad():
                held.copy_(t)
            changed = True
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


def _difference(own: nn.Module, folded: fx.GraphModule, inputs: tuple) -> float:
    with torch.no_grad():
        got, want = _tensors(own(*inputs)), _tensors(folded(*inputs))
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf")
    scale = max((float(b.abs().max()) for b in want if b.numel() and b.is_floating_point()), default=1.0)
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, want)
                if a.numel() and a.is_floating_point()), default=0.0)
    return diff / max(scale, 1e-30)
