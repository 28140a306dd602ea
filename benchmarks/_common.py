"""What the benchmark scripts share."""

from __future__ import annotations

import torch


def trained_like(gm: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Give every adapter weight random non-zero values, as training would; ``gm`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return gm.eval()
