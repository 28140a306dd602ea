"""``repfold.insert``: put trainable adapters at module-scope boundaries of an fx graph."""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from repfold.adapters.modules import RepAdapter
from repfold.frontends import trace as _trace
from repfold.frontends.aten import training_ops
from repfold.frontends.fx import prepare
from repfold.frontends.trace import (
    META_KEY,
    TraceError,
    WritesBuffers,
    is_shape_read,
    module_paths,
    set_module,
    shape,
    to_graph_module,
)
from repfold.frontends.writes import index_assignments
from repfold.report import placement

PREFIX = "repfold_adapters"


def scopes(gm: fx.GraphModule) -> list[str]:
    """Every module path that owns at least one node, in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        for path in module_paths(n):
            seen.setdefault(path, None)
    return list(seen)


def _matches(pattern: str, path: str) -> bool:
    if "." not in pattern:
        return fnmatch.fnmatchcase(path.rpartition(".")[2], pattern)
    return fnmatch.fnmatchcase(path, pattern)


def _float_tensor(n: fx.Node) -> TensorMetadata | None:
    meta = n.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point else None


_MIXING = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "addbmm", "tensordot", "scaled_dot_product_attention"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "nansum", "nanmean"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}


def _entering(gm: fx.GraphModule, scope: str) -> tuple[fx.Node, list[fx.Node]]:
    """The floating tensor that flows into ``scope`` from outside, and the nodes inside.

    A scope that receives several (Llama's attention: the hidden states, and the rotary ``cos`` and ``sin``)
    gets its adapter on the one its Linear or convolution layers read, as their first input, directly or
    through layout ops; it is refused where that is not exactly one.
    """
    inside = [n for n in gm.graph.nodes if scope in module_paths(n)]
    inside_set = set(inside)
    values: dict[fx.Node, None] = {}
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside_set and a.op != "get_attr" and _float_tensor(a) is not None:
                values.setdefault(a, None)
    if len(values) == 1:
        return next(iter(values)), inside
    names = ", ".join(v.name for v in values) or "none"
    if not values:
        raise ValueError(f"module scope {scope!r} receives 0 tensors (none); an adapter needs exactly one")
    read = [v for v in values if _feeds_layer(gm, v, inside_set)]
    if len(read) == 1:
        return read[0], inside
    which = f"{len(read)} of them ({', '.join(v.name for v in read)}) are" if read else "none of them is"
    raise ValueError(
        f"module scope {scope!r} receives {len(values)} tensors ({names}) and {which} the input of a Linear or "
        "convolution in it; an adapter needs exactly one: name a scope that receives one"
    )


_LAYOUT = _PERMUTES | _RESHAPES | {"contiguous", "clone", "to", "type", "float", "dropout", "identity", "alias"}


def _feeds_layer(gm: fx.GraphModule, value: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``value`` is the first input of a Linear or convolution in ``inside``, directly or through
    layout ops (permutes, reshapes, copies, casts, dropout)."""
    todo, seen = [value], set()
    while todo:
        node = todo.pop()
        for u in node.users:
            if u in seen or u not in inside or not u.args or u.args[0] is not node:
                continue
            seen.add(u)
            if _acts_on(gm, u, 2) is not None:
                return True
            if u.op == "call_module":
                layout = isinstance(gm.get_submodule(u.target), (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten))
            else:
                layout = (u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")) in _LAYOUT
            if layout:
                todo.append(u)
    return False


def _leaving(gm: fx.GraphModule, scope: str) -> tuple[fx.Node, list[fx.Node]]:
    """The one floating tensor that ``scope`` hands to the rest of the graph, and its readers there."""
    inside = {n for n in gm.graph.nodes if scope in module_paths(n)}
    values = {n: None for n in gm.graph.nodes if n in inside and _float_tensor(n) is not None
              and any(u not in inside and not is_shape_read(u) for u in n.users)}
    if len(values) != 1:
        names = ", ".join(v.name for v in values) or "none"
        raise ValueError(f"module scope {scope!r} hands on {len(values)} tensors ({names}); an adapter needs exactly one")
    value = next(iter(values))
    return value, [u for u in value.users if u not in inside]


def _shape(n) -> tuple[int, ...] | None:
    meta = _float_tensor(n) if isinstance(n, fx.Node) else None
    return tuple(meta.shape) if meta is not None else None


def _acts_on(gm: fx.GraphModule, n: fx.Node, rank: int) -> int | None:
    """The axis of its first input that a weighted layer ``n`` mixes (Linear: last, conv: 1), else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            return rank - 1
        if isinstance(m, nn.modules.conv._ConvNd):
            return 1
        return None
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        if name == "linear":
            return rank - 1
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            return 1
    return None


def _moved(gm: fx.GraphModule, n: fx.Node, axis: int, before: tuple[int, ...], after: tuple[int, ...] | None
           ) -> int | None:
    """Where axis ``axis`` of ``n``'s first input is in ``n``'s output, or None if no longer whole or known."""
    if after is None:
        return None
    if n.op == "call_module":  # a classifier head's nn.Flatten reshapes; other modules: by shapes alone
        name = {nn.Flatten: "flatten", nn.Unflatten: "unflatten"}.get(type(gm.get_submodule(n.target)), "")
    else:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if name in _PERMUTES:
        args = [a for a in n.args[1:] if isinstance(a, int)]
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else None
        r = len(before)
        if name == "permute":
            perm = [d % r for d in (dims if dims is not None else args)]
            return perm.index(axis) if len(perm) == r else None
        if name == "t":
            a, b = 0, r - 1
        elif len(args) == 2:
            a, b = args[0] % r, args[1] % r
        else:
            return None
        if name in ("movedim", "moveaxis"):
            order = [k for k in range(r) if k != a]
            order.insert(b, a)
            return order.index(axis)
        return b if axis == a else a if axis == b else axis
    if name in _RESHAPES:
        lead = math.prod(before[:axis])
        for j, size in enumerate(after):
            if size == before[axis] and math.prod(after[:j]) == lead:
                return j
        return None
    if name in _MIXING:
        return None
    if len(after) == len(before):  # elementwise, norms, pools, slices, cat: axes stay in place
        return axis
    if name in _REDUCTIONS and len(after) < len(before):  # sum(dim=1) of stacked branches (SKNet)
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        dims = {d % len(before) for d in dims}
        return None if axis in dims else axis - sum(d < axis for d in dims)
    return None


def _evidence(gm: fx.GraphModule, value: fx.Node, down: bool, limit: int = 64) -> set[int]:
    """Axes of ``value`` that the nearest weighted layers downstream (or upstream) act on.

    Every path is followed, through layout ops (the axis moves with them) and
    ops that keep the rank, to its first weighted layer; a path that loses
    the axis track ends without a say.
    """
    shape0 = _shape(value)
    if shape0 is None:
        return set()
    found: set[int] = set()
    # a frontier of (node, its shape, value axis -> node axis)
    todo = [(value, shape0, {a: a for a in range(len(shape0))})]
    seen = 0
    while todo and seen < limit:
        node, sh, where = todo.pop(0)
        seen += 1
        if down:
            for u in node.users:
                if is_shape_read(u) or not u.args or u.args[0] is not node:
                    continue
                k = _acts_on(gm, u, len(sh))
                if k is not None:
                    found.update(a for a, b in where.items() if b == k)
                    continue
                after = _shape(u)
                nxt = {a: _moved(gm, u, b, sh, after) for a, b in where.items()}
                nxt = {a: b for a, b in nxt.items() if b is not None}
                if nxt:
                    todo.append((u, after, nxt))
        else:
            if node.op not in ("call_module", "call_function", "call_method") or not node.args:
                continue
            first = next((a for a in node.args if isinstance(a, fx.Node)), None)  # add(0, x): x
            if first is None or _shape(first) is None:
                continue
            k = _acts_on(gm, node, len(_shape(first)))
            if k is not None:
                out = 1 if k == 1 else len(sh) - 1  # the layer's own output axis: conv channels, Linear features
                found.update(a for a, b in where.items() if b == out)
                continue
            before = _shape(first)
            back = {}
            for b in range(len(before)):
                to = _moved(gm, node, b, before, sh)
                for a, at in where.items():
                    if to is not None and at == to:
                        back[a] = b
            if back:
                todo.append((first, before, back))
    return found


def channel_axis(gm: fx.GraphModule, value: fx.Node, scope: str) -> int:
    """The channel axis of ``value``: the one the nearest weighted layers around it act on.

    The layers downstream decide (an adapter folds forward into them; MLP-Mixer's
    token MLP reads the token axis of a value a channel MLP made); the layers
    upstream decide where there are none downstream. Layers that disagree, or
    none at all, leave the axis to the user (``axis=``).
    """
    down = _evidence(gm, value, down=True)
    if len(down) == 1:
        return next(iter(down))
    up = _evidence(gm, value, down=False) if not down else set()
    if len(up) == 1:
        return next(iter(up))
    rank = len(_shape(value) or ())
    said = "; ".join(f"{where} layers act on axis {', '.join(map(str, sorted(ax)))}"
                     for where, ax in (("downstream", down), ("upstream", up)) if ax)
    raise ValueError(
        f"cannot tell the channel axis of the value entering {scope!r} (rank {rank}): "
        + (said or "no Linear or convolution acts on it nearby") + "; pass axis= (e.g. axis=1 for NCHW, -1 for tokens)"
    )


def _axis_for(axis, scope: str) -> int | None:
    """The user's ``axis=`` for ``scope``: one int for all, or a dict of name patterns (None: from the graph)."""
    if axis is None or isinstance(axis, int):
        return axis
    for pattern, a in axis.items():
        if _matches(pattern, scope):
            return a
    return None


HOW_TO_FOLD = (
    "an adapter folds when it sits next to a Linear or convolution with only channel-affine ops between; "
    "bias=False lets it fold into a zero-padded kxk convolution"
)


def _foresee(gm: fx.GraphModule, inputs, placed: dict[str, str], strict: bool) -> None:
    """Plan the fold of the new adapters, with random weights as after training; warn (or, ``strict``,
    raise) for each one that would not fold, with the reason."""
    if not placed:
        return

    gen = torch.Generator().manual_seed(0)
    saved = {}
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith(PREFIX + "."):
                saved[name] = p.detach().clone()
                p.copy_((torch.randn(p.shape, generator=gen) * 0.1).to(p))
    try:
        regions = prepare(gm, inputs).plan.regions
    finally:
        with torch.no_grad():
            for name, p in gm.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    problems = []
    for scope, target in placed.items():
        where = placement(scope)
        mine = [r for r in regions if any(op.startswith(target + ".") for op in r.ops)]
        if not mine:
            problems.append(f"the adapter {where} forms no region the fold can find")
        for r in mine:
            if not r.folded:
                problems.append(f"the adapter {where} will not fold: {r.reason}")
    if not problems:
        return
    if strict:
        raise ValueError("; ".join(problems) + f" ({HOW_TO_FOLD})")
    for line in problems:
        warnings.warn(f"repfold.insert: {line} ({HOW_TO_FOLD})", UserWarning, stacklevel=3)


def _traced(model, leaf_modules, leaf_functions, example_inputs, patterns) -> tuple[fx.GraphModule, tuple, str]:
    """``(graph, example inputs, how it was traced)``: torch.fx first; torch.export where fx cannot trace the
    model, or hides a selected scope's layers inside a call it keeps whole.

    torch.export records the mode it runs in, so it runs on an eval-mode copy: the model's own dropout and
    BatchNorm are in the graph as in eval mode (the adapters, modules of their own, still train).
    """
    fx_graph = None
    inputs = _trace.example_inputs(model, example_inputs)
    try:
        gm = to_graph_module(model, leaf_modules, leaf_functions, alias=True)
        shape(gm, inputs)
        index_assignments(gm)  # writes into views as the exporters keep them (torch.export's: in to_graph_module)
        hidden = _hidden(gm, model, patterns)
        if hidden is None:
            return gm, inputs, "torch.fx"
        why, fx_graph = hidden, gm
    except (TraceError, ValueError) as e:
        if isinstance(model, fx.GraphModule) or isinstance(e, WritesBuffers) \
                or isinstance(e, ValueError) and not _runs(model, inputs):
            raise  # (a written buffer: the shapes are found by running the graph once, which would move it)
        why = str(e)  # fx traced a graph that does not run as the model does (torchvision's swin3d_t)
    try:
        ep = _trace.export_quietly(_eval_copy(model), inputs)
    except Exception as e:  # both tracers failed: say why for each
        if fx_graph is not None:  # fx's graph still holds the adapter, only not next to the hidden layers
            warnings.warn(f"repfold.insert: {why}, and torch.export failed on the model ({type(e).__name__}); "
                          "the adapters go into fx's graph", UserWarning, stacklevel=3)
            return fx_graph, inputs, "torch.fx"
        raise TraceError(f"{why}; torch.export failed too: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    gm = to_graph_module(ep.module(), alias=True)
    shape(gm, inputs)
    return gm, inputs, "torch.export"


def _eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` sharing its parameters (the caller's model, and its mode, untouched)."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()}).eval()


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether ``model`` itself runs on ``inputs`` (an eval-mode copy: no statistics move)."""
    try:
        with torch.no_grad():
            _eval_copy(model)(*inputs)
    except Exception:  # noqa: BLE001 (any failure: the inputs do not fit the model)
        return False
    return True


def _hidden(gm: fx.GraphModule, model: nn.Module, patterns) -> str | None:
    """Why torch.fx's graph cannot hold an adapter for a selected module: a module whose path matches is not
    in the graph (a leaf kept whole), or the weights of a Linear or convolution in it are read only by a call
    fx keeps whole (torchvision's ``shifted_window_attention``); None if neither."""
    if isinstance(model, fx.GraphModule):
        return None
    in_graph = set(scopes(gm))
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path, m in model.named_modules():
        if not path or not any(_matches(p, path) for p in patterns):
            continue
        whole = next((leaf for leaf in leaves if path.startswith(leaf + ".")), None)
        if path not in in_graph and whole is not None:
            return f"torch.fx keeps {path!r} inside {whole!r}, a module it does not trace into"
        mine = {".".join(filter(None, (path, sub, name))) for sub, layer in m.named_modules()
                if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) for name, _ in layer.named_parameters()}
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target in mine and n.users and all(
                    u.op == "call_function" and not _torch_own(u.target) for u in n.users):
                return f"torch.fx keeps the layers of {path!r} inside {next(iter(n.users)).name}, a call it does not trace"
    return None


def _torch_own(f) -> bool:
    """Whether ``f`` is torch's (an ATen op too) or Python's, not a function of the model's library."""
    return (getattr(f, "__module__", None) or "").partition(".")[0] in ("torch", "_operator", "operator", "builtins")


def insert(
    model: nn.Module | torch.export.ExportedProgram,
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
    axis: int | Mapping[str, int] | None = None,
    bias: bool = True,
    strict: bool = False,
) -> fx.GraphModule:
    """Return a copy of ``model`` with an adapter on the value entering (``before``) or leaving
    (``after``) each selected module scope.

    ``model`` is an ``nn.Module`` (traced with torch.fx), an ``fx.GraphModule``
    or a ``torch.export.ExportedProgram`` (its ``module()``: ATen ops, scopes
    from the module paths torch.export records). The result is a trainable
    ``fx.GraphModule``; ``repfold.fold`` folds it, or the ExportedProgram
    exported from it. It shares the model's weights rather than copying them
    (as PEFT's ``get_peft_model`` does): its parameters are objects of its own
    (frozen there, the model's left as they were) over the model's memory, so
    a giant backbone is not held twice. Training the adapters, and folding into
    a new model, leave the model as it was; what writes into the backbone's
    weights (unfreezing them, ``fold(gm, inplace=True)``) writes into the
    model's.

    A bare name matches the last part of a module path (``"attn"``), a dotted
    one the whole path with ``*`` wildcards (``"blocks.*.norm1"``).

    The adapter mixes the value's channel axis, read off the graph: the axis
    the nearest Linear or convolution around the value acts on. Where those
    layers disagree or there are none, ``axis=`` says it (one int for every
    adapter, or a dict from name patterns to ints). ``bias=False`` makes
    bias-free adapters, which also fold into zero-padded k×k convolutions.

    The fold of the new adapters is planned at once (with random weights, as
    after training): every adapter that would not fold is named in a
    ``UserWarning``, one line each with the reason, or with ``strict=True``
    in a ``ValueError``, so that nobody trains an adapter that cannot deploy at
    zero cost.

    What the example inputs were (shape, dtype, device; the range of integer
    token ids; the values of bool masks) is recorded in
    ``gm.meta["repfold"]["inputs"]``, so that ``fold(gm)`` and
    ``load_adapters`` make inputs like them. Without ``example_inputs`` the
    input size the model declares is used (``image_size`` / ``img_size`` on it
    or its ``patch_embed``, a Hugging Face ``config.image_size``), else timm's
    ``pretrained_cfg``.
    """
    names = [before] if isinstance(before, str) else list(before)
    after_names = [after] if isinstance(after, str) else list(after)
    if not names and not after_names:
        raise ValueError("say where the adapters go: before= and/or after= module names")
    exported = isinstance(model, torch.export.ExportedProgram)
    if exported:
        model, example_inputs = _program_module(model, example_inputs)
    try:
        gm, inputs, how = _traced(model, leaf_modules, leaf_functions, example_inputs, names + after_names)
    except TraceError as e:
        if exported or example_inputs is None:
            raise
        kw = {"hidden_dim": hidden_dim, "groups": groups, "scale": scale, "dropout": dropout, "axis": axis,
              "leaf_modules": leaf_modules, "leaf_functions": leaf_functions, "bias": bias, "strict": strict}
        return _insert_in_parts(model, names, after_names, example_inputs, e, kw)
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    placed = {}
    for where, scope in _chosen_scopes(gm, names, after_names):
        target = _place(gm, where, scope, axis, device, hidden_dim, groups, scale, dropout, bias)
        placed[scope if where == "before" else f"{scope}:after"] = target
    gm.graph.lint()
    gm.recompile()
    # the shapes found above hold for this graph: fold (and the plan below) need not find them again
    known = {_trace.SHAPED_KEY: _trace.fingerprint(gm, inputs)} if _trace.shaped(gm) else {}
    gm.meta[META_KEY] = dict(known)
    _foresee(gm, inputs, placed, strict)
    frozen = _freeze(gm, model, placed)
    gm.meta[META_KEY] = {
        **known,
        "inputs": _trace.record_inputs(inputs),  # what fold and load_adapters make example inputs like
        "insert": {
            "before": names,
            "after": after_names,
            "hidden_dim": hidden_dim,
            "groups": groups,
            "scale": scale,
            "dropout": dropout,
            "bias": bias,
            **({"axis": axis} if axis is not None else {}),
        },
        "adapters": placed,
        "frozen": frozen,
        "trace": "torch.export" if exported else how,
    }
    return gm


def _program_module(ep: torch.export.ExportedProgram, example_inputs) -> tuple[nn.Module, object]:
    """An ExportedProgram's ``module()`` (weights under their state-dict names) and its example inputs;
    a warning where it was exported in training mode."""
    if example_inputs is None and ep.example_inputs:
        example_inputs = ep.example_inputs[0]
    training = training_ops(ep.graph)
    if training:
        warnings.warn(f"repfold.insert: the program was exported in training mode ({training[0]}): the "
                      "model's own dropout and batch statistics stay as they were exported; export the model "
                      "in eval mode", UserWarning, stacklevel=3)
    return ep.module(), example_inputs


def _chosen_scopes(gm: fx.GraphModule, names: list[str], after_names: list[str]) -> list[tuple[str, str]]:
    """``(where, scope)`` for every scope a name matches, in the order named; a name matching none is an
    error that lists the scope names."""
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
    return list(chosen)


def _place(gm: fx.GraphModule, where: str, scope: str, axis, device, hidden_dim, groups, scale, dropout,
           bias) -> str:
    """A new adapter on the value entering (``before``) or leaving (``after``) ``scope``, along its channel
    axis, read by every op there that read the value; returns the adapter's module path."""
    value, readers = _entering(gm, scope) if where == "before" else _leaving(gm, scope)
    meta = _float_tensor(value)
    rank = len(meta.shape)
    given = _axis_for(axis, scope)
    if given is not None and not -rank <= given < rank:
        raise ValueError(f"axis={given} for {scope!r}: the value there has rank {rank}")
    at = given % rank if given is not None else channel_axis(gm, value, scope)
    adapter = RepAdapter(
        meta.shape[at], hidden_dim, groups, scale, dropout, rank=rank, axis=at, bias=bias
    ).to(dtype=meta.dtype, device=device)
    target = f"{PREFIX}.{scope.replace('.', '_')}" + ("_out" if where == "after" else "")
    gm.add_submodule(target, adapter)
    # right before its first reader, not after the value: an in-place write in between (``x = act(x);
    # x.mul_(2)``) must reach the adapter as it reached the layer
    uses = [n for n in readers if value in n.all_input_nodes and not is_shape_read(n)]
    if not uses:
        raise ValueError(f"module scope {scope!r}: nothing there reads {value.name} but its shape")
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(uses, key=order.__getitem__)):
        node = gm.graph.call_module(target, (value,))
    node.meta["tensor_meta"] = value.meta["tensor_meta"]  # an adapter keeps its input's shape and dtype
    node.meta["type"] = value.meta.get("type", torch.Tensor)
    for n in uses:
        n.replace_input_with(value, node)
    return target


def _freeze(gm: fx.GraphModule, model: nn.Module, placed: dict[str, str]) -> list[str]:
    """Only the adapters train: the model's own trainable parameters are frozen (their names returned; fold
    thaws them). The adapters join in the model's mode; the model's own modules keep theirs."""
    frozen = []
    for name, p in gm.named_parameters():
        if p.requires_grad and not name.startswith(PREFIX + "."):
            frozen.append(name)
        p.requires_grad_(name.startswith(PREFIX + "."))
    if placed:
        gm.get_submodule(PREFIX).train(model.training)
    return frozen


def _insert_in_parts(model: nn.Module, names: list[str], after_names: list[str], example_inputs, why: TraceError,
                     kw: dict) -> nn.Module:
    """A model neither tracer takes whole (a detector's data-dependent post-processing): the adapters go into
    the largest submodules that hold the selected scopes and trace, each with the inputs it received on one
    run of the model; returns a copy of the model, of its own class, with those submodules replaced by the
    graphs ``insert`` made of them (``fold(model)`` folds them part by part)."""
    paths = [p for p, _ in model.named_modules() if p]
    hits = {}
    for where, patterns in (("before", names), ("after", after_names)):
        for pattern in patterns:
            found = [p for p in paths if _matches(pattern, p)]
            if not found:
                raise ValueError(f"{where}={pattern!r} matches no module of {type(model).__name__} (which neither "
                                 f"tracer takes whole: {str(why).splitlines()[0]})")
            hits.update(dict.fromkeys((where, p) for p in found))
    own = copy.deepcopy(model, _trace.aliases(model))
    owners = sorted({a for _, h in hits for a in _ancestors(h)}, key=lambda a: (a.count("."), a))
    seen: dict[str, tuple] = {}

    def record(a: str):
        def hook(module, args, kwargs) -> None:
            if not kwargs:  # (a part called with keywords is not taken: insert's example inputs are positional)
                seen.setdefault(a, args)
        return hook

    hooks = [own.get_submodule(a).register_forward_pre_hook(record(a), with_kwargs=True) for a in owners]
    mode = own.training
    own.eval()
    try:
        with torch.no_grad():
            own(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        for h in hooks:
            h.remove()
        own.train(mode)
    left, parts = dict(hits), []
    for a in owners:  # shallowest first: the largest part that traces takes all the scopes under it
        mine = [(w, h) for w, h in left if h.startswith(a + ".")]
        if not mine or a not in seen or any(a.startswith(p + ".") for p in parts):
            continue
        rel = {w: [h[len(a) + 1:] for ww, h in mine if ww == w] for w in ("before", "after")}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # (the part's own warnings come again below)
                graph = insert(own.get_submodule(a), before=rel["before"], after=rel["after"],
                               example_inputs=seen[a], **kw)
        except (TraceError, ValueError):
            continue
        set_module(own, a, graph)
        parts.append(a)
        for k in mine:
            left.pop(k)
    if left:
        (where, scope), *_ = left
        raise TraceError(f"{why}; and no part of {type(model).__name__} holding {where} {scope!r} traces either")
    return own


def _ancestors(path: str) -> list[str]:
    """The module paths above ``path`` (``backbone``, ``backbone.body`` for ``backbone.body.1``)."""
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]
