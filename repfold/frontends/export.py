"""The torch.export frontend: an ExportedProgram is folded as the fx graph of its ATen ops.

``ep.module()`` is rewritten into torch forms (``repfold.frontends.aten``)
when it is traced, the fold runs on it as on any fx graph, and
:func:`fold_export` exports the result again: torch's own exporter writes
the new program and its verifier checks it, so no private export API is
needed.
"""

from __future__ import annotations

import warnings

import torch

from repfold.frontends.aten import training_ops
from repfold.frontends.fx import fold_fx
from repfold.report import FoldReport


def _dynamic_shapes(ep):
    """The dynamic dims of each user input as ``torch.export.Dim``s with the program's ranges (one Dim per
    symbol, so inputs that share a size still share it); None where the program has none."""
    dims: dict = {}
    specs, any_dynamic = [], False
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        spec = {}
        for k, d in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(d, int):
                continue
            expr = d.node.expr
            if expr not in dims:
                vr = ep.range_constraints.get(expr)
                lo = int(vr.lower) if vr is not None and vr.lower.is_finite else None
                hi = int(vr.upper) if vr is not None and vr.upper.is_finite else None
                dims[expr] = torch.export.Dim(f"d{len(dims)}", min=lo, max=hi) if expr.is_symbol \
                    else torch.export.Dim.DYNAMIC  # a derived size (2*s0): let export find it again
            spec[k] = dims[expr]
        any_dynamic |= bool(spec)
        specs.append(spec or None)
    return tuple(specs) if any_dynamic else None


def fold_export(ep, *, scales: bool = True) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every adapter region of the ExportedProgram ``ep``; a new program and the report.

    ``ep`` is not modified. The new program is exported from the folded
    graph with the example inputs ``ep`` was exported with, and the same
    dynamic dimensions.
    """
    args, kwargs = ep.example_inputs or ((), {})
    if not args:
        raise ValueError("this ExportedProgram has no positional example inputs to export the folded program with")
    if kwargs:
        raise ValueError("ExportedPrograms with keyword inputs are not supported yet: export with positional ones")
    training = training_ops(ep.graph)
    if training:
        warnings.warn(f"repfold.fold: the program was exported in training mode ({training[0]}): its train-mode "
                      "ops stay as they are; export the model in eval mode", UserWarning, stacklevel=3)
    folded, report = fold_fx(ep.module(), args, scales=scales)
    report.frontend = "torch.export"
    with torch.no_grad():
        out = torch.export.export(folded.eval(), args, kwargs, dynamic_shapes=_dynamic_shapes(ep), strict=False)
    if _core(ep):  # it came decomposed (``run_decompositions()``, as ExecuTorch takes it): so does the result
        out = out.run_decompositions()
    return out, report


def _core(ep) -> bool:
    """Whether every ATen op of ``ep`` is a core ATen op (a decomposed program)."""
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function" and hasattr(n.target, "tags")]
    return bool(ops) and all(torch.Tag.core in op.tags for op in ops)
