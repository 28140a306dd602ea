"""The graph questions the engine and the frontends ask, answered with networkx.

Every frontend describes its dataflow the same way: a value (an fx node, an
ONNX tensor, a step of the engine) is a graph node, and an edge runs from a
value to each op that reads it. On that graph:

* :func:`live`: what the roots (graph outputs, ops with side effects) read,
  directly or not. Only values that were live before a fold and are not after
  it may be removed; everything else stays, dead or not.
* :func:`on_every_path`: whether every path from one value to another crosses
  a given op (the model's own layer, which an adapter is a branch beside).
* :func:`dominators` / :func:`dominated`: what every path from one value to another crosses, and what
  every path crosses a given value to reach.
* :func:`fewest` / :func:`most`: the fewest / most heavy layers on a path between two values.
* :func:`components`: groups of values connected by an edge in either direction.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator

import networkx as nx

_ROOT = ("<repfold: every root>",)  # a node no frontend can name


def upstream(start: Hashable, inputs: Callable[[Hashable], Iterable[Hashable]]) -> Iterator[Hashable]:
    """``start`` and every value it reads, directly or not, each once (depth first, the last input first),
    following ``inputs``; for a walk up a frontend's own graph without building a networkx one."""
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        yield v
        todo.extend(inputs(v))


def digraph(edges: Iterable[tuple[Hashable, Hashable]], nodes: Iterable[Hashable] = ()) -> nx.DiGraph:
    """A directed graph from ``(value, reader)`` edges, plus ``nodes`` that may have none."""
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    return g


def live(g: nx.DiGraph, roots: Iterable[Hashable]) -> set[Hashable]:
    """The roots and every node with a path to one of them."""
    roots = [r for r in roots if r in g]
    g.add_node(_ROOT)
    g.add_edges_from((r, _ROOT) for r in roots)
    try:
        return nx.ancestors(g, _ROOT)
    finally:
        g.remove_node(_ROOT)


def ancestors(g: nx.DiGraph, node: Hashable) -> set[Hashable]:
    return nx.ancestors(g, node) if node in g else set()


def descendants(g: nx.DiGraph, node: Hashable) -> set[Hashable]:
    return nx.descendants(g, node) if node in g else set()


def dominators(g: nx.DiGraph, src: Hashable, dst: Hashable) -> list[Hashable]:
    """The nodes every path from ``src`` to ``dst`` crosses, ``src`` first, ``dst`` left out (none when
    there is no path)."""
    idom = nx.immediate_dominators(g, src)
    if dst not in idom:
        return []
    chain = []
    while dst != src:
        dst = idom[dst]
        chain.append(dst)
    return chain[::-1]


def dominated(g: nx.DiGraph, src: Hashable, via: Hashable) -> set[Hashable]:
    """The nodes every path from ``src`` to which crosses ``via`` (``via`` and those after it only)."""
    idom = nx.immediate_dominators(g, src)
    below = {via}
    for n in nx.topological_sort(g.subgraph(idom)):  # a node's dominator comes before it
        if n != src and idom[n] in below:
            below.add(n)
    return below


def on_every_path(g: nx.DiGraph, src: Hashable, dst: Hashable, via: Hashable) -> bool:
    """Whether every path from ``src`` to ``dst`` in ``g`` passes through ``via`` (true when there is none)."""
    if via in (src, dst):
        return True
    if src not in g or dst not in g:
        return True
    return not nx.has_path(nx.restricted_view(g, [via], []), src, dst)


def fewest(g: nx.DiGraph, src: Hashable, dst: Hashable, cost: Callable[[Hashable], int]) -> int:
    """The least total ``cost`` of the nodes after ``src`` on a path to ``dst``; 0 when there is no path."""
    if src not in g or dst not in g:
        return 0
    try:
        return int(nx.shortest_path_length(g, src, dst, weight=lambda u, v, d: cost(v)))
    except nx.NetworkXNoPath:
        return 0


def most(g: nx.DiGraph, src: Hashable, dst: Hashable, cost: Callable[[Hashable], int]) -> int:
    """The greatest total ``cost`` of the nodes after ``src`` on a path to ``dst`` (``g`` is acyclic); 0 when
    there is no path."""
    if src not in g or dst not in g:
        return 0
    between = (nx.descendants(g, src) & (nx.ancestors(g, dst) | {dst})) | {src}
    sub = g.subgraph(between)
    best = {src: 0}
    for n in nx.topological_sort(sub):
        if n != src:
            best[n] = cost(n) + max((best[p] for p in sub.predecessors(n) if p in best), default=0)
    return best.get(dst, 0)


def components(g: nx.DiGraph) -> list[set[Hashable]]:
    """Sets of nodes joined by edges in either direction."""
    return [set(c) for c in nx.weakly_connected_components(g)]
