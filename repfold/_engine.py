"""Region finding and fold planning, independent of the graph representation.

A frontend (torch.fx or ONNX) turns its graph into :class:`Step` s, the ops a
rule in ``repfold.patterns`` recognised, in topological order. Every other
value is a *source*. The engine then

1. propagates affine states: each step's output is ``M·x + c`` of the source
   its inputs share, or (when the rule says it is not affine) a new source;
2. groups steps by source into regions; a region's *exits* are the values that
   leave it (read by an op outside it, or a graph output);
3. calls a region an *adapter region* when it holds more heavy layers (with a
   weight matrix) than it has exits: collapsing it removes layers;
4. gives every exit one heavy layer of the region that can absorb its map with
   the same shape, groups and bias (nearest ancestor first); if one exit finds
   none the whole region is kept, with the reason.

The frontend then rebuilds each absorbing layer on the source with the new
weights and deletes the region's other ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._affine import Affine, Channels, NotAffine
from ._report import Region

OUTPUT = "<output>"


@dataclass
class Step:
    """An op a rule recognised: its name (the value it produces), semantics and inputs."""

    name: str
    op: Any
    inputs: tuple[str, ...]
    label: str
    emit: Callable | None = None


@dataclass
class Fold:
    """Replace ``exit`` by ``absorber`` rebuilt on ``source`` with ``(W, b)``."""

    exit: str
    source: str
    absorber: str
    W: np.ndarray
    b: np.ndarray | None


@dataclass
class Plan:
    folds: list[Fold]
    regions: list[Region]


def plan(
    steps: Sequence[Step],
    consumers: Callable[[str], list[str]],
    rank: Callable[[str], int | None],
    label: Callable[[str], str],
) -> Plan:
    """Find the adapter regions among ``steps`` and decide how each folds."""
    by_name = {s.name: s for s in steps}
    ch = Channels()
    state: dict[str, Affine | None] = {}
    ended: dict[str, str] = {}  # step -> why its output starts a new region

    def source(name: str) -> Affine | None:
        r = rank(name)
        return None if r is None else Affine.of_source(name, r)

    for s in steps:
        ins = [state[i] if i in state else state.setdefault(i, source(i)) for i in s.inputs]
        if any(v is None for v in ins):
            state[s.name], ended[s.name] = source(s.name), "the rank of its input is unknown"
            continue
        saved = dict(ch.axis)
        try:
            state[s.name] = s.op.transfer(ins, ch)
        except NotAffine as e:
            ch.axis = saved
            state[s.name], ended[s.name] = source(s.name), str(e)

    groups: dict[str, list[str]] = {}
    for s in steps:
        v = state[s.name]
        if v is not None and v.source != s.name:
            groups.setdefault(v.source, []).append(s.name)

    folds: list[Fold] = []
    regions: list[Region] = []
    for src, members in groups.items():
        heavy = [m for m in members if by_name[m].op.heavy]
        exits = _exits(members, consumers)
        if len(heavy) <= sum(not state[e].is_identity for e in exits):
            continue  # nothing to remove: a plain layer, not an adapter region
        region = Region(label(src), [by_name[m].label for m in members], folded=False)
        regions.append(region)
        outcome = _settle(members, by_name, state, ch, rank(src), consumers)
        if isinstance(outcome, tuple):
            e, why, outside = outcome
            blockers = ", ".join(_blocker(c, label, ended) for c in outside)
            region.reason = f"{by_name[e].label} feeds {blockers}; {why}"
            continue
        region.folded = True
        for e, (h, (W, b)) in outcome.items():
            folds.append(Fold(e, src, h, W, b))
            region.into.append(by_name[h].label)
    return Plan(folds, regions)


def _exits(members: list[str], consumers) -> list[str]:
    inside = set(members)
    return [m for m in members if any(c not in inside for c in consumers(m))]


def _settle(members, by_name, state, ch, source_rank, consumers):
    """Give every exit an absorber, pulling cheap ops that can't be absorbed out of the region.

    An exit that is an elementwise or layout op (GELU's ``x / sqrt(2)`` after
    the absorbing Linear, say) stays in the graph as it was: its inputs become
    the exits instead, and so does everything of the region downstream of it.
    Returns ``{exit: (absorber, (W, b))}``, or the first failure as ``(exit,
    reason, its consumers outside)`` when a heavy layer would have to be kept or
    nothing would be removed.
    """
    folded, first = list(members), None
    while True:
        exits = [e for e in _exits(folded, consumers) if not state[e].is_identity]
        heavy = [m for m in folded if by_name[m].op.heavy]
        chosen, why = _assign(exits, heavy, by_name, state, ch, source_rank)
        if why is None and len(heavy) > len(exits):
            return chosen
        if why is None:
            why = exits[0], "folding it would remove no layer"
        e = why[0]
        first = first or (*why, [c for c in consumers(e) if c not in set(folded)])
        if by_name[e].op.heavy:
            return first
        doomed = {e}
        for m in folded:  # members are in topological order
            if any(i in doomed for i in by_name[m].inputs):
                doomed.add(m)
        folded = [m for m in folded if m not in doomed]
        if not folded:
            return first


def _blocker(consumer: str, label: Callable[[str], str], ended: dict[str, str]) -> str:
    if consumer == OUTPUT:
        return "the graph output"
    why = ended.get(consumer, "not a channel-affine op")
    return f"{label(consumer)} ({why})"


def _assign(todo, heavy, by_name, state, ch, source_rank):
    """Match every exit to a distinct heavy layer that absorbs it; else (exit, reason)."""
    ancestors = _ancestors(by_name)
    used: set[str] = set()
    chosen: dict[str, tuple[str, tuple]] = {}
    for e in todo:
        up = ancestors(e) | {e}
        order = [h for h in reversed(heavy) if h in up] + [h for h in reversed(heavy) if h not in up]
        reasons = []
        for h in order:
            step = by_name[h]
            if h in used or step.emit is None:
                continue
            try:
                chosen[e] = (h, step.op.absorb(state[e], ch, source_rank))
            except NotAffine as err:
                reasons.append((h, f"{step.label}: {err}"))
                continue
            used.add(h)
            break
        else:
            return chosen, (e, "no layer can absorb it: " + _why_none(state[e], order, by_name, reasons))
    return chosen, None


def _why_none(v: Affine, order, by_name, reasons) -> str:
    """The most telling reason no layer absorbed ``v``: a missing shape beats the rest."""
    if not isinstance(v.M, float):
        shape = v.M.shape
        if not any(getattr(by_name[h].op, "W", np.empty(0)).shape == shape for h in order):
            return f"it is a {shape[0]}x{shape[1]} map and no layer of the region has that shape"
        for h, r in reasons:
            if by_name[h].op.W.shape == shape:
                return r
    return reasons[0][1] if reasons else "no layer of the region is left to absorb it"


def _ancestors(by_name):
    memo: dict[str, set[str]] = {}

    def up(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            for i in by_name[name].inputs:
                if i in by_name:
                    memo[name] |= {i} | up(i)
        return memo[name]

    return up
