"""The fold rules are registered by op key: the registry must find every match trying every rule finds."""

from __future__ import annotations

import pytest
import torch
from conftest import export, image, make_vit
from repfold.patterns import RULES, fx_rules, onnx_rules
from torch import nn

from repfold.core import driver as _driver
from repfold.frontends.fx import prepare


class Zoo(nn.Module):
    """One of each op family the rules know, in fx's module, function and method forms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop, self.ident, self.flat = nn.Dropout(0.1), nn.Identity(), nn.Flatten(2)
        self.fc = nn.Linear(4, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        x = self.bn(self.conv3(self.conv1(x))) * 2.0 + 1.0
        x = torch.nn.functional.pad(self.drop(self.ident(x)), (0, 0, 0, 0))
        t = self.flat(x).transpose(1, 2).contiguous()
        t = torch.roll(t, 1, 1)[:, 1:].reshape(1, -1, 4).to(torch.float32)
        t = torch.nn.functional.linear(self.fc(t), self.w) - t / 3.0
        t = torch.cat([t, -t], dim=1).permute(0, 2, 1).permute(0, 2, 1)
        return self.mha(t, t, t, need_weights=False)[0]


def _fx_steps(gm, every: bool):
    p = prepare(gm, (torch.randn(1, 4, 5, 5),))  # shapes and a context, the plan aside
    ctx = p.ctx
    rules = (lambda n: RULES) if every else (lambda n: fx_rules(n, ctx.module(n) if n.op == "call_module" else None))
    steps, _ = _driver.match(p.gm.graph.nodes, rules, lambda r, n: r.match_fx(n, ctx), lambda n: n.name,
                             lambda n: n.name)
    return [(s.name, type(s.op).__name__, s.inputs) for s in steps]


def test_fx_registry_finds_what_every_rule_finds():
    model = Zoo().eval()
    every, keyed = _fx_steps(model, True), _fx_steps(model, False)
    assert keyed == every
    kinds = {k for _, k, _ in keyed}
    assert {"Dense", "Conv", "ChannelAffine", "Same", "Reshape", "Permute", "Roll", "Slice", "Concat",
            "Attention", "Sum"} <= kinds, kinds


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_registry_finds_what_every_rule_finds(dynamo):
    onnx_gs = pytest.importorskip("onnx_graphsurgeon")
    from repfold.frontends.onnx import OnnxContext, _infer

    proto = export(make_vit().eval(), image(), dynamo)
    graph = onnx_gs.import_onnx(proto)
    ctx = OnnxContext(graph, proto.graph, *_infer(proto))
    found = []
    for rules in ((lambda n: RULES), onnx_rules):
        steps, _ = _driver.match(graph.nodes, rules, lambda r, n: r.match_onnx(n, ctx), lambda c: c.outputs[0].name,
                                 lambda v: v.name)
        found.append([(s.name, type(s.op).__name__, s.inputs) for s in steps])
    assert found[0] == found[1] and found[0]
