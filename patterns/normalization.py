"""Normalizations that are a per-channel affine map at inference: eval-mode BatchNorm.

With running statistics, BatchNorm is ``γ ⊙ v + β`` along channel axis 1::

    γ = weight / sqrt(running_var + eps)        β = bias - running_mean·γ

so it is an :class:`~repfold.patterns.elementwise.ChannelAffine`. LayerNorm,
GroupNorm and BatchNorm without running statistics depend on the data and
end a region.
"""

from __future__ import annotations

import numpy as np

from ._base import Match, torch_own
from ._torch import nn
from .elementwise import ChannelAffine
from .linear import _np


def _channel_affine(scale, shift, mean, var, eps: float, rank: int) -> ChannelAffine:
    gamma = scale / np.sqrt(var + eps)
    beta = shift - mean * gamma
    shape = (-1,) + (1,) * (rank - 2)
    return ChannelAffine(gamma.reshape(shape), beta.reshape(shape))


ONNX_OPS = frozenset({"BatchNormalization"})


def fx_keys() -> set:
    return {nn.modules.batchnorm._BatchNorm}


def match_fx(node, ctx) -> Match | None:
    if node.op != "call_module":
        return None
    m = ctx.module(node)
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not torch_own(m) or m.running_mean is None:
        return None
    rank = ctx.rank(node.args[0])
    if rank is None or rank < 2:
        return None
    C = m.num_features
    scale = _np(m.weight) if m.affine else np.ones(C)
    shift = _np(m.bias) if m.affine else np.zeros(C)
    op = _channel_affine(scale, shift, _np(m.running_mean), _np(m.running_var), m.eps, rank)
    return Match(op, (node.args[0],), f"{node.target} ({type(m).__name__})")


def match_onnx(node, ctx) -> Match | None:
    if node.op != "BatchNormalization" or len(node.outputs) != 1 or node.attrs.get("training_mode", 0):
        return None
    x, *params = node.inputs
    vals = [ctx.const(p) for p in params]
    rank = ctx.rank(x)
    if rank is None or rank < 2 or any(v is None for v in vals):
        return None
    op = _channel_affine(*vals, node.attrs.get("epsilon", 1e-5), rank)
    return Match(op, (x,), f"{node.name} (BatchNormalization)")
