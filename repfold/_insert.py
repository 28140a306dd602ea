"""``repfold.insert``: put trainable adapters at module-scope boundaries of an fx graph."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from . import _trace
from ._adapters import RepAdapter
from ._trace import META_KEY, is_shape_read, shape, to_graph_module

PREFIX = "repfold_adapters"


def scopes(gm: fx.GraphModule) -> list[str]:
    """Every module path that owns at least one node, in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        for path in n.meta.get("nn_module_stack", {}):
            seen.setdefault(path, None)
    return list(seen)


def _matches(pattern: str, path: str) -> bool:
    if "." not in pattern:
        return fnmatch.fnmatchcase(path.rpartition(".")[2], pattern)
    return fnmatch.fnmatchcase(path, pattern)


def _float_tensor(n: fx.Node) -> TensorMetadata | None:
    meta = n.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point else None


def _entering(gm: fx.GraphModule, scope: str) -> tuple[fx.Node, list[fx.Node]]:
    """The one floating tensor that flows into ``scope`` from outside, and the nodes inside."""
    inside = [n for n in gm.graph.nodes if scope in n.meta.get("nn_module_stack", {})]
    inside_set = set(inside)
    values: dict[fx.Node, None] = {}
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside_set and a.op != "get_attr" and _float_tensor(a) is not None:
                values.setdefault(a, None)
    if len(values) != 1:
        names = ", ".join(v.name for v in values) or "none"
        raise ValueError(
            f"module scope {scope!r} receives {len(values)} tensors ({names}); "
            "an adapter needs exactly one"
        )
    return next(iter(values)), inside


def _leaving(gm: fx.GraphModule, scope: str) -> tuple[fx.Node, list[fx.Node]]:
    """The one floating tensor that ``scope`` hands to the rest of the graph, and its readers there."""
    inside = {n for n in gm.graph.nodes if scope in n.meta.get("nn_module_stack", {})}
    values = {n: None for n in gm.graph.nodes if n in inside and _float_tensor(n) is not None
              and any(u not in inside and not is_shape_read(u) for u in n.users)}
    if len(values) != 1:
        names = ", ".join(v.name for v in values) or "none"
        raise ValueError(f"module scope {scope!r} hands on {len(values)} tensors ({names}); an adapter needs exactly one")
    value = next(iter(values))
    return value, [u for u in value.users if u not in inside]


def _reads_as_conv(gm: fx.GraphModule, value: fx.Node, inside: list[fx.Node]) -> bool:
    """Whether the scope consumes ``value`` with a convolution (channels at axis 1)."""
    for n in inside:
        if value in n.all_input_nodes and n.op == "call_module":
            if isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd):
                return True
    return False


def insert(
    model: nn.Module,
    before: str | Sequence[str] = (),
    *,
    after: str | Sequence[str] = (),
    hidden_dim: int = 8,
    groups: int = 2,
    scale: float = 1.0,
    dropout: float = 0.1,
    example_inputs: tuple | torch.Tensor | None = None,
    leaf_modules=(),
    leaf_functions=(),
) -> fx.GraphModule:
    """Return a copy of ``model`` with an adapter on the value entering (``before``) or leaving
    (``after``) each selected module scope.

    A bare name matches the last part of a module path (``"attn"``), a dotted
    one the whole path with ``*`` wildcards (``"blocks.*.norm1"``).
    """
    names = [before] if isinstance(before, str) else list(before)
    after_names = [after] if isinstance(after, str) else list(after)
    if not names and not after_names:
        raise ValueError("say where the adapters go: before= and/or after= module names")
    gm = to_graph_module(model, leaf_modules, leaf_functions)
    inputs = _trace.example_inputs(model, example_inputs)
    shape(gm, inputs)
    all_scopes = scopes(gm)
    chosen: dict[tuple[str, str], None] = {}
    for where, patterns in (("before", names), ("after", after_names)):
        for pattern in patterns:
            hits = [s for s in all_scopes if _matches(pattern, s)]
            if not hits:
                leaves = sorted({s.rpartition(".")[2] for s in all_scopes if not s.isdigit()})
                raise ValueError(
                    f"{where}={pattern!r} matches no module scope; scope names are: {', '.join(leaves)}"
                )
            chosen.update(dict.fromkeys((where, h) for h in hits))

    placed = {}
    for where, scope in chosen:
        if where == "before":
            value, readers = _entering(gm, scope)
            conv_reads = _reads_as_conv(gm, value, readers)
        else:
            value, readers = _leaving(gm, scope)
            conv_reads = value.op == "call_module" and isinstance(gm.get_submodule(value.target), nn.modules.conv._ConvNd)
        meta = _float_tensor(value)
        channels_last = not conv_reads
        width = meta.shape[-1] if channels_last else meta.shape[1]
        adapter = RepAdapter(
            width, hidden_dim, groups, scale, dropout, rank=len(meta.shape), channels_last=channels_last
        ).to(dtype=meta.dtype, device=inputs[0].device)
        target = f"{PREFIX}.{scope.replace('.', '_')}" + ("_out" if where == "after" else "")
        gm.add_submodule(target, adapter)
        with gm.graph.inserting_after(value):
            node = gm.graph.call_module(target, (value,))
        for n in readers:
            if not is_shape_read(n):
                n.replace_input_with(value, node)
        placed[scope if where == "before" else f"{scope}:after"] = target

    frozen = []  # the model's own trainable parameters, frozen for adapter training; fold thaws them
    for name, p in gm.named_parameters():
        if p.requires_grad and not name.startswith(PREFIX + "."):
            frozen.append(name)
        p.requires_grad_(name.startswith(PREFIX + "."))
    if placed:  # adapters (and their container) join in the model's mode; the model's own modules keep theirs
        gm.get_submodule(PREFIX).train(model.training)
    gm.graph.lint()
    gm.recompile()
    gm.meta[META_KEY] = {
        "input_shapes": [list(t.shape) for t in inputs],
        "insert": {
            "before": names,
            "after": after_names,
            "hidden_dim": hidden_dim,
            "groups": groups,
            "scale": scale,
            "dropout": dropout,
        },
        "adapters": placed,
        "frozen": frozen,
    }
    return gm
