"""Attention input projections: ``nn.MultiheadAttention`` as one op.

Attention is not linear in its input, so a region ends there, but its q, k
and v projections absorb a region that feeds them (forward fold, per slot)::

    W_s' = W_s·M        b_s' = b_s + W_s·c        for each of q, k, v reading the region

with the packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``. Fused
``qkv`` Linears and separate q/k/v Linears are plain Linears (``linear.py``);
what torch's ONNX exporters emit for this module is MatMul/Gemm and is
handled there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repfold.core.affine import Affine, Channels, NotAffine

from ._base import Match, fx_rebuild, torch_own
from ._torch import nn
from .linear import _np


@dataclass
class Attention:
    """q, k, v projection weights (each (E, d_slot), float64) and the packed bias (3E) or None."""

    W: tuple[np.ndarray, np.ndarray, np.ndarray]
    b: np.ndarray | None

    heavy = False

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        raise NotAffine("attention is not linear in its input")

    def absorb_input(self, v: Affine, ch: Channels, slots) -> tuple[list[np.ndarray], np.ndarray | None]:
        v = ch.require(v, v.rank - 1, "an attention projection")
        W, b = list(self.W), None if self.b is None else self.b.copy()
        E = W[0].shape[0]
        for s in slots:
            d = W[s].shape[1]
            if not isinstance(v.M, float) and v.M.shape != (d, d):
                raise NotAffine(f"needs a {d}x{d} map, the region is {v.M.shape[0]}x{v.M.shape[1]}")
            shift = W[s].sum(axis=1) * v.c if isinstance(v.c, float) else W[s] @ v.c
            W[s] = W[s] * v.M if isinstance(v.M, float) else W[s] @ v.M
            if np.any(shift):
                if b is None:
                    raise NotAffine("the attention has no input bias to take the region's constant")
                b[s * E : (s + 1) * E] += shift
        return W, b


def _fx_params(m: nn.MultiheadAttention, W, b):
    out = {"in_proj_weight": np.concatenate(W)} if m._qkv_same_embed_dim else {
        "q_proj_weight": W[0], "k_proj_weight": W[1], "v_proj_weight": W[2]}
    if b is not None:
        out["in_proj_bias"] = b
    return out


def _arg(node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


ONNX_OPS = frozenset()  # the exporters spell attention out: MatMul, Softmax, ...


def fx_keys() -> set:
    return {nn.MultiheadAttention}


def match_fx(node, ctx) -> Match | None:
    if node.op != "call_module":
        return None
    m = ctx.module(node)
    if not isinstance(m, nn.MultiheadAttention) or not torch_own(m):
        return None
    ins = tuple(_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if not all(ctx.is_tensor(i) for i in ins):
        return None
    if m._qkv_same_embed_dim:
        W = tuple(np.split(_np(m.in_proj_weight), 3))
    else:
        W = (_np(m.q_proj_weight), _np(m.k_proj_weight), _np(m.v_proj_weight))
    return Match(Attention(W, _np(m.in_proj_bias)), ins, f"{node.target} (MultiheadAttention)",
                 emit=fx_rebuild(node, ctx, _fx_params))


def match_onnx(node, ctx) -> Match | None:
    return None
