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
from ._torch import F, nn
from .elementwise import ChannelAffine
from .linear import _np


def _channel_affine(scale, shift, mean, var, eps: float, rank: int) -> ChannelAffine:
    gamma = scale / np.sqrt(var + eps)
    beta = shift - mean * gamma
    shape = (-1,) + (1,) * (rank - 2)
    return ChannelAffine(gamma.reshape(shape), beta.reshape(shape))


ONNX_OPS = frozenset({"BatchNormalization"})


def fx_keys() -> set:
    return {nn.modules.batchnorm._BatchNorm, F.batch_norm}


_FX_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _match_functional(node, ctx) -> Match | None:
    """``F.batch_norm`` with running statistics, not training (timm's ``BatchNormAct2d`` calls it)."""
    args = dict(zip(_FX_ARGS, node.args))
    args.update(node.kwargs)
    if args.get("training", False) or not ctx.is_tensor(args.get("input")):
        return None
    vals = [None if args.get(k) is None else ctx.const(args[k])
            for k in ("running_mean", "running_var", "weight", "bias")]
    if vals[0] is None or vals[1] is None or any(args.get(k) is not None and v is None
                                                 for k, v in zip(("weight", "bias"), vals[2:])):
        return None
    rank = ctx.rank(args["input"])
    if rank is None or rank < 2 or any(not isinstance(v, np.ndarray) for v in vals if v is not None):
        return None
    mean, var, scale, shift = vals
    C = mean.shape[0]
    op = _channel_affine(np.ones(C) if scale is None else scale, np.zeros(C) if shift is None else shift,
                         mean, var, float(args.get("eps", 1e-5)), rank)
    return Match(op, (args["input"],), f"{node.name} (batch_norm)")


def match_fx(node, ctx) -> Match | None:
    if node.op == "call_function" and node.target is F.batch_norm:
        return _match_functional(node, ctx)
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
