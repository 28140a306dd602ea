"""The fold rules on ONNX graphs: the models of test_rules_fx, exported, folded, run in onnxruntime.

Each case must end as the fx fold does (folded, or kept with the same reason),
match the unfolded export in float32, pass the full ONNX checker, and have the
operators of the export of the same model without its adapters (each adapter
module replaced by ``nn.Identity``, a LoRA branch dropped).
"""

from __future__ import annotations

import copy
from collections import Counter

import onnx
import pytest
import test_rules_fx as fx_rules
import torch
from conftest import export, rel_err
from test_rules_fx import (
    Adapter,
    AdapterThen,
    ConvNet,
    Functional,
    LinearAdapter,
    LoRA,
    PaperAdapter,
    Tokens,
    image,
    tokens,
)
from torch import nn

import repfold

ort = pytest.importorskip("onnxruntime")


class SliceConcat(AdapterThen):
    """Tokens cut along the sequence axis and joined again in another order: the channel axis stays whole."""

    def __init__(self) -> None:
        super().__init__(out=4)

    def after(self, h):
        return torch.tanh(self.fc(torch.cat([h[:, 1:], h[:, :1]], dim=1)))


class PlainLoRA(LoRA):
    """The LoRA model without its branch: the layer alone."""

    def forward(self, x):
        return torch.tanh(self.layer(self.norm(x)))


def without_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter module replaced by ``nn.Identity()``; LoRA without its branch."""
    if isinstance(model, LoRA):
        plain = PlainLoRA()
        plain.load_state_dict(model.state_dict())
        return plain.eval()
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if name and isinstance(module, fx_rules.ADAPTERS):
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, nn.Identity())
    assert not any(isinstance(m, fx_rules.ADAPTERS) for m in plain.modules())
    return plain.eval()


CASES = {
    "conv3x3-stride2": (lambda: ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, stride=2)), image, None),
    "conv-reflect-pad": (lambda: ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")), image, None),
    "conv-zero-pad": (lambda: ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, padding=1)), image, "not exact at the borders"),
    "depthwise": (lambda: ConvNet(Adapter(4), nn.Conv2d(4, 4, 3, groups=4)), image, "would densify a depthwise conv"),
    "backward-into-conv": (lambda: ConvNet(Adapter(5), nn.Conv2d(4, 5, 3, padding=1), after=True), image, None),
    "paper-form-qkv": (lambda: Tokens(PaperAdapter()), tokens, None),
    "separate-qkv": (lambda: Tokens(LinearAdapter(), separate=True), tokens, None),
    "lora": (LoRA, tokens, None),
    "f-linear": (lambda: Functional(LinearAdapter()), tokens, None),
    "slice-concat": (SliceConcat, tokens, None),
    "between-layers-in-series": (lambda: fx_rules.Bottleneck(adapter=True), image, None),
}


def _run(proto: onnx.ModelProto, x: torch.Tensor):
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.op_type != "Constant")


@pytest.mark.parametrize("case", list(CASES))
def test_rule_on_onnx(case):
    make, data, refusal = CASES[case]
    torch.manual_seed(0)
    model, x = make().eval(), data()
    with torch.no_grad():
        assert rel_err(fx_rules.without_adapters(model)(x), model(x)) > 1e-3
    adapted = export(model, x, dynamo=False)
    folded, report = repfold.fold(adapted, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    (region,) = report.regions
    assert rel_err(_run(folded, x), _run(adapted, x)) < 1e-5
    if refusal:
        assert not region.folded and refusal in region.reason
        return
    assert region.folded, str(report)
    base = export(without_adapters(model), x, dynamo=False)
    assert rel_err(_run(adapted, x), _run(base, x)) > 1e-3  # the base really is the model without adapters
    assert _ops(folded) == _ops(base), (_ops(folded), _ops(base))
