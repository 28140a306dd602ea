"""Property tests: random adapter shapes, folded in float64, must match to rounding."""


import torch
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st

import repfold


class Block(torch.nn.Module):
    """norm -> (adapter goes here) -> fc -> GELU -> out: the shape of a transformer MLP."""

    def __init__(self, width: int, out: int, channels_first: bool) -> None:
        super().__init__()
        self.channels_first = channels_first
        if channels_first:
            self.norm = torch.nn.BatchNorm2d(width)
            self.fc = torch.nn.Conv2d(width, out, 1)
        else:
            self.norm = torch.nn.LayerNorm(width)
            self.fc = torch.nn.Linear(width, out)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(torch.tanh(self.norm(x))))


@st.composite
def cases(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    width = groups * draw(st.integers(1, 8))
    hidden = groups * draw(st.integers(1, 4))
    out = draw(st.integers(1, 24))
    scale = draw(st.floats(-2, 2).filter(lambda s: abs(s) > 1e-3))
    channels_first = draw(st.booleans())
    return width, hidden, groups, out, scale, channels_first


@given(cases())
def test_random_adapter_shapes_fold_exactly(case):
    width, hidden, groups, out, scale, channels_first = case
    torch.manual_seed(0)
    block = Block(width, out, channels_first).double().eval()
    x = torch.randn((2, width, 3, 3) if channels_first else (2, 5, width), dtype=torch.float64)
    gm = repfold.insert(block, before="fc", hidden_dim=hidden, groups=groups, scale=scale, example_inputs=x)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.startswith("repfold_adapters."):
                p.normal_(0, 0.5)
    gm.eval()
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, block(x)) > 1e-6
        folded, report = repfold.fold(gm, return_report=True)
        assert [r.folded for r in report.regions] == [True]
        assert rel_err(folded(x), y) <= 1e-10
    assert report.params_after == sum(p.numel() for p in block.parameters())
