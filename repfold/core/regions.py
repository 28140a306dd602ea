"""The shape of regions in the dataflow graph: their exits, their anchors, where the next planning pass
cuts them or starts new ones (kernel maps that ended, layers left in series, token-id regions)."""

from __future__ import annotations

from collections.abc import Sequence

from repfold.core import graph as _graph
from repfold.core.affine import Affine, Channels, Kernel
from repfold.core.steps import Step


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
