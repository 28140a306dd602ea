"""repfold's fold-rule library: one op family per module.

Each module exports ``match_fx`` and ``match_onnx``, and says which ops they
may match: ``ONNX_OPS`` (op types) and ``fx_keys()`` (module classes, whose
subclasses count too, functions and method names). A frontend asks
:func:`fx_rules` / :func:`onnx_rules` for the rules of a node's op and tries
them in the order of :data:`RULES` (a 1×1 ``nn.Conv2d`` is ``linear``'s before
it is ``conv``'s). Adding an op means adding its semantics, its two matchers
and its keys to one of these files (or a new one listed here) and a test.
"""

from __future__ import annotations

import functools

from . import attention, conv, elementwise, embedding, layout, linear, normalization, pooling
from ._base import Match

RULES = (linear, conv, embedding, pooling, attention, normalization, elementwise, layout)


@functools.cache
def _fx_index() -> dict:
    index: dict = {}
    for rule in RULES:
        for key in rule.fx_keys():
            index.setdefault(key, []).append(rule)
    return index


@functools.cache
def _onnx_index() -> dict[str, tuple]:
    ops = set().union(*(r.ONNX_OPS for r in RULES))
    return {op: tuple(r for r in RULES if op in r.ONNX_OPS) for op in ops}


def fx_rules(node, module=None) -> tuple:
    """The rules that may match fx ``node`` (``module``: the module a call_module node calls)."""
    index = _fx_index()
    if node.op == "call_module":
        found = [r for cls in type(module).__mro__ for r in index.get(cls, ())]
        return tuple(r for r in RULES if r in found)
    if node.op in ("call_function", "call_method"):
        try:
            return tuple(index.get(node.target, ()))
        except TypeError:  # an unhashable target: no rule keys it
            return ()
    return ()


def onnx_rules(node) -> tuple:
    """The rules that may match ONNX ``node`` (by op type; custom domains have none)."""
    return _onnx_index().get(node.op, ()) if node.domain in ("", "ai.onnx", None) else ()


__all__ = ["RULES", "Match", "attention", "conv", "elementwise", "embedding", "fx_rules", "layout", "linear", "normalization",
           "onnx_rules", "pooling"]
