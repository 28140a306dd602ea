"""What a rule hands the engine when it recognises a node.

A rule file in this package holds, for one op family:

* the op's IR-free semantics: a small class with ``transfer(inputs, channels)``
  that maps the affine states of its inputs to the state of its output (or
  raises :class:`~repfold._affine.NotAffine` with the reason), and for heavy
  layers ``absorb(state, channels, source_rank)`` that returns the layer's new
  weights when it takes over a whole region;
* ``match_fx(node, ctx)``: the torch.fx forms of the op;
* ``match_onnx(node, ctx)``: the ONNX forms of the op.

A matcher returns a :class:`Match` or None (the node is not in this family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Match:
    """One recognised op: its semantics, its data inputs and how to rebuild it.

    ``inputs`` are the frontend's own handles (fx ``Node`` or onnx-graphsurgeon
    ``Variable``); ``covers`` the ONNX nodes the op spans (MatMul + Add is one
    Linear); ``emit`` rebuilds a heavy layer with new weights on a new input and
    returns the value that replaces the old output.
    """

    op: Any
    inputs: tuple
    label: str
    covers: tuple = ()
    emit: Callable[..., Any] | None = None


def const_vector(t: np.ndarray | float, rank: int) -> tuple[int | None, np.ndarray | float]:
    """Split a broadcast constant into (axis it varies along, values).

    Returns ``(None, s)`` for a constant that is the same everywhere and
    ``(k, vector)`` when it varies along axis ``k`` only of a rank-``rank``
    value. Raises ValueError for a constant that varies along several axes or
    would raise the value's rank through broadcasting.
    """
    if isinstance(t, float):
        return None, t
    t = np.asarray(t, dtype=np.float64)
    if t.ndim > rank:
        raise ValueError("broadcasting the constant raises the value's rank")
    varying = [i for i, n in enumerate(t.shape) if n != 1]
    if not varying:
        return None, float(t.reshape(-1)[0]) if t.size else 0.0
    if len(varying) > 1:
        raise ValueError(f"the constant varies along {len(varying)} axes")
    return rank - t.ndim + varying[0], t.reshape(-1)
