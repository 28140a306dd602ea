"""Getting an fx graph out of a user's model, and example inputs to shape it."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import io
import sys
import warnings

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from repfold.core import graph as _graph
from repfold.frontends.aten import as_torch

META_KEY = "repfold"


def module_paths(n) -> list[str]:
    """The module paths ``n`` runs inside, outermost first (``blocks.0.attn``): the values of fx's
    ``nn_module_stack``, whose keys torch.export spells its own way (``L__self__blocks.0.attn``)."""
    stack = n.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) and v and isinstance(v[0], str) else k for k, v in stack.items()]


VALUE_KEY = "repfold_value"  # node.meta key: the int / size a node computed during shape propagation


def export_quietly(model: nn.Module, inputs: tuple):
    """``torch.export.export(model, inputs, strict=False)``, without the partial graph torch prints to
    stderr when it fails (thousands of lines for a detector, whose failure repfold reports in one line, or
    recovers from); what else it writes there is passed on."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # (on a failure, the exception leaves it, and what it holds)
        ep = torch.export.export(model, inputs, strict=False)
    sys.stderr.write(err.getvalue())
    return ep


def get_attr(root: nn.Module, target: str):
    """The module, parameter or buffer at dotted path ``target`` of ``root``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def has_submodule(root: nn.Module, target: str) -> bool:
    try:
        root.get_submodule(target)
        return True
    except AttributeError:
        return False


def set_module(root: nn.Module, target: str, new: nn.Module) -> None:
    """``new`` at dotted path ``target`` of ``root``, in place of what is there (made, with its parents, where
    nothing is)."""
    parent, _, name = target.rpartition(".")
    if not has_submodule(root, parent):
        root.add_submodule(target, new)
    else:
        setattr(root.get_submodule(parent), name, new)


class TraceError(RuntimeError):
    """The model could not be turned into a torch.fx graph."""


class WritesBuffers(TraceError):
    """The model's forward writes a buffer: no trace that runs it to find shapes may stand for it."""


class _Tracer(fx.Tracer):
    """fx's tracer with extra leaf module types, that remembers which module it was in."""

    def __init__(self, leaf_modules=(), functions=()) -> None:
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self.leaf_types = tuple(leaf_modules)
        self.stack: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _timm_registry() -> tuple[tuple, tuple]:
    """timm's own lists of modules and functions fx cannot trace, when timm is installed."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def trace(model: nn.Module, leaf_modules=(), leaf_functions=()) -> fx.GraphModule:
    """Symbolically trace ``model``; optional forward args keep their defaults.

    Tries a fine-grained trace first (so adapters can fold into every layer),
    then again with timm's registry of untraceable modules and functions as
    leaves. ``leaf_modules`` (classes) and ``leaf_functions`` are always leaves.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    concrete = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }
    timm_modules, timm_functions = _timm_registry()
    attempts = [(tuple(leaf_modules), tuple(leaf_functions))]
    if timm_modules or timm_functions:
        attempts.append((tuple(leaf_modules) + timm_modules, tuple(leaf_functions) + timm_functions))
    first, writes = None, None
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for modules, functions in attempts:
        tracer = _Tracer(modules, functions)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            _no_untraced_writes(model, buffers)
        except WritesBuffers as e:
            writes = e
            continue
        except Exception as e:  # noqa: BLE001 (fx raises many types; all mean "not traceable")
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            at = tracer.failed_in
            where = f" in {at} ({type(model.get_submodule(at)).__name__})" if at else ""
            first = first or f"torch.fx cannot trace {type(model).__name__}{where}: {msg}"
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        _drop_specialised(gm, [p.name in concrete for p in params])
        return gm
    if writes is not None:
        raise WritesBuffers(f"torch.fx cannot trace {type(model).__name__}: {writes}")
    raise TraceError(first + "; name it in leaf_modules= or leaf_functions= to keep it whole")


def _no_untraced_writes(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """fx runs ``self.buf.add_(1)`` on the real buffer while tracing and records nothing: the traced model
    would silently stop updating it. Such a model is refused (the buffer is put back first)."""
    for name, b in model.named_buffers():
        old = before.get(name)
        if old is None or (old.shape == b.shape and torch.equal(old, b.detach())):
            continue
        if old.shape == b.shape:
            with torch.no_grad():
                b.copy_(old)
        raise WritesBuffers(f"its forward writes buffer {name!r}, which fx would do once while tracing and never "
                            "record")


def _drop_specialised(gm: fx.GraphModule, fixed: list[bool]) -> None:
    """Remove the placeholders fx keeps for concrete args, and the checks it hangs on them.

    Those checks (``is_causal == False`` and friends) break TorchScript-based
    ONNX export; the values are baked into the graph either way.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    flow = _graph.digraph((n, u) for n in gm.graph.nodes for u in n.users)
    doomed: set[fx.Node] = set()
    for node, is_fixed in zip(placeholders, fixed):
        if is_fixed:
            doomed |= {node} | _graph.descendants(flow, node)
    for n in reversed(list(gm.graph.nodes)):
        if n in doomed:
            gm.graph.erase_node(n)
    gm.recompile()


def aliases(model: nn.Module) -> dict[int, nn.Parameter]:
    """A deepcopy memo giving each parameter of ``model`` a new ``nn.Parameter`` of its own (its own
    ``requires_grad``) that shares its memory: a copy costs no weights, and freezing or training one side's
    parameter objects leaves the other's alone. Tied parameters stay tied; a parameter of another class
    (a quantized one) is copied as deepcopy copies it."""
    return {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            for p in model.parameters() if type(p) is nn.Parameter}


def to_graph_module(
    model: nn.Module, leaf_modules=(), leaf_functions=(), *, share_parameters: bool = False, alias: bool = False
) -> fx.GraphModule:
    """A private copy of ``model`` as a GraphModule; the caller's model is never touched.

    With ``share_parameters`` the copy holds the caller's own parameter
    tensors (modules, graph and buffers are still copied): a caller that
    replaces many of them saves cloning those, and must call
    ``own_parameters`` on the result before handing it out. With ``alias``
    it holds parameters of its own that share the caller's memory
    (:func:`aliases`). A graph of ATen
    ops loses the ops that write nothing and that nobody reads, with the
    weights only they read (``repfold.frontends.export.as_torch``).
    """
    memo = {id(p): p for p in model.parameters()} if share_parameters else aliases(model) if alias else {}
    own = copy.deepcopy(model, memo)
    if isinstance(own, fx.GraphModule):
        own.meta = copy.deepcopy(getattr(model, "meta", {}))
        return as_torch(own)  # the graph of an ExportedProgram's module(): its ATen ops as torch's
    gm = trace(own, leaf_modules, leaf_functions)
    gm.meta[META_KEY] = {}
    return gm


def own_parameters(gm: nn.Module, model: nn.Module, thaw: set[int] = frozenset()) -> None:
    """Give ``gm`` its own copy of every parameter it still shares with ``model`` (tied ones stay tied).

    Copies of the parameters whose ids are in ``thaw`` require grad.
    """
    theirs = {id(p) for p in model.parameters()}
    memo: dict[int, nn.Parameter] = {}
    for module in gm.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in theirs:
                fresh = id(p) not in memo
                module._parameters[name] = copy.deepcopy(p, memo)
                if fresh and id(p) in thaw:
                    module._parameters[name].requires_grad_(True)


def example_inputs(model: nn.Module, given=None) -> tuple:
    """Inputs to shape the graph with, from the first that says: ``given``; those ``insert`` recorded; the
    input size the model declares (``image_size`` / ``img_size`` on it or its ``patch_embed``, a Hugging Face
    ``config.image_size``); timm's ``pretrained_cfg['input_size']``."""
    if given is not None:
        return given if isinstance(given, tuple) else (given,)
    recorded = recorded_inputs(getattr(model, "meta", {}).get(META_KEY, {}), model)
    if recorded is not None:
        return recorded
    size = declared_input_size(model)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = tuple(cfg["input_size"]) if "input_size" in cfg else None
    if size is None:
        raise ValueError(
            f"cannot tell the input shape of {type(model).__name__}: pass example_inputs="
        )
    return _make([{"shape": [1, *size], "dtype": "float32"}], model)


def record_inputs(inputs: tuple) -> list[dict] | None:
    """What ``insert`` keeps of its example inputs (JSON, saved with the adapters) to make like ones later:
    each tensor's shape, dtype and device; for an integer tensor (token ids) the range of its values, for a
    bool tensor (a mask) its values; a plain Python value itself. None where an input is none of these."""
    out = []
    for t in inputs:
        if t is None or isinstance(t, (bool, int, float, str)):
            out.append({"value": t})
            continue
        if not isinstance(t, torch.Tensor):
            return None
        r = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "device": str(t.device)}
        if t.dtype == torch.bool:
            r["values"] = t.flatten().tolist()
        elif not (t.is_floating_point() or t.is_complex()):  # drawn again in [low, high]: ids the model has
            r["low"], r["high"] = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
        out.append(r)
    return out


def recorded_inputs(record: dict, model: nn.Module) -> tuple | None:
    """Example inputs like those ``insert`` recorded in ``record`` (its ``gm.meta["repfold"]``, or a saved
    adapter file's): ``inputs``, or the float shapes (``input_shapes``) of files saved before; None if none."""
    if record.get("inputs") is not None:
        return _make(record["inputs"], model)
    if record.get("input_shapes") is not None:
        return _make([{"shape": s, "dtype": "float32"} for s in record["input_shapes"]], model)
    return None


def _make(record: list[dict], model: nn.Module) -> tuple:
    """Inputs from a record: seeded random floats of the model's own float dtype (a model cast after
    ``insert`` takes inputs of its new dtype), integers drawn in the recorded range, bools as recorded; on the
    model's device (the recorded one for a model without parameters)."""
    dtype, device = _dtype_device(model)
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in record:
        if "value" in r:
            out.append(r["value"])
            continue
        kind = getattr(torch, r.get("dtype", "float32"))
        at = device if device is not None else torch.device(r.get("device", "cpu"))
        if kind == torch.bool:
            t = torch.tensor(r["values"], dtype=torch.bool).reshape(r["shape"])
        elif kind.is_floating_point or kind.is_complex:
            t = torch.randn(r["shape"], generator=gen).to(dtype if dtype is not None else kind)
        else:
            low = r.get("low", 0)
            t = torch.randint(low, r.get("high", low) + 1, r["shape"], generator=gen, dtype=kind)
        out.append(t.to(at))
    return tuple(out)


def declared_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """``(channels, *spatial)`` from the input size a model says it takes, else None: an ``image_size`` or
    ``img_size`` on the model or its ``patch_embed`` (torchvision's ViT, open_clip's visual tower, timm's
    patch embedding, which wins over the config timm registered the model with), or a Hugging Face
    ``config.image_size``. Channels: the config's ``num_channels``, else the first convolution's
    ``in_channels`` of that rank, else 3."""
    owners = [model, getattr(model, "patch_embed", None)]
    for owner in owners:
        for name in ("image_size", "img_size"):
            spatial = _spatial(getattr(owner, name, None)) if isinstance(owner, nn.Module) else None
            if spatial is not None:
                return (_channels(model, len(spatial)), *spatial)
    config = getattr(model, "config", None)
    spatial = _spatial(getattr(config, "image_size", None))
    if spatial is not None:
        channels = getattr(config, "num_channels", None)
        return (channels if isinstance(channels, int) else _channels(model, len(spatial)), *spatial)
    return None


def _spatial(size) -> tuple[int, ...] | None:
    """An image size as a tuple of ints: ``32`` is 32x32, ``(32, 48)`` itself; None for anything else."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if isinstance(size, (tuple, list)) and 1 <= len(size) <= 3 and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        return tuple(size)
    return None


def _channels(model: nn.Module, rank: int) -> int:
    """The input channels of the model's first convolution over ``rank`` spatial axes, else 3."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and len(m.kernel_size) == rank:
            return m.in_channels
    return 3


def _dtype_device(model: nn.Module):
    """The dtype and device of the model's first float parameter; Nones for a model without one."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return None, None


def shape(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']``.

    The graph runs on fake tensors (shapes and dtypes, no data: a giant model's forward pass costs nothing);
    where an op needs real values (data-dependent shapes, ``.item()``, an op with no fake kernel), it runs
    once on the example inputs instead."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if not _fake_shapes(gm, inputs):
                _Shapes(gm).propagate(*inputs)
    except Exception as e:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ValueError(
            f"the model does not run on example inputs of shape {shapes} ({msg}); pass example_inputs="
        ) from e
    finally:
        gm.train(was_training)


SHAPED_KEY = "shaped"  # gm.meta[META_KEY][SHAPED_KEY]: the fingerprint of what the nodes' shapes were found for


def fingerprint(gm: fx.GraphModule, inputs: tuple) -> str:
    """What the shapes recorded on ``gm``'s nodes depend on: its code, the class of each module it calls,
    the name, shape, dtype and device of each of its tensors, and the inputs' shapes, dtypes and devices.
    A graph whose fingerprint is the one recorded with its shapes needs no shape propagation again."""
    h = hashlib.sha1(gm.graph.python_code(root_module="self").src.encode())  # (the graph, even if not recompiled)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            h.update(f"{n.target}:{type(gm.get_submodule(n.target)).__qualname__};".encode())
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device};".encode())
    for t in inputs:
        what = f"{tuple(t.shape)}:{t.dtype}:{t.device}" if isinstance(t, torch.Tensor) else repr(t)
        h.update(f"in:{what};".encode())
    return h.hexdigest()


def shaped(gm: fx.GraphModule) -> bool:
    """Whether every node of ``gm`` has the shape (or type) that shape propagation records."""
    return all("type" in n.meta for n in gm.graph.nodes)


class PartialShapes:
    """Shapes for nodes added to a graph whose other nodes are shaped already (the ops of an adapter spliced
    in for its call): each runs on fake tensors made from its inputs' recorded shapes."""

    def __init__(self, gm: fx.GraphModule, device) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode, self.device, self.shapes = FakeTensorMode(allow_non_fake_inputs=True), device, _Shapes(gm)

    def run(self, nodes: list[fx.Node]) -> None:
        env = self.shapes.env
        env.clear()
        mine = set(nodes)
        with self.mode:
            for n in nodes:
                for i in n.all_input_nodes:
                    if i not in mine and i not in env:
                        meta = i.meta["tensor_meta"]
                        if not isinstance(meta, TensorMetadata):
                            raise TypeError(f"{i.name} holds no single tensor")
                        env[i] = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device=self.device)
                env[n] = self.shapes.run_node(n)
        env.clear()


def _fake_shapes(gm: fx.GraphModule, inputs: tuple) -> bool:
    """Shape ``gm`` on fake copies of ``inputs`` (the model's own tensors read as they are); False where
    that fails, for any reason: the caller then runs the graph for real."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = _Shapes(gm)  # (made outside the mode: inside, ShapeProp would copy the model to fake tensors)
            with mode:
                shapes.propagate(*fake)
    except Exception:  # noqa: BLE001 (the real run that follows reports what is the model's own)
        return False
    return True


class _Shapes(ShapeProp):
    """ShapeProp that also keeps the ints and sizes nodes compute (for reshapes, pads, slices)."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, (int, float)) or (
            isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result)
        ):
            n.meta[VALUE_KEY] = tuple(result) if isinstance(result, (tuple, list)) else result
        return result


_META_METHODS = {"size", "dim", "new_zeros", "new_ones", "new_empty", "new_full"}


def is_shape_read(node: fx.Node) -> bool:
    """Reads only the shape, dtype or device of its first input (``x.shape``, ``x.size()``, ``x.dim()``,
    ``x.new_zeros(...)``, ``torch.zeros_like(x)``), never its values: adapters keep all three."""
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in ("shape", "ndim", "dtype", "device")
        return node.target in _like() and len(node.all_input_nodes) == 1
    return node.op == "call_method" and node.target in _META_METHODS and len(node.all_input_nodes) == 1


def reads_rank_only(node: fx.Node) -> bool:
    """A shape read that needs only the rank, dtype or device (``x.ndim``, ``x.dim()``, ``x.dtype``): any
    value that has those three can stand in for its input."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("ndim", "dtype", "device")
    return node.op == "call_method" and node.target == "dim" and len(node.all_input_nodes) == 1


@functools.cache
def _like() -> set:
    return {torch.zeros_like, torch.ones_like, torch.empty_like}
