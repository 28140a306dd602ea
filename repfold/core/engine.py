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
(see :func:`repfold.core.replay._replay`). The frontend then rebuilds each absorber with the new
weights and deletes the region's other ops.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from repfold.core import graph as _graph
from repfold.core.absorbers import _blocker, _settle
from repfold.core.affine import Affine, Channels, KernelBlocked, NotAffine, Relaid
from repfold.core.regions import (
    _anchors,
    _branch_points,
    _commuted,
    _dataflow,
    _entries,
    _exits,
    _in_series,
    _kernel_origins,
    _lone_layers,
    _moved_values,
    _pure,
    _restarts,
    _scales,
    _token_cuts,
    _without_trailing,
)
from repfold.core.replay import _shape_redirects
from repfold.core.steps import _UNKNOWN, _UNSETTLED, Blocked, Fold, Plan, RepfoldError, Step, _Ctx, folding
from repfold.report import Region


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
    one = _Pass(steps, consumers, shape, label, scales, dtype, shape_reads, position, hazard, fresh, cuts,
                written, shared, commuting)
    one.propagate()
    groups = one.regions_by_source()
    recut = one.cut_token_regions(groups)
    one.settle_all(groups, recut)
    one.restart_blocked_convs(groups)
    return one.plan(), one.more, one.more_cuts, one.more_commuting


class _Pass:
    """The state of one planning pass, in the order :func:`_plan_once` runs its steps:

    1. :meth:`propagate`: each op's output as an affine map of a source (:class:`Affine`), through the
       rules' ``transfer``; where an op cannot carry its input's map, its output starts a region;
    2. :meth:`regions_by_source`: the ops of each region, by source;
    3. :meth:`cut_token_regions`: token-id regions cut where the model's own layer follows the lookups;
    4. :meth:`settle_all`: for each region, adapter regions first, :meth:`settle` checks what may stop it
       (a hazard on its source, an identity summed apart), chooses its absorbers (``_settle``), checks that
       the fold leaves nothing live that it removes (shared weights, a layer already taken, shape reads) and
       records the fold (:meth:`record`), or keeps the region with its reason (:meth:`keep`);
    5. :meth:`restart_blocked_convs`: convs whose kernel maps an op moving positions ended start regions of
       their own next time.

    What the next pass does differently is collected in ``more`` (values to be sources), ``more_cuts`` and
    ``more_commuting``.
    """

    def __init__(self, steps, consumers, shape, label, scales, dtype, shape_reads, position, hazard, fresh, cuts,
                 written, shared, commuting) -> None:
        self.steps, self.consumers, self.shape, self.label, self.scales = steps, consumers, shape, label, scales
        self.dtype, self.shape_reads, self.position, self.hazard = dtype, shape_reads, position, hazard
        self.fresh, self.cuts, self.written, self.shared, self.commuting = fresh, cuts, written, shared, commuting
        self.by_name = {s.name: s for s in steps}
        self.ch = Channels()
        self.state: dict[str, Affine | None] = {}
        self.ended: dict[str, str] = {}  # step -> why its output starts a new region
        self.more: set[str] = set()  # values to be sources next time
        self.more_cuts: set[str] = set()
        self.blocked: set[str] = set()  # convs whose kernel maps an op moving positions ended
        self.more_commuting: set[str] = set()  # pools whose kernel maps an op moving positions ended: commute next
        self.as_cut: dict[str, Affine | None] = {}
        self.flow = _dataflow(steps)
        self.moved_up: dict[str, set[str]] = {}  # an op that needs its input laid out as the source -> moved values
        self.folds: list[Fold] = []
        self.regions: list[Region] = []
        self.members_of: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.absorbers: set[str] = set()  # layers a fold of this plan rebuilds: one fold each
        self.folded_ops: set[str] = set()  # the ops of the regions this plan folds
        # convs whose kernel maps a fold of this plan sums, as parallel branches of one source: a LoRA's branch
        # beside a patch embedding's conv (lora_B·lora_A, summed into the base conv before the flatten). Started
        # again at each conv, as a conv whose map an op moving positions ends would be, the branches would be
        # sources apart and their sum no region (only the LoRA's scale folded, three convs ran): they stay
        self.summed: set[str] = set()
        self.kept_ops: set[str] = set()  # the ops of the adapter regions this plan reports kept
        self.removed: dict[str, str] = {}  # layers the folds of adapter regions remove (not their absorbers) -> source
        self.ctx: _Ctx | None = None

    def source(self, name: str) -> Affine | None:
        sh = self.shape(name)
        return None if sh is None else self.ch.source(name, sh)

    def read(self, i: str) -> Affine | None:
        """Value ``i`` as the op reading it sees it."""
        if i in self.cuts:
            return self.as_cut[i] if i in self.as_cut else self.as_cut.setdefault(i, self.source(i))
        return self.state[i] if i in self.state else self.state.setdefault(i, self.source(i))

    def transfer(self, s: Step, ins: list[Affine]) -> Affine:
        with folding(s):
            return (s.op.commute if s.name in self.commuting else s.op.transfer)(ins, self.ch)

    # --- 1. each op's output as an affine map of a source ----------------------------------------------

    def propagate(self) -> None:
        """Each op's output state, in graph order: an affine map of its region's source, or a source itself."""
        lone = set() if self.scales else _lone_layers(self.steps)
        state, ch = self.state, self.ch
        for s in self.steps:
            if s.name in lone or s.name in self.fresh:  # no adapter region can reach it / the start of one of its own
                state[s.name] = self.source(s.name)
                continue
            ins = [self.read(i) for i in s.inputs]
            if any(v is None for v in ins):
                state[s.name], self.ended[s.name] = self.source(s.name), _UNKNOWN
                continue
            saved = dict(ch.axis)
            try:
                state[s.name] = self.transfer(s, ins)
                if self.shape(s.name) not in (None, state[s.name].shape):  # the graph's shapes are not settled:
                    raise NotAffine(_UNSETTLED)  # the algebra would follow sizes the value does not have
            except NotAffine as e:
                ch.axis = saved
                self.ended_at(s, ins, e, saved)

    def ended_at(self, s: Step, ins: list[Affine], e: NotAffine, saved: dict) -> None:
        """``s`` cannot carry the maps it reads (``e`` says why): what the next pass tries instead, and ``s``'s
        output as a source (or, where an input only moved its source's values, as a map of that input)."""
        by_name, state, ch, consumers = self.by_name, self.state, self.ch, self.consumers
        if isinstance(e, KernelBlocked):  # a conv's output moved: next time the conv starts a region instead
            # (unless it is one of parallel branches a fold of this pass sums: see ``summed``)
            for h in _kernel_origins(s.inputs, by_name, state, self.cuts):
                (self.more_commuting if hasattr(by_name[h].op, "commute") else self.blocked).add(h)
        elif hasattr(s.op, "absorb") and not isinstance(e, Relaid) and not _pure(ins[0]) \
                and len(consumers(s.inputs[0])) > 1:
            # a conv that cannot carry the map it reads, beside other branches of its input (RepGhost's
            # depthwise conv and BatchNorm after a 1x1 conv, FastViT's after a large-kernel conv): next
            # time the branches start there, to sum as a region of their own
            self.more_cuts.add(s.inputs[0])
        # An input that only moves its source's values (TResNet's space-to-depth folds pixels into
        # channels) may be a new source itself: the op then acts on its channels.
        relaid = [i for i, v in zip(s.inputs, ins) if v.source != i and _pure(v)]
        if isinstance(e, Relaid) and not relaid:  # moved further up: should the region stay, the moved
            # value every path to this op crosses starts a region next time (an adapter after a token
            # reshape, before a conv); not before, as the ops before it would stay (PVT's transposes)
            self.moved_up[s.name] = {m for m in _moved_values(s.inputs, by_name, state)
                                     if _graph.on_every_path(self.flow, ins[0].source, s.name, m)}
        for i in relaid:
            state[i] = self.source(i)
        state[s.name], why = None, str(e)
        if relaid:
            try:
                state[s.name] = self.transfer(s, [self.read(i) for i in s.inputs])
            except NotAffine as again:
                ch.axis, why = saved, str(again)
                for i, v in zip(s.inputs, ins):  # as they were: later readers stay in the same region
                    if i in relaid:
                        state[i] = v
        if state[s.name] is None:
            state[s.name], self.ended[s.name] = self.source(s.name), why

    # --- 2, 3. the regions --------------------------------------------------------------------------------

    def regions_by_source(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for s in self.steps:
            v = self.state[s.name]
            # (an op whose result nothing reads is no member: a region's fold would count on removing it, and the
            # frontend keeps it, as it keeps all it did not make unread: a head's branch a model computes, unused)
            if v is not None and v.source != s.name and self.consumers(s.name):
                groups.setdefault(v.source, []).append(s.name)
        return groups

    def cut_token_regions(self, groups: dict[str, list[str]]) -> set[str]:
        """Token-id regions cut anew (planned next time, with the cuts): the model's own layer after the lookups
        starts a region."""
        recut: set[str] = set()
        for src, members in groups.items():
            if src in self.ch.tokens:
                new = _token_cuts(src, members, self.by_name, self.consumers, self.flow) - self.cuts
                if new:
                    self.more_cuts.update(new)
                    recut.add(src)
        return recut

    # --- 4. each region: absorbers chosen, checked, recorded; or kept ---------------------------------

    def is_adapter(self, members: list[str]) -> tuple[bool, list[str]]:
        by_name = self.by_name
        heavy = sum(by_name[m].op.heavy for m in members)
        core = _without_trailing(members, by_name, self.consumers)
        exits = [e for e in _exits(core, self.consumers) if not _pure(self.state[e])]  # the source relaid: no
        # exit of its own. A layer whose weight is computed from weights alone (HRA's W·H) is a region even
        # alone: storing the weight removes its computation; so is a layer only adapters have (OFT's rotation),
        # to be reported
        evaluated = any(getattr(by_name[m].op, "evaluable", False) or getattr(by_name[m].op, "adapter_only", False)
                        for m in core)
        return heavy > len(_anchors(exits, core, by_name)) or evaluated, core

    def settle_all(self, groups: dict[str, list[str]], recut: set[str]) -> None:
        self.ctx = _Ctx(self.by_name, self.state, self.ch, self.consumers, self.shape, self.dtype, self.flow,
                        self.hazard, self.written)
        kinds = {src: self.is_adapter(members) for src, members in groups.items()}
        # adapter regions first: a layer a scale region could also fold into goes to the adapter
        for src, members in sorted(groups.items(), key=lambda kv: not kinds[kv[0]][0]):
            adapter, core = kinds[src]
            if src in recut:
                continue
            if not adapter and not (self.scales and any(_scales(m, self.by_name, self.state) for m in members)):
                continue  # nothing to remove: a plain layer (or the source only moved), not an adapter region
            self.settle(src, members, core, adapter, groups)

    def settle(self, src: str, members: list[str], core: list[str], adapter: bool, groups) -> None:
        """Fold the region of ``src``, or keep it with the reason."""
        by_name, label = self.by_name, self.label
        region = Region(label(src), [by_name[m].label for m in members], folded=False, scale=not adapter)
        whole = set(members)
        if adapter:  # the cheap ops after the region stay as they are: the model's own
            members = core
        why_not = self.hazard(src)
        # an adapter whose sum with the identity beside it is not in the region (a region of its own starts
        # there): folding its layers into one another would leave one running that the model does not have
        apart = [c for m in members for c in self.consumers(m)
                 if c not in whole and c in by_name and src in by_name[c].inputs] if adapter else []
        if apart and why_not is None:
            return self.keep(src, region, members, f"its sum with the identity beside it, "
                                                   f"{by_name[apart[0]].label}, is in a region of its own")
        if why_not is not None:
            return self.keep(src, region, members, f"{label(src)} {why_not}")
        # a cut source is, to this region, the value its readers see (its own state is its region's)
        seen = self.ctx.state = {**self.state, src: self.as_cut[src]} if src in self.as_cut else self.state
        with folding(region.source):
            outcome = _settle(src, members, self.ctx, adapter, self.scales)
        if isinstance(outcome, Blocked):
            e, why, outside = outcome
            feeds = ", ".join(_blocker(c, label, self.ended, groups[src], self.fresh, e in self.cuts) for c in outside)
            return self.keep(src, region, members, f"{by_name[e].label} feeds {feeds}; {why}")
        chosen, settled = outcome
        why_not = self.cannot_take(chosen, adapter)
        if why_not is not None:
            return self.keep(src, region, members, why_not)
        # a shift of the model's own in the region (BatchNorm's): the new bias replaces it
        shifts = [m for m in settled if by_name[m].inputs[0] in seen and not by_name[m].op.heavy
                  and len(by_name[m].inputs) == 1 and np.any(seen[m].c) and not np.any(seen[by_name[m].inputs[0]].c)]
        new_bias = sum(len(f.b) for f in chosen
                       if f.b is not None and getattr(by_name[f.absorber].op, "b", False) is None)
        if not adapter and new_bias and not any(np.size(seen[m].c) > 1 for m in shifts):
            # the model's own scalar shift (CAFormer's StarReLU bias) into a bias-less layer: a bias of C
            # values for one number and one Add; the model stays as it is (a scale region: not reported)
            return self.keep(src, region, members, "a bias-less layer would take a bias for a scalar shift")
        # what the rewrite removes: every op of the region but those that only move the source's values
        # (the model's own layout ops, dropout or contiguous, which may be read outside too), and a producer
        # fold's old layer
        old_layer = [src] if any(f.kind == "producer" for f in chosen) else []
        gone = [m for m in settled if not _pure(self.state[m])] + old_layer
        moved, why_not = _shape_redirects(src, settled + old_layer, chosen, self.ctx, self.shape_reads,
                                          self.position, label)
        if why_not is not None:
            return self.keep(src, region, members, why_not)
        region.new_bias = new_bias  # the biases bias-less layers took for the region's constant
        region.shift_replaced = bool(shifts)
        self.record(src, region, members, chosen, settled, gone, moved, adapter)
        return None

    def cannot_take(self, chosen: list[Fold], adapter: bool) -> str | None:
        """Why an absorber chosen cannot take its fold in this plan, or None."""
        copied = [f.absorber for f in chosen if self.shared(f.absorber)] if not adapter else []
        if copied:  # the model's own scales into one call of a layer called elsewhere too: a copy of its weights
            return f"{self.by_name[copied[0]].label} shares its weights with another call"
        taken = [f.absorber for f in chosen if f.absorber in self.absorbers]
        if taken:  # a layer rebuilt for another region already (a scale region and an adapter on one conv)
            return f"{self.by_name[taken[0]].label} takes another region's fold already"
        return None

    def record(self, src, region: Region, members, chosen: list[Fold], settled, gone, moved, adapter: bool) -> None:
        """The region folds: its folds, what they remove, and what the next pass starts where this fold leaves
        layers of the region running."""
        by_name = self.by_name
        self.absorbers.update(f.absorber for f in chosen)
        region.folded = True
        self.regions.append(region)
        for f in chosen:
            f.region = region
            self.folds.append(f)
            region.into.append(by_name[f.absorber].label)
        self.members_of.update({m: src for m in gone})
        self.redirects.update(moved)
        done = set(settled)
        self.folded_ops.update(done)
        origins = _kernel_origins(settled, by_name, self.state, self.cuts)
        if len(origins) > 1:
            self.summed.update(origins)
        if adapter:
            rebuilt = {f.absorber for f in chosen}
            self.removed.update({m: src for m in gone if by_name[m].op.heavy and m not in rebuilt})
        left = [m for m in members if m not in done]
        if any(by_name[m].op.heavy for m in left):  # layers the fold leaves running: a region of their own,
            # from the values they read, which stay this region's exits (FastViT's 1x1 block beside an
            # identity BatchNorm, after a large-kernel conv's summed branches)
            pools = _commuted(members, by_name, self.state)  # (as in ``keep``, they start regions next time: a
            # NeXtViT block whose norm1 follows its patch embedding's conv, which takes the region; its keys'
            # pooled norm then folds alone, into the layers after it, which no cut may part from it)
            after = set().union(*(_graph.descendants(self.flow, p) for p in pools))
            self.more_cuts.update(_entries(left, by_name) - after)
            self.more.update(pools)
            region.ops = [by_name[m].label for m in members if m in done]

    def keep(self, src: str, region: Region, members: list[str], why: str) -> None:
        """The region stays as it is: reported when it is an adapter region (a scale region is the model's
        own). One that carries a conv's kernel map is planned again with the conv as the start of a region,
        as before kernel maps (a BatchNorm then folds into it on its own)."""
        by_name, state, consumers, flow = self.by_name, self.state, self.consumers, self.flow
        origins = _kernel_origins(members, by_name, state, self.cuts) - self.more_commuting  # (a pool commutes
        # first)
        at_conv, at_input = _restarts(origins, src, members, by_name, consumers, flow)
        self.more.update(at_conv)
        self.more_cuts.update(at_input)
        self.more.update(_commuted(members, by_name, state))  # a pool that commuted, and the region stays
        # anyway: it starts a region next time, as the origin of a kernel map would (its norm then folds alone)
        self.more.update(v for m in members for c in consumers(m) for v in self.moved_up.get(c, ()))
        if not region.scale:
            series = _in_series(src, members, by_name, state, consumers, flow)
            self.more_cuts.update(series or _branch_points(src, members, by_name, consumers, flow))
            region.reason = why
            self.regions.append(region)
            self.kept_ops.update(members)

    # --- 5. convs whose kernel maps ended -------------------------------------------------------------

    def restart_blocked_convs(self, groups: dict[str, list[str]]) -> None:
        """A conv whose kernel map an op moving positions ended starts a region next time, unless it reads the
        region's source beside other ops of the region (iFormer's RepCPE, ``x + BN(dwconv(x))`` before an
        attention's flatten): then the cut is where the branches join, so that they sum into the conv."""
        by_name = self.by_name
        for h in self.blocked - self.summed:
            src = self.state[h].source if self.state.get(h) is not None else h
            members = groups.get(src, []) if src != h else []
            beside = h in members and by_name[h].inputs[0] == src
            at_conv, at_input = (_restarts({h}, src, members, by_name, self.consumers, self.flow) if beside
                                 else ({h}, set()))
            self.more.update(at_conv)
            self.more_cuts.update(at_input)

    def plan(self) -> Plan:
        unseen = [self.by_name[n].label for n, why in self.ended.items() if why == _UNKNOWN and self.by_name[n].op.heavy]
        accounted = self.folded_ops | self.absorbers | self.kept_ops
        return Plan(self.folds, self.regions, self.members_of, self.redirects, unseen, self.removed, accounted)


def check_gone(plan: Plan, still_there: Callable[[str], bool], label: Callable[[str], str]) -> None:
    """After the rewrite no op of a folded region may still run: ``still_there(name)`` asks the frontend."""
    for name, src in plan.members.items():
        if still_there(name):
            raise RepfoldError(f"{label(name)} of the region at {label(src)} still runs after its fold", region=label(src))
