"""Bring your own adapter: a module repfold has never seen, folded with no registration.

    python examples/custom_adapter.py

repfold finds adapters by algebra on the traced graph, not by class. Here
the adapter is the user's own design: a low-rank branch written with
``F.linear`` on raw parameters, with a learned per-channel gate and a
per-channel shift, placed by hand in front of every MLP of a timm ViT
(no ``repfold.insert``). Any chain of linear maps, per-channel scales and
shifts, and residual adds is affine along the channel axis, so it folds into
the ``fc1`` it feeds. The result is a ``VisionTransformer`` again: each
adapter module becomes an identity and each ``fc1`` is re-weighted.
"""

from __future__ import annotations

from collections import Counter

import timm
import torch
import torch.nn.functional as F
from torch import nn

import repfold


class GatedLowRank(nn.Module):
    """``x + gate * (B @ A @ x) + shift``: nothing repfold knows by name."""

    def __init__(self, width: int, rank: int = 4) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, width) * 0.05)
        self.B = nn.Parameter(torch.randn(width, rank) * 0.05)
        self.gate = nn.Parameter(torch.rand(width) + 0.5)
        self.shift = nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, x):
        return x + self.gate * F.linear(F.linear(x, self.A), self.B) + self.shift


class Adapted(nn.Module):
    """A block's MLP with the user's adapter in front of it."""

    def __init__(self, mlp: nn.Module, width: int) -> None:
        super().__init__()
        self.adapter, self.mlp = GatedLowRank(width), mlp

    def forward(self, x):
        return self.mlp(self.adapter(x))


def counts(model, x) -> Counter:
    """The operators of ``model`` as repfold traces it (the report of a fold counts them before folding),
    but the identities (a folded adapter module's place in the class: they compute nothing)."""
    ops = Counter(repfold.fold(model, example_inputs=x, graph=True, return_report=True)[1].ops_before)
    ops.pop("Identity", None)
    return ops


def main() -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y_base = base(x)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    model.load_state_dict(base.state_dict())
    for block in model.blocks:
        block.mlp = Adapted(block.mlp, model.embed_dim)
    model.eval()

    folded, report = repfold.fold(model, example_inputs=x, return_report=True)  # a VisionTransformer again
    print(report)
    with torch.no_grad():
        y, y_folded = model(x), folded(x)
    change = float((y - y_base).abs().max() / y_base.abs().max())
    diff = float((y_folded - y).abs().max() / y.abs().max())
    print(f"the adapters change the output by {change:.2%}; folded vs with adapters: {diff:.1e}")
    same = counts(folded, x) == counts(repfold.fold(base, example_inputs=x), x)
    print(f"folded operators equal the base model's: {same}; parameters: "
          f"{sum(p.numel() for p in folded.parameters()):,} (base {sum(p.numel() for p in base.parameters()):,})")
    # explicit checks, not asserts: `python -O` would strip those
    if not change > 1e-3:
        raise RuntimeError(f"the adapters change the output by only {change:.1e}: nothing to fold")
    if not report.regions or report.kept:
        raise RuntimeError(f"not every adapter folded:\n{report}")
    if not diff <= 1e-5:
        raise RuntimeError(f"the folded model differs from the one with adapters by {diff:.1e}")
    if not same:
        raise RuntimeError("the folded model's operators are not the base model's")


if __name__ == "__main__":
    main()
