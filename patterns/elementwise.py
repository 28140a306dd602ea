"""Elementwise arithmetic: constants per channel, and sums of two region values.

``ChannelAffine`` is ``γ ⊙ v + β`` with γ, β scalars or per-channel vectors
(multiply, divide, add, subtract, negate by a constant; eval-mode BatchNorm)::

    γ⊙(M·x + c) + β  ->  (diag(γ)·M)·x + (γ⊙c + β)

``Sum`` adds or subtracts two values of the same region (a residual around an
adapter, a parallel LoRA branch)::

    (M₁·x + c₁) ± (M₂·x + c₂)  ->  (M₁ ± M₂)·x + (c₁ ± c₂)

A constant that varies along any axis but the channel axis, or a sum of
values from two different sources, ends the region.

In ONNX, the scalar ``Mul`` of GELU's erf form (``x · (1 + erf(x/√2)) · ½``,
as the TorchScript exporter writes ``nn.GELU``) is no scale here: runtimes
fuse the five ops into one GELU kernel (onnxruntime's GELU fusion), and
folding the ``½`` away would leave four separate, slower ops (RepViT: 12 %
slower at batch 1 than with the fused kernel).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from repfold.core.affine import Affine, Channels, Kernel, NotAffine, add, scale

from ._base import Match, const_vector
from ._torch import torch


@dataclass
class ChannelAffine:
    """``γ ⊙ v + β``; γ and β are floats or arrays broadcast against the input."""

    gamma: np.ndarray | float = 1.0
    beta: np.ndarray | float = 0.0

    heavy = False

    def _per_channel(self, t, v: Affine, ch: Channels):
        try:
            axis, values = const_vector(t, v.rank)
        except ValueError as e:
            raise NotAffine(str(e)) from None
        if axis is not None:
            v = ch.require(v, axis, "a per-channel constant")
        return v, values

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        v, g = self._per_channel(self.gamma, ins[0], ch)
        v, b = self._per_channel(self.beta, v, ch)
        return v.with_map(scale(g, v.M), add(g * v.c, b))


@dataclass
class Sum:
    """``a + sign·b`` for two values of one region."""

    sign: float = 1.0

    heavy = False

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        a, b = ins
        if a.source != b.source:
            raise NotAffine("adds values that come from different sources")
        if not ch.same_layout(a, b):
            raise NotAffine("adds values laid out differently")
        if (isinstance(a.M, Kernel) or isinstance(b.M, Kernel)) and a.shape[2:] != b.shape[2:]:
            raise NotAffine("adds a conv's output to a value of another size")
        return a.with_map(add(a.M, self.sign * b.M), add(a.c, self.sign * b.c))


# --- torch.fx --------------------------------------------------------------------------

@functools.cache
def _fx_kinds() -> dict:
    return {
        operator.add: "add", torch.add: "add", "add": "add",
        operator.sub: "sub", torch.sub: "sub", "sub": "sub",
        operator.mul: "mul", torch.mul: "mul", "mul": "mul",
        operator.truediv: "div", torch.div: "div", "div": "div",
        operator.neg: "neg", torch.neg: "neg", "neg": "neg",
    }


def _combine(kind: str, args: list, consts: list, label: str) -> Match | None:
    """The op for ``kind(args)`` given which args are constants (None where not)."""
    if kind == "neg":
        return Match(ChannelAffine(-1.0), (args[0],), label)
    (a, b), (ca, cb) = args, consts
    if ca is None and cb is None:
        return Match(Sum(1.0 if kind == "add" else -1.0), (a, b), label) if kind in ("add", "sub") else None
    if ca is not None and cb is not None:
        return None
    x, k, k_first = (b, ca, True) if ca is not None else (a, cb, False)
    if kind == "mul":
        op = ChannelAffine(gamma=k)
    elif kind == "add":
        op = ChannelAffine(beta=k)
    elif kind == "sub":
        op = ChannelAffine(-1.0, k) if k_first else ChannelAffine(beta=-k)
    elif kind == "div" and not k_first:
        op = ChannelAffine(gamma=1.0 / k)
    else:
        return None
    return Match(op, (x,), label)


def fx_keys() -> set:
    return set(_fx_kinds())


def match_fx(node, ctx) -> Match | None:
    if node.op not in ("call_function", "call_method"):
        return None
    kind = _fx_kinds().get(node.target)
    if kind is None or node.kwargs:
        return None
    args = list(node.args)
    if len(args) != (1 if kind == "neg" else 2):
        return None
    consts = [ctx.const(a) for a in args]
    if kind != "neg" and any(c is None and not ctx.is_tensor(a) for a, c in zip(args, consts)):
        return None
    return _combine(kind, args, consts, f"{node.name} ({kind})")


# --- ONNX ------------------------------------------------------------------------------

_ONNX = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Neg": "neg"}
ONNX_OPS = frozenset(_ONNX)


def _erf_term(var) -> bool:
    """``var`` is ``1 + erf(·)`` (or ``erf(·) + 1``): GELU's erf factor."""
    add = var.inputs[0] if len(var.inputs) == 1 else None
    return add is not None and add.op == "Add" and any(
        len(i.inputs) == 1 and i.inputs[0].op == "Erf" for i in add.inputs)


def _gelu_half(node, x) -> bool:
    """The scalar ``Mul`` ``node`` of ``x`` is GELU's ``½``: after ``x · (1 + erf)``, or before it."""
    prod = x.inputs[0] if len(x.inputs) == 1 else None
    if prod is not None and prod.op == "Mul" and any(_erf_term(i) for i in prod.inputs):
        return True
    return any(c.op == "Mul" and any(_erf_term(i) for i in c.inputs if i is not node.outputs[0])
               for c in node.outputs[0].outputs)


def match_onnx(node, ctx) -> Match | None:
    kind = _ONNX.get(node.op)
    if kind is None:
        return None
    args = list(node.inputs)
    consts = [ctx.const(a) for a in args]
    consts = [None if c is None else (float(c) if c.ndim == 0 else c) for c in consts]
    if kind == "mul" and len(args) == 2 and any(isinstance(c, float) for c in consts):
        x = args[0] if consts[1] is not None else args[1]
        if _gelu_half(node, x):  # a fused kernel's part (module docstring): not a scale to fold
            return None
    return _combine(kind, args, consts, f"{node.name} ({node.op})")
