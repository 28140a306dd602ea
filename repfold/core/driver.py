"""The one fold driver behind every frontend: match a graph's ops with the rules, then rewrite it by plan.

A frontend (``frontends.fx`` for torch.fx and torch.export graphs, ``frontends.onnx`` for ONNX)
supplies its nodes and a matcher for :func:`match`, asks
:func:`repfold.core.engine.plan` what to fold, and hands :func:`rewrite` an
:class:`Edits`: the few graph edits a fold needs, in its own IR. The order of
the rewrite, the replay of layout ops, the choice of what a shape read reads
afterwards and the check that nothing of a folded region still runs are
here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from repfold.core import engine as _engine
from repfold.core.steps import SOURCE, Fold, Plan, Step, folding


class Edits(Protocol):
    """What :func:`rewrite` asks of a frontend. Values are named as the plan names them (a step's output)."""

    def value(self, name: str) -> Any:
        """The frontend's handle of value ``name`` (after :meth:`commit`: its replacement, if it has one)."""

    def swap(self, pairs: Iterable[tuple[Any, Any]]) -> Mapping:
        """A mapping from old handles to new ones, for a step's ``emit`` to read its inputs through."""

    def emit(self, step: Step, swap: Mapping, W, b, *, producer: bool) -> Any:
        """``step``'s layer rebuilt with ``(W, b)``, reading its inputs through ``swap``; placed just before
        the old layer, or just after it for a ``producer`` fold; returns its output."""

    def copy_layout(self, name: str, ins: list, perm: tuple[int, ...] | None) -> Any:
        """A copy of layout step ``name`` reading ``ins`` (a transpose by ``perm`` instead, when given),
        placed just after the original; returns its output."""

    def replace(self, target: str, new: Any) -> None:
        """``new`` is to take the place of value ``target`` for all its readers."""

    def commit(self) -> None:
        """Carry out the replacements (after every rebuild: a ``swap`` names the values as they were)."""

    def redirect(self, name: str, to: Any) -> None:
        """Shape reads of value ``name`` read ``to`` instead."""

    def remove_unread(self) -> None:
        """Remove what the rewrite left unread, and only that."""

    def present(self, name: str) -> bool:
        """Whether the op that made value ``name`` is still in the graph."""

    def dtype(self, name: str) -> Any:
        """The element type of value ``name``."""


def match(
    nodes: Iterable, rules: Callable[[Any], Iterable], matcher: Callable[[Any, Any], Any],
    out_name: Callable[[Any], str], in_name: Callable[[Any], str],
) -> tuple[list[Step], dict[int, str]]:
    """The steps of ``nodes``: for each node not already covered, the first of the rules registered for its
    op (``rules(node)``, from ``repfold.patterns``) whose ``matcher(rule, node)`` gives a match. Returns the
    steps and, by node id, the step that covers each matched node (an ONNX MatMul and its bias Add are one
    step)."""
    steps: list[Step] = []
    step_of: dict[int, str] = {}
    for node in nodes:
        if id(node) in step_of:
            continue
        for rule in rules(node):
            m = matcher(rule, node)
            if m is not None:
                covers = m.covers or (node,)
                name = out_name(covers[-1])
                steps.append(Step(name, m.op, tuple(in_name(i) for i in m.inputs), m.label, m.emit))
                step_of.update({id(c): name for c in covers})
                break
    return steps, step_of


def rewrite(plan: Plan, steps: Iterable[Step], edits: Edits, label: Callable[[str], str],
            *, release: bool = False) -> None:
    """Carry out ``plan`` through ``edits``; then check that no op of a folded region still runs.

    With ``release`` each fold's float64 weights are dropped once written.
    """
    by_name = {s.name: s for s in steps}
    copies: dict[tuple[int, str], Any] = {}  # (base, layout step) -> its copy on that base

    def replay(f: Fold, base) -> Any:
        env = {SOURCE: base}

        def value(k: str):  # a copied step, the base, or a value of the model's own that stays
            return env[k] if k in env else edits.value(k)

        for name, ins, perm in f.via:
            key = (id(base), name)
            if key not in copies:
                copies[key] = (base, edits.copy_layout(name, [value(i) for i in ins], perm))
            env[name] = copies[key][1]
        return value(f.start)

    for f in plan.folds:
        with folding(f):
            step = by_name[f.absorber]
            if f.kind == "producer":
                new = replay(f, edits.emit(step, edits.swap(()), f.W, f.b, producer=True))
            else:
                x = replay(f, edits.value(f.source))
                old = edits.value(f.exit if f.kind == "sink" else step.inputs[0])
                new = edits.emit(step, edits.swap([(old, x)]), f.W, f.b, producer=False)
            f.region.note_cast(edits.dtype(f.target), f.W, f.b)
            edits.replace(f.target, new)
            if release:
                f.W = f.b = None  # written out: the float64 copy can go
    edits.commit()
    targets = {f.target for f in plan.folds}
    made: dict[str, Any] = {}
    for (_, name), (_, c) in copies.items():
        made.setdefault(name, c)  # the first copy of a layout step: the one the plan placed before the read
    for name, to in plan.redirects.items():
        # a fold's target is read through its replacement (placed where the plan counted on), else a copy
        edits.redirect(name, made[to] if to in made and to not in targets else edits.value(to))
    edits.remove_unread()
    _engine.check_gone(plan, edits.present, label)
