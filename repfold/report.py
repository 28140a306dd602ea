"""The fold report: every adapter region found, folded into what or why not."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Region:
    """One adapter region: the value it reads, its ops, and what became of it."""

    source: str
    ops: list[str]
    folded: bool
    into: list[str] = field(default_factory=list)
    reason: str | None = None
    dtype: str | None = None
    rounding: float | None = None
    scale: bool = False  # per-channel scales and shifts only, no layer (BatchNorm, LayerScale, SSF, IA3)
    new_bias: int = 0  # values of the biases that layers without one took to hold the region's constant
    shift_replaced: bool = False  # the region held a shift of the model's own (BatchNorm's) that they replace

    def line(self) -> str:
        what = f"folded into {', '.join(self.into)}" if self.folded else f"kept: {self.reason}"
        if self.folded and self.new_bias and not self.scale and not self.shift_replaced:
            what += f" (a layer without a bias took one: {self.new_bias} values)"
        if self.rounding and self.dtype in HALF:
            what += f" (cast to {self.dtype}: weights moved by up to {self.rounding:.1e})"
        return f"{self.source} -> [{len(self.ops)} ops] {what}"

    def note_cast(self, dtype, *arrays) -> None:
        """Record the model's ``dtype`` and, for half types, the rounding of casting the float64 fold result.

        ``rounding`` is the largest absolute change any new weight takes from
        that single cast, over every layer the region folds into.
        """
        if dtype is None:
            return
        torch_dtype = type(dtype).__module__ == "torch"
        self.dtype = str(dtype).removeprefix("torch.") if torch_dtype else np.dtype(dtype).name
        if self.dtype not in HALF:
            return  # float32 moves weights by ~1e-8 relative: not worth a pass over every weight
        import torch  # casts to bfloat16 as the model's runtime does

        if not torch_dtype:
            dtype = getattr(torch, self.dtype)
        worst = self.rounding or 0.0
        for a in arrays:
            if getattr(a, "rounding", None) is not None:  # a product the frontend wrote: it measured its cast
                worst = max(worst, a.rounding)
                continue
            t = torch.as_tensor(np.asarray(a, dtype=np.float64)) if a is not None else None
            if t is not None and t.numel():
                worst = max(worst, float((t.to(dtype).double() - t).abs().max()))
        self.rounding = worst


HALF = ("float16", "bfloat16")


@dataclass
class FoldReport:
    """What :func:`repfold.fold` did; ``str(report)`` is a readable summary."""

    frontend: str
    regions: list[Region] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    unseen: list[str] = field(default_factory=list)  # layers the fold could not examine: input shape unknown
    into: str | None = None  # the class the fold was written into (``fold(gm, into=model)``), if any
    parts: list[str] = field(default_factory=list)  # the submodules folded one by one (graphs insert made)
    edits: list[str] = field(default_factory=list)  # its module edits, in words
    into_error: float | None = None  # the class's largest difference from the folded graph, relative

    @property
    def folded(self) -> list[Region]:
        return [r for r in self.regions if r.folded]

    @property
    def kept(self) -> list[Region]:
        return [r for r in self.regions if not r.folded]

    @property
    def layered(self) -> list[Region]:
        """The regions with layers of their own (adapters): not only per-channel scales and shifts."""
        return [r for r in self.regions if not r.scale]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        layered = self.layered
        head = (
            f"repfold ({self.frontend}): {len(layered)} adapter regions, "
            f"{sum(r.folded for r in layered)} folded, {len(self.kept)} kept"
        )
        scales = [r for r in self.folded if r.scale]
        if scales:  # (a scale region is reported only when it folds: otherwise it is the model's, as it was)
            head += (f"; {len(scales)} regions of per-channel scales and shifts only folded too (SSF, IA3, "
                     "LayerScale, BatchNorm, an exporter's constant): fewer operators than without adapters")
        lines = [head] + ["  " + r.line() for r in self.regions]
        if self.parts:
            lines.append(f"  folded part by part (graphs insert made, put back into the model): {', '.join(self.parts)}")
        if self.unseen:
            lines.append(f"  not examined (input shape unknown, so no region there can be found): "
                         f"{len(self.unseen)} layers, e.g. {', '.join(self.unseen[:3])}")
        if self.params_before:
            lines.append(f"  parameters: {self.params_before:,} -> {self.params_after:,}")
        if self.ops_before:
            changed = sorted(
                k for k in set(self.ops_before) | set(self.ops_after)
                if self.ops_before.get(k, 0) != self.ops_after.get(k, 0)
            )
            diff = ", ".join(f"{k} {self.ops_before.get(k, 0)}->{self.ops_after.get(k, 0)}" for k in changed)
            lines.append(f"  operators changed: {diff or 'none'}")
        if self.into is not None:
            lines.append(f"  written into {self.into} as {len(self.edits)} module edits (" + "; ".join(self.edits[:4])
                         + ("; ..." if len(self.edits) > 4 else "") + f"); against the folded graph on the example "
                         f"inputs: max error {self.into_error:.1e}")
        return "\n".join(lines)


def placement(scope: str) -> str:
    """Where an adapter of ``gm.meta["repfold"]["adapters"]`` sits, in words: ``before 'blocks.0.attn'``."""
    return f"after {scope.removesuffix(':after')!r}" if scope.endswith(":after") else f"before {scope!r}"
