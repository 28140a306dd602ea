"""Ops that move or keep values without touching channel arithmetic.

``Permute`` reorders axes (transpose, permute); the map is unchanged and the
channel axis moves with it::

    permute(M·x + c, p)  ->  same (M, c), dims' = dims[p]

``Same`` passes a value through unchanged: eval-mode dropout, identity,
contiguous, clone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from repfold._affine import Affine, Channels, NotAffine

from ._base import Match


@dataclass
class Permute:
    """Axis ``i`` of the output is axis ``perm[i]`` of the input (negative indices allowed)."""

    perm: tuple[int, ...]

    heavy = False

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        (v,) = ins
        r = len(v.dims)
        perm = [p % r for p in self.perm] if r else []
        if sorted(perm) != list(range(r)):
            raise NotAffine(f"permutation {self.perm} does not fit a rank-{r} value")
        return Affine(v.source, tuple(v.dims[p] for p in perm), v.M, v.c)


def swap(rank: int, a: int, b: int) -> tuple[int, ...]:
    p = list(range(rank))
    p[a % rank], p[b % rank] = p[b % rank], p[a % rank]
    return tuple(p)


@dataclass
class Same:
    """The identity."""

    heavy = False

    def transfer(self, ins: list[Affine], ch: Channels) -> Affine:
        return ins[0]


_FX_SAME_METHODS = {"contiguous", "clone"}


def match_fx(node, ctx) -> Match | None:
    label = f"{node.name} ({node.target if isinstance(node.target, str) else node.target.__name__})"
    if node.op == "call_module":
        m = ctx.module(node)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return Match(Same(), (node.args[0],), f"{node.target} ({type(m).__name__})")
        return None
    if node.op == "call_method" and node.target in _FX_SAME_METHODS and len(node.args) == 1:
        return Match(Same(), (node.args[0],), label)
    if node.op == "call_function" and node.target is F.dropout:
        if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False:
            return Match(Same(), (node.args[0],), label)
        return None
    x = node.args[0] if node.args else None
    rank = ctx.rank(x) if x is not None else None
    if rank is None:
        return None
    if node.target in ("transpose", torch.transpose) and len(node.args) == 3 and not node.kwargs:
        return Match(Permute(swap(rank, node.args[1], node.args[2])), (x,), label)
    if node.target in ("permute", torch.permute) and not node.kwargs:
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if all(isinstance(d, int) for d in dims):
            return Match(Permute(tuple(dims)), (x,), label)
    return None


def match_onnx(node, ctx) -> Match | None:
    if node.op == "Transpose":
        rank = ctx.rank(node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None and rank is not None:
            perm = list(reversed(range(rank)))
        if perm is None:
            return None
        return Match(Permute(tuple(perm)), (node.inputs[0],), f"{node.name} (Transpose)")
    if node.op in ("Identity", "Dropout") and (len(node.outputs) == 1 or not ctx.used(node.outputs[1])):
        return Match(Same(), (node.inputs[0],), f"{node.name} ({node.op})")
    return None
