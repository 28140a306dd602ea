"""What the planner works on and hands back: steps (the ops a rule recognised), folds, plans, and the
context a region is settled in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from repfold.core.affine import Affine, Channels, NotAffine
from repfold.report import Region

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
