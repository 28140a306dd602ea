"""Choosing absorbers: every exit of a region gets one (a heavy layer of the region, the ops that read the
exit, or the layer that produced the source), or the region is kept with the reason."""

from __future__ import annotations

from collections.abc import Callable

from repfold.core import graph as _graph
from repfold.core.affine import Affine, NotAffine
from repfold.core.regions import _exits, _kernel_map, _pure, _scales, _weight_shape
from repfold.core.replay import _replay, _same_value_type
from repfold.core.steps import OUTPUT, Blocked, Fold, Step, _Ctx


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
