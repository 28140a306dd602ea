"""Laying the source out for an absorber: the layout ops between them replayed on the source (detours that
cancel skipped), and what a value's shape reads read once the region is gone."""

from __future__ import annotations

from repfold.core.affine import NotAffine
from repfold.core.regions import _pure, _width
from repfold.core.steps import SOURCE, Fold, _Ctx


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
