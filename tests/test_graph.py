"""The engine's graph questions (repfold.core.graph) on small hand-built graphs."""

from repfold.core import graph as _graph


def diamond():
    # src -> a -> b -> out, with a branch src -> lora -> b (an adapter beside layer a), and a dead op
    return _graph.digraph([("src", "a"), ("a", "b"), ("src", "lora"), ("lora", "b"), ("b", "out"), ("a", "dead")])


def test_live_is_what_the_roots_read():
    g = diamond()
    assert _graph.live(g, ["out"]) == {"src", "a", "lora", "b", "out"}
    assert _graph.live(g, ["out", "dead"]) == {"src", "a", "lora", "b", "out", "dead"}
    assert _graph.live(g, []) == set()
    assert _graph.live(g, ["not in the graph"]) == set()
    assert ("<repfold: every root>",) not in g  # the helper node is gone again


def test_on_every_path():
    g = diamond()
    assert _graph.on_every_path(g, "src", "out", "b")  # every path joins at b
    assert not _graph.on_every_path(g, "src", "out", "a")  # the branch through lora avoids a
    assert not _graph.on_every_path(g, "src", "b", "lora")
    assert _graph.on_every_path(g, "src", "dead", "a")
    assert _graph.on_every_path(g, "out", "src", "a")  # no path at all: vacuously true


def test_fewest_heavy_layers_on_a_path():
    g = diamond()
    heavy = {"a": 1, "lora": 2}
    cost = lambda n: heavy.get(n, 0)
    assert _graph.fewest(g, "src", "out", cost) == 1  # through a, not through the two-layer branch
    assert _graph.fewest(g, "src", "lora", cost) == 2
    assert _graph.fewest(g, "out", "src", cost) == 0  # no path


def test_components_ancestors_descendants():
    g = _graph.digraph([("x", "y"), ("p", "q"), ("q", "r")], nodes=["lone"])
    assert sorted(map(sorted, _graph.components(g))) == [["lone"], ["p", "q", "r"], ["x", "y"]]
    assert _graph.ancestors(g, "r") == {"p", "q"}
    assert _graph.descendants(g, "p") == {"q", "r"}
    assert _graph.ancestors(g, "missing") == set()
