"""Trainable linear adapters that ``repfold.insert`` places into a graph.

The adapter is RepAdapter (Luo et al., arXiv 2302.08106): a dense 1×1
down-projection to ``hidden_dim`` channels, dropout (active in training only),
a grouped 1×1 up-projection back to the input width (the paper's dense–sparse
design), a scalar ``scale``, and the identity::

    y = x + scale · Up_g(Dropout(Down(x)))

Every piece is linear, so in eval mode ``y = M·x + c`` along the channel axis;
``repfold.fold`` finds that by algebra on the traced ops (it never looks at
this class). The up-projection starts at zero, so a fresh adapter is an exact
identity.

The 1×1 convs run along axis 1. Where the channel axis is elsewhere
(``axis``; ``repfold.insert`` reads it off the graph), it is swapped to
position 1 and back:

* token form (channels last, ``(B, N, C)`` or ``(B, H, W, C)``, ``axis=-1``),
  which is how the paper's code writes it;
* channels-first form (``(B, C, H, W)`` and friends, ``axis=1``): the convs
  run directly;
* any other axis of a rank-3 to rank-5 value the same way.

``bias=False`` leaves both convs without a bias: the adapter is then a pure
linear map (no constant), which also folds into a zero-padded k×k conv.
"""

from __future__ import annotations

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class RepAdapter(nn.Module):
    """``x + scale * up(dropout(down(x)))`` with 1×1 convs along one channel axis.

    Args:
        channels: width of the value the adapter sits on.
        hidden_dim: width of the bottleneck.
        groups: groups of the up-projection; must divide ``hidden_dim`` and
            ``channels``.
        scale: constant factor on the adapter branch.
        dropout: dropout probability inside the branch (training only).
        rank: rank of the tensors it will see (3 for ``(B, N, C)`` tokens).
        channels_last: ``True`` for the token form, ``False`` for NCHW (when ``axis`` is not given).
        axis: the channel axis (negative counts from the end); overrides ``channels_last``.
        bias: whether the two convs have biases.
    """

    def __init__(
        self,
        channels: int,
        hidden_dim: int = 8,
        groups: int = 2,
        scale: float = 1.0,
        dropout: float = 0.1,
        rank: int = 3,
        channels_last: bool = True,
        axis: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if hidden_dim < 1 or groups < 1:
            raise ValueError("hidden_dim and groups must be positive")
        if hidden_dim % groups or channels % groups:
            raise ValueError(
                f"groups={groups} must divide hidden_dim={hidden_dim} and channels={channels}"
            )
        if rank - 2 not in _CONV:
            raise ValueError(f"adapters support tensors of rank 3 to 5, not {rank}")
        if axis is None:
            axis = -1 if channels_last else 1
        if not -rank <= axis < rank or axis % rank == 0:
            raise ValueError(f"axis={axis} is not a channel axis of a rank-{rank} value (not the batch axis)")
        conv = _CONV[rank - 2]
        self.channels, self.hidden_dim, self.groups = channels, hidden_dim, groups
        self.scale, self.rank = float(scale), rank
        self.axis = axis % rank
        self.channels_last = self.axis != 1
        self.down = conv(channels, hidden_dim, 1, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.up = conv(hidden_dim, channels, 1, groups=groups, bias=bias)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild an empty twin."""
        return {
            "channels": self.channels,
            "hidden_dim": self.hidden_dim,
            "groups": self.groups,
            "scale": self.scale,
            "dropout": self.dropout.p,
            "rank": self.rank,
            "axis": self.axis,
            "bias": self.down.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis != 1:
            t = x.transpose(1, -1) if self.axis == self.rank - 1 else x.transpose(1, self.axis)
            t = t + self.up(self.dropout(self.down(t))) * self.scale
            return t.transpose(1, -1) if self.axis == self.rank - 1 else t.transpose(1, self.axis)
        return x + self.up(self.dropout(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        form = "tokens" if self.axis == self.rank - 1 else "channels-first" if self.axis == 1 else f"axis {self.axis}"
        return f"{form}, scale={self.scale}"
