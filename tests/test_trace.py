"""Models plain torch.fx cannot trace: timm's registry, user-named leaves, and the error that names the module."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn

import repfold

timm_layers = pytest.importorskip("timm.layers")


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace through this forward."""

    def forward(self, x):
        return x if bool(x.sum() > 0) else -x


class Registered(Gate):
    """The same, registered in timm's own list of modules fx must keep whole."""


timm_layers.register_notrace_module(Registered)


class Net(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.norm, self.gate = nn.LayerNorm(6), gate
        self.attn = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6))

    def forward(self, x):
        return self.attn(self.norm(self.gate(x)))


X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def insert_and_fold(model: nn.Module, **kw):
    model = model.double().eval()
    gm = repfold.insert(model, before="attn", example_inputs=X, **kw)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "repfold_adapters" in n:
                p.normal_(0, 0.3)
        assert rel_err(gm(X), model(X)) > 1e-3
    folded, report = repfold.fold(gm, return_report=True, **kw)
    with torch.no_grad():
        assert rel_err(folded(X), gm(X)) < 1e-12
    return folded, report


def test_timm_registry_makes_an_untraceable_module_a_leaf():
    folded, report = insert_and_fold(Net(Registered()))
    assert [r.folded for r in report.regions] == [True]
    assert any(n.op == "call_module" and n.target == "gate" for n in folded.graph.nodes)


def test_user_named_leaf_module():
    _, report = insert_and_fold(Net(Gate()), leaf_modules=[Gate])
    assert [r.folded for r in report.regions] == [True]


def test_trace_failure_names_the_module_and_the_way_out():
    with pytest.raises(repfold.TraceError) as e:
        repfold.insert(Net(Gate()), before="attn", example_inputs=X.float())
    msg = str(e.value)
    assert "in gate (Gate)" in msg and "leaf_modules=" in msg and "\n" not in msg
