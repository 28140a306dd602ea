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
4. gives every exit one absorber, in this order: a heavy layer of the region
   with the same shape, groups and bias (nearest ancestor first; this is both
   the forward fold into a Linear and the backward fold out of one); the ops
   that read the exit, when every one of them can take the map at its input
   (k×k and grouped convs, attention); the layer that produced the region's
   source, when the region is all it feeds. If one exit finds none, the whole
   region is kept, with the reason.

Layout ops between the source and an absorber are replayed on the source
(see :func:`_replay`). The frontend then rebuilds each absorber with the new
weights and deletes the region's other ops.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _graph
from ._affine import Affine, Channels, Kernel, KernelBlocked, NotAffine, Relaid
from ._report import Region

OUTPUT = "<output>"
SOURCE = "<source>"


_UNKNOWN = "the shape of its input is unknown"
_UNSETTLED = "the graph's shapes disagree with the sizes its ops compute"


class RepfoldError(RuntimeError):
    """A failure of repfold's own (a bug), never of the user's input; ``region`` names where it happened."""

    def __init__(self, message: str, region: str | None = None) -> None:
        super().__init__(message)
        self.region = region


@contextmanager
def folding(where: Any) -> Iterator[None]:
    """Report an unexpected failure inside the block as a :class:`RepfoldError` naming ``where``.

    ``where`` is a :class:`Fold` (its region's source), a :class:`Step` (its
    label) or a string.
    """
    try:
        yield
    except (RepfoldError, NotAffine, MemoryError):
        raise
    except Exception as e:
        if isinstance(where, Fold):
            where = where.region.source if where.region is not None else where.source
        elif isinstance(where, Step):
            where = where.label
        raise RepfoldError(f"while folding at {where}: {type(e).__name__}: {e}", region=str(where)) from e


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
    """Rebuild ``absorber`` with ``(W, b)``; its output replaces ``target``.

    ``kind`` is ``"into"`` (a heavy layer of the region, rebuilt on the
    source), ``"sink"`` (an op reading the exit, rebuilt on the source) or
    ``"producer"`` (the layer that made the source, rebuilt on its own input).
    ``via`` lists layout steps to copy, in order, as ``(step, inputs, perm)``
    where an input is :data:`SOURCE` (the value the layout ops start from: the
    source, or the rebuilt producer's output) or an earlier copied step, and
    ``perm``, when set, replaces the step by one transpose with that
    permutation (transposes in a row merged);
    ``start`` names the value the absorber reads (or, for a producer, the
    value that replaces ``target``).
    """

    kind: str
    exit: str
    target: str
    source: str
    absorber: str
    W: Any
    b: Any
    via: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = field(default_factory=list)
    start: str = SOURCE
    region: Region | None = None


@dataclass
class Plan:
    """What to rewrite: the folds, every region found, and what must be gone afterwards.

    ``members`` maps every op of a folded region (and a producer fold's old
    layer) to the region's source: after the rewrite none of them may still
    run. ``redirects`` maps those whose shape is read to the value that takes
    over the shape read: a fold's target (read through its replacement), a
    copied layout step, or the source.
    """

    folds: list[Fold]
    regions: list[Region]
    members: dict[str, str]
    redirects: dict[str, str] = field(default_factory=dict)
    unseen: list[str] = field(default_factory=list)  # layers whose input shape is unknown: no region can reach
    # layers an adapter region's fold removes (not its absorbers), each with the region's source; and every op
    # this plan accounts for (folded, rebuilt, or in a region reported kept): see :func:`_undone`
    removed: dict[str, str] = field(default_factory=dict)
    accounted: set[str] = field(default_factory=set)


def plan(
    steps: Sequence[Step],
    consumers: Callable[[str], list[str]],
    shape: Callable[[str], tuple[int, ...] | None],
    label: Callable[[str], str],
    *,
    scales: bool = True,
    dtype: Callable[[str], Any] = lambda name: None,
    shape_reads: Callable[[str], list[tuple]] = lambda name: [],
    position: Callable[[str], int] = lambda name: 0,
    hazard: Callable[[str], str | None] = lambda name: None,
    written: Collection[str] = (),
    shared: Callable[[str], bool] = lambda name: False,
) -> Plan:
    """Find the adapter regions among ``steps`` and decide how each folds.

    With ``scales`` a region without heavy layers of its own (SSF, IA3,
    LayerScale, BatchNorm) also folds when an absorber takes it.

    ``dtype`` gives a value's element type; ``shape_reads`` the label and
    position of each op that reads only a value's shape (and, optionally,
    whether it reads only its rank, dtype and device) (they are not
    consumers, but a folded region whose shape is read must leave a value of
    that shape behind, defined before the read); ``position`` a value's place
    in the graph's topological order;
    ``hazard`` says why a source cannot be read anywhere but where it is read
    now (an in-place write to it), or None. ``written`` names the values an
    op writes into in place (or through a view of them): the ops reading them
    see a source of their own (the value they read is not the one the region
    computed), and no fold rebuilds one of them to read the region's source.

    A region whose fold leaves layers of its own in place (a second adapter
    after the first one's absorbing layer, EfficientNet-V2's projection
    without an activation between, FastViT's 1x1 block after its large-kernel
    conv) is planned again with the values those layers read cut: the ops
    that compute them stay in the region, as its exits, and the ops that
    read them see a source of their own, so that they fold, or are reported
    kept, as a region of their own. So is a value a conv cannot take beside
    other branches (RepGhost's depthwise conv and identity BatchNorm after a
    1x1 conv), and the output of each layer but the last that a kept region
    chains in series (a projection without activation into the next block's
    1x1 conv, an adapter between them); where it chains none, the value an
    adapter's branches part from, past a layer, when something else reads it
    too (MobileNet-V3's block output, read by the next block and by an adapter
    before an FPN's 1x1 conv): the adapter's region then starts there.
    An average pool whose kernel map an op moving positions ends (a
    transpose before the Linear layers that read it: NeXtViT's key/value
    reduction) is planned again as an op of its own that commutes with the
    region's map, replayed on the source (``commute``).
    """
    fresh: set[str] = set()
    cuts: set[str] = set(written)
    commuting: set[str] = set()
    removed: dict[str, str] = {}  # adapter layers a fold of any pass removed -> that region's source
    while True:
        result, more, more_cuts, more_commuting = _plan_once(
            steps, consumers, shape, label, scales, dtype, shape_reads, position, hazard, fresh, cuts,
            frozenset(written), shared, frozenset(commuting))
        for h, src in result.removed.items():
            removed.setdefault(h, src)
        if more <= fresh and more_cuts <= cuts and more_commuting <= commuting:
            _undone(result, removed, steps, label)
            return result
        fresh |= more
        cuts |= more_cuts
        commuting |= more_commuting


def _undone(result: Plan, removed: dict[str, str], steps: Sequence[Step], label: Callable[[str], str]) -> None:
    """Report as kept the adapter layers a fold of an earlier pass removed that the final plan neither folds
    nor reports: a pass that starts regions elsewhere must not make an adapter vanish from the report while
    its layers still run (a LoRA's branch beside a patch embedding's conv, once summed into it, planned again
    from each conv: only its scale folded, into its own up-projection, and three convs ran where PEFT's
    merge leaves one)."""
    by_name = {s.name: s for s in steps}
    lost: dict[str, list[str]] = {}
    for h, src in removed.items():
        if h not in result.accounted:
            lost.setdefault(src, []).append(h)
    for src, layers in lost.items():
        names = ", ".join(by_name[h].label for h in layers)
        result.regions.append(Region(label(src), [by_name[h].label for h in layers], folded=False, reason=(
            f"its layers {names} still run: a fold found for them was given up when the graph was planned "
            "again with regions starting elsewhere, and no region of the final plan folds them")))


def _plan_once(steps, consumers, shape, label, scales, dtype, shape_reads, position, hazard, fresh: set[str],
               cuts: set[str], written: frozenset[str] = frozenset(), shared=lambda name: False,
               commuting: frozenset[str] = frozenset()):
    """One planning pass, with the values in ``fresh`` as sources whatever they compute, and those in ``cuts``
    sources to the ops that read them (the ops that compute them stay in their region, of which they are an
    exit), the ops in ``commuting`` carried by their ``commute`` rule; returns the plan and the values to be
    fresh, and to be cuts, and the ops to commute, next time."""
    by_name = {s.name: s for s in steps}
    ch = Channels()
    state: dict[str, Affine | None] = {}
    ended: dict[str, str] = {}  # step -> why its output starts a new region

    def source(name: str) -> Affine | None:
        sh = shape(name)
        return None if sh is None else ch.source(name, sh)

    lone = set() if scales else _lone_layers(steps)
    more: set[str] = set()  # values to be sources next time
    more_cuts: set[str] = set()
    blocked: set[str] = set()  # convs whose kernel maps an op moving positions ended
    more_commuting: set[str] = set()  # pools whose kernel maps an op moving positions ended: commute next time
    as_cut: dict[str, Affine | None] = {}

    def read(i: str) -> Affine | None:
        """Value ``i`` as the op reading it sees it."""
        if i in cuts:
            return as_cut[i] if i in as_cut else as_cut.setdefault(i, source(i))
        return state[i] if i in state else state.setdefault(i, source(i))

    flow = _dataflow(steps)
    moved_up: dict[str, set[str]] = {}  # an op that needs its input laid out as the source -> moved values
    for s in steps:
        if s.name in lone or s.name in fresh:  # no adapter region can reach it / the start of one of its own
            state[s.name] = source(s.name)
            continue
        ins = [read(i) for i in s.inputs]
        if any(v is None for v in ins):
            state[s.name], ended[s.name] = source(s.name), _UNKNOWN
            continue
        saved = dict(ch.axis)
        try:
            with folding(s):
                state[s.name] = (s.op.commute if s.name in commuting else s.op.transfer)(ins, ch)
            if shape(s.name) not in (None, state[s.name].shape):  # the graph's shapes are not settled: the
                raise NotAffine(_UNSETTLED)  # algebra would follow sizes the value does not have
        except NotAffine as e:
            ch.axis = saved
            if isinstance(e, KernelBlocked):  # a conv's output moved: next time the conv starts a region instead
                # (unless it is one of parallel branches a fold of this pass sums: see ``summed``)
                for h in _kernel_origins(s.inputs, by_name, state, cuts):
                    (more_commuting if hasattr(by_name[h].op, "commute") else blocked).add(h)
            elif hasattr(s.op, "absorb") and not isinstance(e, Relaid) and not _pure(ins[0]) \
                    and len(consumers(s.inputs[0])) > 1:
                # a conv that cannot carry the map it reads, beside other branches of its input (RepGhost's
                # depthwise conv and BatchNorm after a 1x1 conv, FastViT's after a large-kernel conv): next
                # time the branches start there, to sum as a region of their own
                more_cuts.add(s.inputs[0])
            # An input that only moves its source's values (TResNet's space-to-depth folds pixels into
            # channels) may be a new source itself: the op then acts on its channels.
            relaid = [i for i, v in zip(s.inputs, ins) if v.source != i and _pure(v)]
            if isinstance(e, Relaid) and not relaid:  # moved further up: should the region stay, the moved
                # value every path to this op crosses starts a region next time (an adapter after a token
                # reshape, before a conv); not before, as the ops before it would stay (PVT's transposes)
                moved_up[s.name] = {m for m in _moved_values(s.inputs, by_name, state)
                                    if _graph.on_every_path(flow, ins[0].source, s.name, m)}
            for i in relaid:
                state[i] = source(i)
            state[s.name], why = None, str(e)
            if relaid:
                try:
                    with folding(s):
                        state[s.name] = (s.op.commute if s.name in commuting else s.op.transfer)(
                            [read(i) for i in s.inputs], ch)
                except NotAffine as again:
                    ch.axis, why = saved, str(again)
                    for i, v in zip(s.inputs, ins):  # as they were: later readers stay in the same region
                        if i in relaid:
                            state[i] = v
            if state[s.name] is None:
                state[s.name], ended[s.name] = source(s.name), why

    groups: dict[str, list[str]] = {}
    for s in steps:
        v = state[s.name]
        # (an op whose result nothing reads is no member: a region's fold would count on removing it, and the
        # frontend keeps it, as it keeps all it did not make unread: a head's branch a model computes, unused)
        if v is not None and v.source != s.name and consumers(s.name):
            groups.setdefault(v.source, []).append(s.name)

    recut: set[str] = set()  # token regions cut anew: planned next time, with the cuts
    for src, members in groups.items():  # token ids: the model's own layer after the lookups starts a region
        if src in ch.tokens:
            new = _token_cuts(src, members, by_name, consumers, flow) - cuts
            if new:
                more_cuts.update(new)
                recut.add(src)

    ctx = _Ctx(by_name, state, ch, consumers, shape, dtype, flow, hazard, written)
    folds: list[Fold] = []
    regions: list[Region] = []
    members_of: dict[str, str] = {}
    redirects: dict[str, str] = {}
    absorbers: set[str] = set()  # layers a fold of this plan rebuilds: one fold each
    folded_ops: set[str] = set()  # the ops of the regions this plan folds
    # convs whose kernel maps a fold of this plan sums, as parallel branches of one source: a LoRA's branch
    # beside a patch embedding's conv (lora_B·lora_A, summed into the base conv before the flatten). Started
    # again at each conv, as a conv whose map an op moving positions ends would be, the branches would be
    # sources apart and their sum no region (only the LoRA's scale folded, three convs ran): they stay
    summed: set[str] = set()
    kept_ops: set[str] = set()  # the ops of the adapter regions this plan reports kept
    removed: dict[str, str] = {}  # layers the folds of adapter regions remove (not their absorbers) -> source

    def is_adapter(members: list[str]) -> tuple[bool, list[str]]:
        heavy = sum(by_name[m].op.heavy for m in members)
        core = _without_trailing(members, by_name, consumers)
        exits = [e for e in _exits(core, consumers) if not _pure(state[e])]  # the source relaid: no exit of its own
        # a layer whose weight is computed from weights alone (HRA's W·H) is a region even alone: storing the
        # weight removes its computation; so is a layer only adapters have (OFT's rotation), to be reported
        evaluated = any(getattr(by_name[m].op, "evaluable", False) or getattr(by_name[m].op, "adapter_only", False)
                        for m in core)
        return heavy > len(_anchors(exits, core, by_name)) or evaluated, core

    def keep(region: Region, members: list[str], why: str) -> None:
        """The region stays as it is: reported when it is an adapter region (a scale region is the model's
        own). One that carries a conv's kernel map is planned again with the conv as the start of a region,
        as before kernel maps (a BatchNorm then folds into it on its own)."""
        origins = _kernel_origins(members, by_name, state, cuts) - more_commuting  # (a pool commutes first)
        at_conv, at_input = _restarts(origins, src, members, by_name, consumers, flow)
        more.update(at_conv)
        more_cuts.update(at_input)
        more.update(_commuted(members, by_name, state))  # a pool that commuted, and the region stays anyway:
        # it starts a region next time, as the origin of a kernel map would (its norm then folds on its own)
        more.update(v for m in members for c in consumers(m) for v in moved_up.get(c, ()))
        if not region.scale:
            series = _in_series(src, members, by_name, state, consumers, flow)
            more_cuts.update(series or _branch_points(src, members, by_name, consumers, flow))
            region.reason = why
            regions.append(region)
            kept_ops.update(members)

    kinds = {src: is_adapter(members) for src, members in groups.items()}
    # adapter regions first: a layer a scale region could also fold into goes to the adapter
    for src, members in sorted(groups.items(), key=lambda kv: not kinds[kv[0]][0]):
        adapter, core = kinds[src]
        if src in recut:
            continue
        if not adapter and not (scales and any(_scales(m, by_name, state) for m in members)):
            continue  # nothing to remove: a plain layer (or the source only moved), not an adapter region
        region = Region(label(src), [by_name[m].label for m in members], folded=False, scale=not adapter)
        whole = set(members)
        if adapter:  # the cheap ops after the region stay as they are: the model's own
            members = core
        why_not = hazard(src)
        # an adapter whose sum with the identity beside it is not in the region (a region of its own starts
        # there): folding its layers into one another would leave one running that the model does not have
        apart = [c for m in members for c in consumers(m)
                 if c not in whole and c in by_name and src in by_name[c].inputs] if adapter else []
        if apart and why_not is None:
            keep(region, members, f"its sum with the identity beside it, {by_name[apart[0]].label}, "
                                  "is in a region of its own")
            continue
        outcome = None
        # a cut source is, to this region, the value its readers see (its own state is its region's)
        seen = ctx.state = {**state, src: as_cut[src]} if src in as_cut else state
        if why_not is None:
            with folding(region.source):
                outcome = _settle(src, members, ctx, adapter, scales)
        if why_not is not None:
            keep(region, members, f"{label(src)} {why_not}")
            continue
        if isinstance(outcome, Blocked):
            e, why, outside = outcome
            feeds = ", ".join(_blocker(c, label, ended, groups[src], fresh, e in cuts) for c in outside)
            keep(region, members, f"{by_name[e].label} feeds {feeds}; {why}")
            continue
        chosen, settled = outcome
        copied = [f.absorber for f in chosen if shared(f.absorber)] if not adapter else []
        if copied:  # the model's own scales into one call of a layer called elsewhere too: a copy of its weights
            keep(region, members, f"{by_name[copied[0]].label} shares its weights with another call")
            continue
        taken = [f.absorber for f in chosen if f.absorber in absorbers]
        if taken:  # a layer rebuilt for another region already (a scale region and an adapter on one conv)
            keep(region, members, f"{by_name[taken[0]].label} takes another region's fold already")
            continue
        # a shift of the model's own in the region (BatchNorm's): the new bias replaces it
        shifts = [m for m in settled if by_name[m].inputs[0] in seen and not by_name[m].op.heavy
                  and len(by_name[m].inputs) == 1 and np.any(seen[m].c) and not np.any(seen[by_name[m].inputs[0]].c)]
        new_bias = sum(len(f.b) for f in chosen
                       if f.b is not None and getattr(by_name[f.absorber].op, "b", False) is None)
        if not adapter and new_bias and not any(np.size(seen[m].c) > 1 for m in shifts):
            # the model's own scalar shift (CAFormer's StarReLU bias) into a bias-less layer: a bias of C
            # values for one number and one Add; the model stays as it is (a scale region: not reported)
            keep(region, members, "a bias-less layer would take a bias for a scalar shift")
            continue
        # what the rewrite removes: every op of the region but those that only move the source's values
        # (the model's own layout ops, dropout or contiguous, which may be read outside too), and a producer
        # fold's old layer
        old_layer = [src] if any(f.kind == "producer" for f in chosen) else []
        gone = [m for m in settled if not _pure(state[m])] + old_layer
        moved, why_not = _shape_redirects(src, settled + old_layer, chosen, ctx, shape_reads, position, label)
        if why_not is not None:
            keep(region, members, why_not)
            continue
        absorbers.update(f.absorber for f in chosen)
        region.folded = True
        regions.append(region)
        for f in chosen:
            f.region = region
            folds.append(f)
            region.into.append(by_name[f.absorber].label)
        region.new_bias = new_bias  # the biases bias-less layers took for the region's constant
        region.shift_replaced = bool(shifts)
        members_of.update({m: src for m in gone})
        redirects.update(moved)
        done = set(settled)
        folded_ops.update(done)
        origins = _kernel_origins(settled, by_name, state, cuts)
        if len(origins) > 1:
            summed.update(origins)
        if adapter:
            rebuilt = {f.absorber for f in chosen}
            removed.update({m: src for m in gone if by_name[m].op.heavy and m not in rebuilt})
        left = [m for m in members if m not in done]
        if any(by_name[m].op.heavy for m in left):  # layers the fold leaves running: a region of their own,
            # from the values they read, which stay this region's exits (FastViT's 1x1 block beside an
            # identity BatchNorm, after a large-kernel conv's summed branches)
            pools = _commuted(members, by_name, state)  # (as in ``keep``, they start regions next time: a NeXtViT
            # block whose norm1 follows its patch embedding's conv, which takes the region; its keys' pooled
            # norm then folds alone, into the layers after it, which no cut may part from it)
            after = set().union(*(_graph.descendants(flow, p) for p in pools))
            more_cuts.update(_entries(left, by_name) - after)
            more.update(pools)
            region.ops = [by_name[m].label for m in members if m in done]
    for h in blocked - summed:  # a conv whose kernel map an op moving positions ended: it starts a region next
        # time, unless it reads the region's source beside other ops of the region (iFormer's RepCPE,
        # ``x + BN(dwconv(x))`` before an attention's flatten): then the cut is where the branches join, so that
        # they sum into the conv
        src = state[h].source if state.get(h) is not None else h
        members = groups.get(src, []) if src != h else []
        beside = h in members and by_name[h].inputs[0] == src
        at_conv, at_input = _restarts({h}, src, members, by_name, consumers, flow) if beside else ({h}, set())
        more.update(at_conv)
        more_cuts.update(at_input)
    unseen = [by_name[n].label for n, why in ended.items() if why == _UNKNOWN and by_name[n].op.heavy]
    accounted = folded_ops | absorbers | kept_ops
    return Plan(folds, regions, members_of, redirects, unseen, removed, accounted), more, more_cuts, more_commuting


def _token_cuts(src: str, members: list[str], by_name, consumers, flow) -> set[str]:
    """In a region of token ids (one-hot vectors, see ``patterns.embedding``) that holds a stored layer other
    than a lookup on the way to every exit (the model's own layer after the lookups, which can take no
    token ids), the first value every path to the exits crosses: the lookups' sum (``T[ids] + s·A[ids]·B``),
    or the lookup's output. What reads it sees a source of its own, as before lookups were layers: the
    adapters between it and that layer (OFT's rotation, a LoHa branch beside a conv) fold into the layer, and
    the lookups' region ends there."""
    inside = set(members)
    region = flow.subgraph([src, *members])
    exits = _exits(members, consumers)
    on_all = set.intersection(*({e, *_graph.dominators(region, src, e)} for e in exits)) if exits else set()
    crossed = [v for v in members if v in on_all]  # in the graph's order

    def own_layer(c: str) -> bool:
        return c in inside and by_name[c].op.heavy and not any(
            getattr(by_name[c].op, k, False) for k in ("reads_ids", "computed", "adapter_only"))

    if not any(own_layer(c) for v in crossed for c in consumers(v)):
        return set()
    cut = crossed[0]
    for v in crossed[1:]:  # past identities the adapter's wrapper adds after the sum (PEFT's same-dtype cast):
        step = by_name[v]  # they go with the lookups' region, not into the layer's
        if not (getattr(step.op, "passes", False) and not getattr(step.op, "sticky", False)
                and step.inputs == (cut,) and consumers(cut) == [v]):
            break
        cut = v
    return {cut}


def _kernel_origins(names, by_name, state, cuts=frozenset()) -> set[str]:
    """The convs whose kernel maps reach ``names`` (steps whose state is a kernel map made from no other),
    not through a cut (whose readers see it as a source)."""
    found, seen, todo = set(), set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen or n not in by_name or n in cuts or not _kernel_map(state, n):
            continue
        seen.add(n)
        carried = [i for i in by_name[n].inputs if _kernel_map(state, i) and i not in cuts]
        if carried:
            todo.extend(carried)
        else:
            found.add(n)
    return found


def _restarts(convs: set[str], src: str, members: list[str], by_name, consumers, flow) -> tuple[set[str], set[str]]:
    """Where regions start next time for the convs whose kernel maps could not fold: ``(convs that start one
    themselves, values to cut)``: the value a conv reads where other ops of the region read it too (parallel
    branches, RepGhost's depthwise conv beside a BatchNorm of its input after a conv of their own: the
    branches sum as a region of their own). A cut, so that what computes the value stays in its region (an
    adapter's sum with its identity, before a block, stays the adapter's). Where that value is the region's
    source, the cut is where the branches have joined (EfficientViM's ``x + γ·(BN(dwconv(x)) - x)`` before an
    adapter): the block is then a region of the model's own, and the adapter's starts at its sum."""
    inside, region = set(members), flow.subgraph([src, *members])
    at_conv, at_input = set(), set()
    join = None
    for h in convs:
        u = by_name[h].inputs[0]
        if u in inside and sum(c in inside for c in consumers(u)) > 1:
            at_input.add(u)
            continue
        if u == src and sum(c in inside for c in consumers(u)) > 1:
            join = join or _rejoin(src, region, members, consumers)
            if join is not None and join in _graph.descendants(region, h):
                at_input.add(join)
                continue
        at_conv.add(h)
    return at_conv, at_input


def _rejoin(src: str, region, members: list[str], consumers) -> str | None:
    """The nearest value every path from ``src`` to the region's exits crosses (its immediate
    post-dominator in the region's dataflow graph ``region``), or None."""
    sink = object()
    g = region.reverse(copy=True)
    g.add_edges_from((sink, e) for e in _exits(members, consumers))
    after = _graph.dominators(g, sink, src)
    return after[-1] if len(after) > 1 else None


def _in_series(src: str, members: list[str], by_name, state, consumers, flow) -> set[str]:
    """Where to cut a region that chains layers in series, each on every path from the source to every exit
    (each exit read by ops no rule knows, an activation): after each of them but the last. A region that composes the model's own layers (EfficientNet's
    projection, without an activation, into the next block's 1x1 conv, perhaps an adapter between) can fold
    into no one layer; cut, each layer starts a region of its own, where the adapter and BatchNorms beside
    it fold."""
    g = flow.subgraph([src, *members])
    shared = None
    for e in _exits(members, consumers):
        if _pure(state[e]):
            continue
        if any(c in by_name for c in consumers(e)):  # an op that could go on with the region reads the exit: the
            return set()  # region was cut short there, perhaps a branch beside its layer (a LoRA's pair)
        on = {d for d in [*_graph.dominators(g, src, e), e] if d in by_name and by_name[d].op.heavy}
        shared = on if shared is None else shared & on
    chain = [m for m in members if m in (shared or ())]  # members are in topological order
    return set(chain[:-1])


def _branch_points(src: str, members: list[str], by_name, consumers, flow) -> set[str]:
    """Where to cut a kept region at a fan-out past a layer: for each sum of the region with a layer on one
    of its branches (an adapter's sum with its identity, a LoRA's with its base layer), the nearest value
    every path from the source to the sum crosses, where a layer lies on every path from the source to that
    value and something besides the sum's branches reads it. The region grew through the model's own layers
    and on past the value the adapter reads (MobileNet-V3's block output, read by the next block and by an
    adapter before an FPN's 1x1 conv); as a whole it folds into no one layer. Cut there, the layers before
    it are a region of their own (a BatchNorm folds into its conv), and the adapter's region starts at the
    value it reads, beside the next block's."""
    g = flow.subgraph([src, *members])
    heavy = lambda m: int(by_name[m].op.heavy)
    found = set()
    for j in members:
        if len({i for i in by_name[j].inputs if i in g}) < 2:
            continue
        doms = _graph.dominators(g, src, j)
        d = doms[-1] if doms else src
        if d == src or d in found or _graph.most(g, d, j, heavy) == 0 or _graph.fewest(g, src, d, heavy) == 0:
            continue
        branches = _graph.ancestors(g, j) | {j}
        if any(c not in branches for c in consumers(d)):  # a fan-out: the adapter is not all that reads it
            found.add(d)
    return found


def _anchors(exits: list[str], members: list[str], by_name) -> set[str]:
    """The values ``exits`` come from through cheap ops of one input each: exits that are one value
    seen through different ops (an adapter's sum read by a BatchNorm and by a Pad, as ONNX spells a
    reflect-padded conv) need one absorber's worth of layers, not one each."""
    inside, found = set(members), set()
    for e in exits:
        while not by_name[e].op.heavy and len(by_name[e].inputs) == 1 and by_name[e].inputs[0] in inside:
            e = by_name[e].inputs[0]
        found.add(e)
    return found


def _moved_values(names, by_name, state) -> set[str]:
    """The nearest values upstream of ``names``, in their region, that only move the region's source (a
    token reshape before an adapter): where a region could start with its source laid out as they are."""
    found, seen, todo = set(), set(), list(names)
    while todo:
        n = todo.pop()
        v = state.get(n)
        if n in seen or n not in by_name or v is None or v.source == n:
            continue
        seen.add(n)
        if _pure(v):
            found.add(n)
        else:
            todo.extend(i for i in by_name[n].inputs if state.get(i) is not None and state[i].source == v.source)
    return found


def _commuted(names, by_name, state) -> set[str]:
    """The ops among ``names`` that a region carried by their ``commute`` rule (an average pool replayed on
    the source, not a kernel map)."""
    return {n for n in names if hasattr(by_name[n].op, "commute") and not _kernel_map(state, n)}


def _kernel_map(state, name: str) -> bool:
    """Whether the value ``name`` is a conv's kernel map of its source."""
    v = state.get(name)
    return v is not None and isinstance(v.M, Kernel)


def _entries(left: list[str], by_name) -> set[str]:
    """The values the first layers of ``left`` read (layers no other layer of ``left`` feeds): where a
    region of those layers starts."""
    inside = set(left)
    behind: dict[str, bool] = {}  # op -> whether a layer of ``left`` is upstream of it (or is it)

    def layered(m: str) -> bool:
        if m not in behind:
            behind[m] = by_name[m].op.heavy or any(layered(i) for i in by_name[m].inputs if i in inside)
        return behind[m]

    return {i for m in left if by_name[m].op.heavy
            for i in by_name[m].inputs if not (i in inside and layered(i))}


def _shape_redirects(src, removed, chosen: list[Fold], ctx: _Ctx, shape_reads, position, label):
    """For each value of ``removed`` whose shape is read, a value of the same shape and dtype that stays.

    Preferred, in order: the value itself where it is a fold's target (its
    replacement stays) or a layout step the fold copies; then another target
    or copied step; then the source, if it holds the same positions. A
    replacement must come before every read it takes over (a copied step sits
    right after its original, a rebuilt layer right before the layer it
    replaces, a rebuilt reader right before itself).
    Returns ``(redirects, None)``, or ``({}, reason)`` when a read would keep
    the region running.
    """
    kept_src = not any(f.kind == "producer" for f in chosen)
    targets = [f.target for f in chosen]
    copied = [name for f in chosen for name, _, _ in f.via]  # (transposes merged into one: still its layout)
    # where each replacement is defined: a layer rebuilt in place of one of the region's own (before it), a
    # reader rebuilt before itself, a producer rebuilt after itself, a copied step right after its original
    at = {name: position(name) for name in copied}
    for f in chosen:
        if f.kind == "producer":  # the rebuilt layer right after the old one, or the last copy laid out after it
            at[f.target] = position(f.absorber if f.start == SOURCE else f.start) + 0.5
        else:
            at[f.target] = position(f.absorber if f.kind == "into" else f.target) - 0.5
    redirects = {}
    for m in removed:
        readers = shape_reads(m)
        if not readers:
            continue
        sh, dt, first = ctx.shape(m), ctx.dtype(m), min(r[1] for r in readers)
        rank_only = all(len(r) > 2 and r[2] for r in readers)
        own = [m] if m in targets or m in copied else []
        found = next((c for c in own + targets + copied
                      if ctx.shape(c) == sh and ctx.dtype(c) == dt and sh is not None and at[c] < first), None)
        if found is None and kept_src and sh is not None and ctx.shape(src) == sh and ctx.dtype(src) == dt:
            v, s = ctx.state.get(m), ctx.state.get(src)
            if v is not None and s is not None and ctx.ch.same_layout(v, s):
                found = src
        if found is None and kept_src and rank_only and sh is not None and ctx.dtype(src) == dt \
                and len(ctx.shape(src) or ()) == len(sh):  # x.ndim, x.dtype: any value of that rank and dtype
            found = src
        if found is None:
            return {}, (f"the shape of {label(m)} is read by {', '.join(r[0] for r in readers)}, and no value of "
                        "that shape would stay before it after the fold: folding would leave the region running")
        redirects[m] = found
    return redirects, None


def check_gone(plan: Plan, still_there: Callable[[str], bool], label: Callable[[str], str]) -> None:
    """After the rewrite no op of a folded region may still run: ``still_there(name)`` asks the frontend."""
    for name, src in plan.members.items():
        if still_there(name):
            raise RepfoldError(f"{label(name)} of the region at {label(src)} still runs after its fold", region=label(src))


class Blocked(tuple):
    """Why a region cannot fold: ``(exit, reason, the exit's consumers outside the region)``."""

    def __new__(cls, exit: str, why: str, outside: list[str]) -> Blocked:  # noqa: PYI034 (a tuple subclass)
        return super().__new__(cls, (exit, why, outside))


@dataclass
class _Ctx:
    by_name: dict[str, Step]
    state: dict[str, Affine | None]
    ch: Channels
    consumers: Callable[[str], list[str]]
    shape: Callable[[str], tuple[int, ...] | None]
    dtype: Callable[[str], Any]
    flow: Any  # the steps' dataflow graph (networkx), edges from each input to its step
    hazard: Callable[[str], str | None] = lambda name: None
    written: frozenset[str] = frozenset()  # values written in place: their readers see another value
    inside: set[str] = field(default_factory=set)  # the ops of the region being settled
    # the region as first found, before _settle cut any of it off: its dataflow graph and its exits
    whole: Any = None
    whole_exits: set[str] = field(default_factory=set)
    adapter: bool = True  # the region being settled is an adapter's (else only the model's own ops)


def _dataflow(steps: Sequence[Step]):
    return _graph.digraph(((i, s.name) for s in steps for i in s.inputs), (s.name for s in steps))

def _without_trailing(members: list[str], by_name, consumers) -> list[str]:
    """``members`` less the cheap ops that only lead out of the region (GELU's ``x / sqrt(2)`` after an
    adapter, as the TorchScript exporter spells it): they would count as exits of their own."""
    inside, trailing = set(members), set()
    for m in reversed(members):  # members are in topological order
        if by_name[m].op.heavy or not all(c in trailing for c in consumers(m) if c in inside):
            continue
        # it hangs off values that leave the region anyway (not the region's last step to its exit)
        if all(any(c not in inside for c in consumers(i)) for i in by_name[m].inputs if i in inside):
            trailing.add(m)
    return [m for m in members if m not in trailing]


def _exits(members: list[str], consumers) -> list[str]:
    inside = set(members)
    return [m for m in members if any(c not in inside for c in consumers(m))]


def _settle(src, members, ctx: _Ctx, adapter: bool, scales: bool):
    """Give every exit an absorber, pulling cheap ops that can't be absorbed out of the region.

    An exit that is an elementwise or layout op (GELU's ``x / sqrt(2)`` after
    the absorbing Linear, say) stays in the graph as it was: its inputs become
    the exits instead, and so does everything of the region downstream of it.
    Returns ``(folds, the ops they remove)``, or the first failure as ``(exit,
    reason, its consumers outside)`` when a heavy layer would have to be kept
    or nothing would be removed.
    """
    by_name, state = ctx.by_name, ctx.state
    folded, first = list(members), None
    # The fewest layers a path from the source to each exit passes through: the region's own
    # (the model's) layers, which an adapter beside an identity adds nothing to. A fold that
    # keeps more layers than that would leave some of the adapter's behind.
    whole = ctx.whole = _region_graph(src, members, ctx)
    ctx.adapter = adapter
    ctx.whole_exits = set(_exits(members, ctx.consumers))
    allowed = sum(_fewest_layers(whole, src, e, ctx) for e in ctx.whole_exits)
    while True:
        exits = [e for e in _exits(folded, ctx.consumers) if not _pure(state[e])]
        ctx.inside = set(folded)
        ctx.ch.shift_adds = not adapter  # (the planner keeps it unless the bias replaces a shift of its own)
        try:
            chosen, why = _assign(src, exits, folded, ctx)
        finally:
            ctx.ch.shift_adds = False
        if why is None:
            into = sum(f.kind == "into" for f in chosen)
            # (a layout step copied for several folds on one base is copied once: see _driver.rewrite)
            kept = into + len({(f.kind == "producer" and id(f), name) for f in chosen for name, _, _ in f.via})
            heavy = sum(by_name[m].op.heavy for m in folded)
            if into > allowed and not all(f.absorber in _parallel(whole, src, f.exit, ctx)
                                          for f in chosen if f.kind == "into"):
                why = (exits or folded)[0], f"folding it would leave {into} layers where the model has {allowed}"
            elif (heavy > into or (scales and chosen and len(folded) > kept
                                   and any(_scales(m, by_name, state) for m in folded))
                  or any(getattr(by_name[m].op, "evaluable", False) for m in folded)):  # its computation goes
                if adapter and len(folded) < len(members) and _splits(src, folded, ctx):
                    return first or Blocked(folded[-1], "folding part of it would leave an adapter layer running "
                                            "apart from the sum with its identity", [])
                return chosen, folded
            else:
                why = (exits or folded)[0], "folding it would remove no layer"
        e = why[0]
        first = first or Blocked(*why, [c for c in ctx.consumers(e) if c not in set(folded)])
        region = _region_graph(src, folded, ctx)
        if by_name[e].op.heavy and not _may_leave(e, ctx) and adapter:
            # a layer that must not be left behind: cut the region after the last layer every path to e
            # crosses (the model's own: EfficientNet-V2's projection with a second adapter behind it), so
            # that what follows it is planned again as a region of its own
            main = [h for h in folded if by_name[h].op.heavy and h != e and _graph.on_every_path(region, src, e, h)]
            if not main:
                return first
            doomed = _graph.descendants(region, main[-1])
        elif not adapter and not scales:
            return first
        # (in a region of the model's own scales, a layer at the exit is the model's own: it leaves the region
        # and reads what the rest folds into, as LeViT's next LinearNorm reads the BatchNorm before it; the
        # planner starts a region of its own at what it reads)
        else:
            doomed = {e} | _graph.descendants(region, e)  # e and what it feeds in the region
        folded = [m for m in folded if m not in doomed]
        if not folded:
            return first


def _may_leave(e: str, ctx: _Ctx) -> bool:
    """Whether layer ``e`` at a region's failing exit may leave the region, the rest folding without it: a
    conv (it may take the region as its input instead), a layer reading a conv's kernel map (the 1x1 after
    a depthwise conv) or a layer after an embedding's lookup (none but a lookup takes token ids), the
    model's own layers, which then stay as they are. Any other layer at the exit blocks the region: it may
    be an adapter's, which a fold must not leave behind."""
    step = ctx.by_name[e]
    v = ctx.state.get(e)
    if v is not None and v.source in ctx.ch.tokens and not getattr(step.op, "reads_ids", False):
        return True  # a layer after an embedding's lookup can't take token ids: the model's, it stays as it is
    return hasattr(step.op, "absorb_input") or any(_kernel_map(ctx.state, i) for i in step.inputs)


def _blocker(consumer: str, label: Callable[[str], str], ended: dict[str, str], found: list[str],
             fresh: set[str], cut: bool = False) -> str:
    if consumer == OUTPUT:
        return "the graph output"
    if cut:  # the value it reads is cut: the reader is in a region that starts there (a block's branch)
        why = "in a region of its own that starts there"
    elif consumer in ended:
        why = ended[consumer]
    elif consumer in found:  # a cheap op of the region as found that only leads out of it (an identity
        why = "it only leads out of the region"  # branch's BatchNorm into a sum that ended the region)
    elif consumer in fresh:  # a conv whose kernel map could not fold with this region, planned again
        why = "it starts a region of its own"
    else:
        why = "not a channel-affine op"
    return f"{label(consumer)} ({why})"


def _assign(src, todo, folded, ctx: _Ctx):
    """One absorber per exit (a region layer, the exit's readers, or the source's producer)."""
    by_name, state = ctx.by_name, ctx.state
    heavy = [m for m in folded if by_name[m].op.heavy]
    region = _region_graph(src, folded, ctx)
    used: set[str] = set()
    chosen: list[Fold] = []
    for e in todo:
        up = _graph.ancestors(region, e) | {e}
        order = [h for h in reversed(heavy) if h in up]  # the exit's own layers, nearest first
        reasons: list[tuple[str, str]] = []

        def into(layers, e, reasons, first=False):
            """The first of ``layers`` that takes exit ``e``; the others' reasons are noted (``first``: ahead)."""
            why, fold = [], None
            for h in layers:
                step = by_name[h]
                if h in used or step.emit is None:
                    continue
                try:
                    fold = _into(src, e, h, ctx)
                    break
                except NotAffine as err:
                    why.append((h, f"{step.label}: {err}"))
            if first:
                reasons[:0] = why
            else:
                reasons.extend(why)
            return fold

        def around(e, reasons):
            fold = _sinks(src, e, folded, ctx, reasons)
            return fold if fold is not None or len(todo) > 1 else _producer(src, e, folded, ctx, reasons)

        # A layer every path from the source to the exit goes through is the model's own (an adapter is a
        # branch beside an identity): only such a layer may take the region. Without one (an adapter alone,
        # or after a layer outside the region), the layers next to the region come first, so that no
        # adapter layer stays behind in the model.
        #   What e flows into in the region as first found counts too: a part cut off from an adapter's
        # sum with its identity (the join left out) is still beside that identity, not the model's own.
        joins = _joins(e, ctx)
        main = [h for h in order if _graph.on_every_path(region, src, e, h)
                and all(_graph.on_every_path(ctx.whole, src, j, h) for j in joins)]
        if main:
            fold = into(main, e, reasons) or around(e, reasons)
            if fold is None:  # a layer that cannot take a block's kernel map, right after the block's sum (no
                # activation between): the block and the layer go into one of the block's branch convs, as a
                # conv and the layer after it do into the conv. Not into a layer beside an identity (an
                # adapter's), unless it is one of parallel branches
                before = by_name[main[-1]].inputs[0]
                if before in region:
                    ups = set(order) if _fewest_layers(region, src, before, ctx) else _parallel(region, src, before, ctx)
                    fold = into([h for h in order if h in ups and h not in main], e, reasons)
        elif min(_fewest_layers(g, src, x, ctx) for g, x in [(region, e), *((ctx.whole, j) for j in joins)]) == 0:
            # an identity path: no layer here is the model's, unless it is one of parallel branches
            fold = around(e, reasons)
            branches = _parallel(region, src, e, ctx)
            if fold is None and branches:  # RepVGG: branches of one layer each, summed
                fold = into([h for h in order if h in branches], e, reasons)
        else:  # a LoRA-style branch beside a layer: the nearest layer of the right shape whose weight is stored
            stored_first = sorted(order, key=lambda h: bool(getattr(by_name[h].op, "computed", False)))
            fold = around(e, reasons) or into(stored_first, e, reasons, first=True)
        if fold is None:
            return chosen, (e, "no layer can absorb it: " + _why_none(state[e], order, by_name, reasons))
        if isinstance(fold, list):
            chosen.extend(fold)
            used.update(f.absorber for f in fold)
        else:
            chosen.append(fold)
            used.add(fold.absorber)
    return chosen, None


def _region_graph(src: str, members: list[str], ctx: _Ctx):
    """The dataflow among the region's members and its source."""
    return ctx.flow.subgraph([src, *members])


def _splits(src: str, folded: list[str], ctx: _Ctx) -> bool:
    """Whether the part ``folded`` of a region cut short holds a layer whose sum with what goes beside it
    (an adapter's identity) was cut off: the fold would leave that sum, and the rest of the adapter,
    running (EfficientFormer-V2's downsampling attention, whose adapter "folded" into its own
    down-projection)."""
    g, inside = ctx.whole, set(folded)
    for h in folded:
        if not ctx.by_name[h].op.heavy:
            continue
        beside = _graph.descendants(g, h) - _graph.dominated(g, src, h)
        merges = {n for n in beside if not any(i in beside for i in ctx.by_name[n].inputs)}
        if merges - inside:
            return True
    return False


def _joins(e: str, ctx: _Ctx) -> set[str]:
    """The exits of the region as first found that ``e`` is, or flows into."""
    return ({e} | _graph.descendants(ctx.whole, e)) & ctx.whole_exits


def _parallel(region, src: str, e: str, ctx: _Ctx) -> set[str]:
    """The layers of parallel branches summed at ``e``, which the sum may go into (empty: none).

    Parallel branches (RepVGG's train-time block: a 3x3, a 1x1 and an identity, each with a BatchNorm;
    DBB's 1x1 then 3x3 beside them) read a value ``d`` every path to ``e`` crosses, which some path from
    the source reaches through no layer (``d`` is the source, or an adapter's sum with its identity before
    the block). Paths from ``d`` that cross one layer only mark the block's own layers: two of them, or
    one where no path from ``d`` skips every layer, or one beside another branch of layers (DBB's 1x1
    then kxk, beside a 1x1 and an identity). Such a sum may go into one of the layers after ``d``
    even where a path crosses none, as nothing else can take it: the fold leaves one layer where the model
    has one at least. An adapter beside an identity (two layers in a row, or one alone) has no such
    paths, and may not go into one of its own layers (the model has none there). In a region of the
    model's own ops (no adapter: its layers are no more than its exits) one layer beside an identity is
    such a block too (RepGhost's depthwise conv beside a BatchNorm of its input, ``x + conv(x)``): the
    sum goes into the layer, which stays one layer."""
    heavy = lambda m: int(ctx.by_name[m].op.heavy)
    for k, d in enumerate(reversed(_graph.dominators(region, src, e))):  # the nearest the sum first: no
        if _graph.fewest(region, src, d, heavy) > 0:  # adapter layer before it
            continue
        after = {h for h in _graph.descendants(region, d) if heavy(h) and (h == e or e in _graph.descendants(region, h))}
        firsts = [h for h in after if _graph.fewest(region, d, h, heavy) == 1]  # where the branches start
        alone = [h for h in firsts if _graph.fewest(region, h, e, heavy) == 0]
        # (branches counted from the value nearest the sum only: from one further up, an adapter beside an
        # identity before the block would count as one of them)
        if len(alone) >= 2 or (alone and (_graph.fewest(region, d, e, heavy) > 0 or not ctx.adapter
                                          or (k == 0 and len(firsts) >= 2))):
            return after
    return set()


def _fewest_layers(region, src: str, e: str, ctx: _Ctx) -> int:
    """The fewest heavy layers on a path from ``src`` to ``e`` through the region (its dataflow graph)."""
    return _graph.fewest(region, src, e, lambda m: int(ctx.by_name[m].op.heavy))


def _into(src, e, h, ctx: _Ctx) -> Fold:
    """Exit ``e`` taken by heavy layer ``h`` of the region, rebuilt to read the source."""
    step, state, ch = ctx.by_name[h], ctx.state, ctx.ch
    _reads_ids(src, step, ctx)
    u = step.inputs[0]
    if not ch.same_layout(state[u], state[e]):
        raise NotAffine("the region moves positions after the layer")
    W, b = step.op.absorb(state[e], ch)
    via, start = _replay(src, u, ctx)
    _same_value_type(src, start, u, ctx)
    return Fold("into", e, e, src, h, W, b, via, start)


def _sinks(src, e, folded, ctx: _Ctx, reasons) -> list[Fold] | None:
    """Exit ``e`` taken by every op that reads it, each rebuilt to read the source (not where ``e`` is written
    in place: they read what the write made of it)."""
    if e in ctx.written:
        return None
    outside = [c for c in ctx.consumers(e) if c not in set(folded)]
    folds = []
    for c in outside:
        step = ctx.by_name.get(c)
        absorb = getattr(step.op, "absorb_input", None) if step is not None else None
        if absorb is None or step.emit is None:
            return None
        try:
            _reads_ids(src, step, ctx)
            W, b = absorb(ctx.state[e], ctx.ch, [k for k, i in enumerate(step.inputs) if i == e])
            via, start = _replay(src, e, ctx)
            _same_value_type(src, start, e, ctx)
        except NotAffine as err:
            reasons.append((c, f"{step.label}: {err}"))
            return None
        folds.append(Fold("sink", e, c, src, c, W, b, via, start))
    return folds or None


def _producer(src, e, folded, ctx: _Ctx, reasons) -> Fold | None:
    """Exit ``e`` taken by the layer that produced the source, if the region is all the source feeds."""
    step = ctx.by_name.get(src)
    absorb = getattr(step.op, "absorb_output", None) if step is not None else None
    if absorb is None or step.emit is None:
        return None
    if any(c not in set(folded) for c in ctx.consumers(src)) or _exits(folded, ctx.consumers) != [e]:
        reasons.append((src, f"{step.label} also feeds ops outside the region"))
        return None
    try:
        _reads_ids(src, step, ctx)
        W, b = absorb(ctx.state[e], ctx.ch)
        via, start = _replay(src, e, ctx)
        _same_value_type(src, start, e, ctx)
    except NotAffine as err:
        reasons.append((src, f"{step.label}: {err}"))
        return None
    return Fold("producer", e, e, src, src, W, b, via, start)


def _reads_ids(src: str, step: Step, ctx: _Ctx) -> None:
    """A region whose source is token ids (one-hot vectors the graph never holds) goes into a lookup of them
    only: any other layer would read the ids as values."""
    if src in ctx.ch.tokens and not getattr(step.op, "reads_ids", False):
        raise NotAffine("the region's source is token ids read by an embedding: only an embedding's table "
                        "can take it")


def _same_value_type(src: str, start: str, want: str, ctx: _Ctx) -> None:
    """A rewrite puts the replayed value ``start`` where ``want`` was read: it must have its shape and dtype.

    (The source's replacement, a rebuilt producer, has the source's own.)
    """
    got = src if start == SOURCE else start
    if ctx.shape(got) != ctx.shape(want) or ctx.dtype(got) != ctx.dtype(want):
        def kind(v):
            sh = ctx.shape(v)
            return ("x".join(map(str, sh)) if sh is not None else "unknown shape") + f" {ctx.dtype(v) or ''}".rstrip()
        raise NotAffine(f"the fold would read a value of {kind(got)} where the layer read {kind(want)}")


def _replay(src: str, target: str, ctx: _Ctx) -> tuple[list, str]:
    """The layout ops that lay the source out like ``target``, skipping detours that cancel out.

    Walks back from ``target`` to the source along first inputs and picks the
    earliest value on that path with the same layout; its producer is then a
    layout op, copied with its own inputs laid out the same way (recursively).
    So a Swin window partition before an adapter is kept, and the transposes
    around a channels-first adapter, which cancel, are not. A layout op of the
    model's own that stays anyway (read outside the region too: Swin-V2's
    window partition before a post-norm block) is read where it is, not
    copied: an input of a copied step or ``start`` may name such a value.
    """
    by_name, state, ch = ctx.by_name, ctx.state, ctx.ch
    width = _width(state, ch, src)
    via: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = []
    done: dict[str, str] = {}

    def build(v: str) -> str:
        if v == src:
            return SOURCE
        pure = _pure(state[v])
        sticky = v in by_name and getattr(by_name[v].op, "sticky", False)
        if not pure and not sticky and state[v].pos is None:
            return SOURCE
        w = v
        if not pure and not sticky:  # after the adapter: the earliest value laid out the same way
            path = [v]
            while path[-1] != src and path[-1] in by_name:
                path.append(by_name[path[-1]].inputs[0])
            if path[-1] != src:
                raise NotAffine("the region's layout does not come from its source")
            k = next(i for i in range(len(path) - 1, -1, -1) if path[i] != src and ch.same_layout(state[path[i]], state[v]))
            while k > 0 and getattr(by_name[path[k - 1]].op, "passes", False):
                k -= 1  # keep a contiguous() right after it: the next view may need it
            w = path[k]
        if w in done:
            return done[w]
        if _pure(state[w]) and ctx.hazard(w) is None and _stays(w, ctx):
            done[w] = w  # the model's own layout op, read outside the region too: it stays, read it
            return w
        step = by_name[w]
        if not getattr(step.op, "layout", False) and not hasattr(step.op, "commute"):  # (an op that mixes
            # positions alike on every channel, an average pool, is on this path only as its ``commute`` made it)
            raise NotAffine(f"{step.label} moves positions in a way a fold cannot replay")
        for i in step.inputs:
            if _width(state, ch, i) not in (None, width):
                raise NotAffine(f"{step.label} moves a value of another width than the source")
        ins = tuple(build(i) for i in step.inputs)
        perm = getattr(step.op, "perm", None)
        entry = (w, ins, None)
        if perm is not None:  # merge transposes in a row into one (or none); a lone one is copied as it is
            r = len(state[w].shape)
            perm = tuple(p % r for p in perm)
            prev = next((x for x in via if x[0] == ins[0]), None)
            if prev is not None and (prev[2] is not None or getattr(by_name[prev[0]].op, "perm", None) is not None):
                inner = prev[2] or tuple(p % r for p in by_name[prev[0]].op.perm)
                perm = tuple(inner[q] for q in perm)
                ins = prev[1]
                entry = (w, ins, perm)
            if perm == tuple(range(r)):
                done[w] = ins[0]
                return ins[0]
            undone = _undoes_source(src, perm, ctx) if ins[0] == SOURCE else None
            if undone is not None:  # the source is a transpose this one undoes (LeViT's channels-first adapter)
                done[w] = undone
                return undone
        via.append(entry)
        done[w] = w
        return w

    start = build(target)
    return via, start


def _undoes_source(src: str, perm: tuple[int, ...], ctx: _Ctx) -> str | None:
    """The value the source permutes, where ``perm`` on the source gives it back (the two transposes
    cancel), and it can be read as it is; else None."""
    step = ctx.by_name.get(src)
    own = getattr(step.op, "perm", None) if step is not None else None
    if own is None or len(step.inputs) != 1 or ctx.hazard(step.inputs[0]) is not None:
        return None
    r = len(perm)
    own = tuple(p % r for p in own)
    return step.inputs[0] if tuple(own[q] for q in perm) == tuple(range(r)) else None


def _stays(w: str, ctx: _Ctx, seen: set[str] | None = None) -> bool:
    """Whether the model's own layout op ``w`` of the region stays after the fold: something outside the
    region reads it, or reads a layout op or pass-through of the region that reads it (MaxViT's
    ``proj = nn.Identity()`` before its residual sum)."""
    seen = set() if seen is None else seen
    seen.add(w)
    for c in ctx.consumers(w):
        if c not in ctx.inside:
            return True
        v = ctx.state.get(c)
        if c not in seen and v is not None and _pure(v) and _stays(c, ctx, seen):
            return True
    return False


def _scales(m: str, by_name, state) -> bool:
    """Step ``m`` is no layer and changes the map it reads (a scale, a shift, a sum), not only its layout."""
    step = by_name[m]
    if step.op.heavy or not step.inputs:
        return False
    v, u = state[m], state.get(step.inputs[0])
    return u is None or v.M is not u.M or v.c is not u.c or len(step.inputs) > 1 and not _pure(v)


def _pure(v: Affine) -> bool:
    """``v`` holds the source's own values, only moved: what the model's own layout ops make."""
    return isinstance(v.M, float) and v.M == 1.0 and isinstance(v.c, float) and v.c == 0.0


def _width(state, ch: Channels, name: str) -> int | None:
    v = state[name]
    if v is None or v.source not in ch.axis:
        return None
    if v.source in ch.tokens and v.rank < len(ch.shapes[v.source]):  # token ids: one-hot vectors the graph
        return ch.tokens[v.source]  # never holds
    return v.shape[ch.channel_form(v).cax]


def _why_none(v: Affine, order, by_name, reasons) -> str:
    """The most telling reason no layer absorbed ``v``: a missing shape beats the rest."""
    if not isinstance(v.M, float):
        shape = v.M.shape
        if not any(_weight_shape(by_name[h].op) == shape for h in order) and not reasons:
            return f"it is a {shape[0]}x{shape[1]} map and no layer of the region has that shape"
        for h, r in reasons:
            if _weight_shape(by_name[h].op) == shape:
                return r
    return reasons[-1][1] if reasons else "no layer of the region is left to absorb it"


def _lone_layers(steps: Sequence[Step]) -> set[str]:
    """Single-input steps whose group of connected steps holds at most one heavy layer.

    A region is connected through its steps' inputs (the first input of a
    many-input step suffices: every input of a region step comes from the
    region's source), so it lies inside one such group; and an adapter
    region needs more heavy layers than exits, so at least two. Skipping the
    arithmetic of the other groups (most of a backbone's own layers) keeps
    their weights unconverted and their maps uncomputed. Many-input steps
    are always evaluated: they fail at once on values from different groups,
    which names the right reason when they block a region.
    """
    heavy = {st.name for st in steps if st.op.heavy}
    flow = _graph.digraph(((st.inputs[0], st.name) for st in steps if st.inputs), (st.name for st in steps))
    heavy_in: dict[str, int] = {}
    for group in _graph.components(flow):
        n = sum(1 for m in group if m in heavy)
        heavy_in.update(dict.fromkeys(group, n))
    return {st.name for st in steps if len(st.inputs) == 1 and heavy_in[st.name] <= 1}


def _weight_shape(op) -> tuple[int, ...] | None:
    w = getattr(op, "weight", None)
    return None if w is None else tuple(w.shape)
