"""Getting an fx graph out of a user's model, and example inputs to shape it."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

META_KEY = "repfold"


class TraceError(RuntimeError):
    """The model could not be turned into a torch.fx graph."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a copy-free view of ``model``; optional forward args keep their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    concrete = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }
    try:
        gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many types; all mean "not traceable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {first}") from e
    _drop_specialised(gm, [p.name in concrete for p in params])
    return gm


def _drop_specialised(gm: fx.GraphModule, fixed: list[bool]) -> None:
    """Remove the placeholders fx keeps for concrete args, and the checks it hangs on them.

    Those checks (``is_causal == False`` and friends) break TorchScript-based
    ONNX export; the values are baked into the graph either way.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    for node, is_fixed in zip(placeholders, fixed):
        if is_fixed:
            stack = [node]
            while stack:
                n = stack.pop()
                if n not in doomed:
                    doomed.append(n)
                    stack.extend(n.users)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(doomed, key=order.__getitem__, reverse=True):
        gm.graph.erase_node(n)
    gm.recompile()


def to_graph_module(model: nn.Module) -> fx.GraphModule:
    """A private copy of ``model`` as a GraphModule; the caller's model is never touched."""
    own = copy.deepcopy(model)
    if isinstance(own, fx.GraphModule):
        own.meta = copy.deepcopy(getattr(model, "meta", {}))
        return own
    gm = trace(own)
    gm.meta[META_KEY] = {}
    return gm


def example_inputs(model: nn.Module, given=None) -> tuple[torch.Tensor, ...]:
    """Inputs to shape the graph with: ``given``, those recorded by ``insert``, or timm's config."""
    if given is not None:
        return given if isinstance(given, tuple) else (given,)
    dtype, device = _dtype_device(model)
    shapes = getattr(model, "meta", {}).get(META_KEY, {}).get("input_shapes")
    if shapes is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if "input_size" in cfg:
            shapes = [[1, *cfg["input_size"]]]
    if shapes is None:
        raise ValueError(
            f"cannot tell the input shape of {type(model).__name__}: pass example_inputs="
        )
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen).to(dtype=dtype, device=device) for s in shapes)


def _dtype_device(model: nn.Module):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def shape(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']``."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"the model does not run on example inputs of shape {shapes} ({msg}); pass example_inputs="
        ) from e
    finally:
        gm.train(was_training)
