"""An adapter that reads a value the model also sends on through its own layers (a fan-out past a layer).

torchvision's Faster R-CNN MobileNet-V3 backbone: the FPN's 1x1 inner conv reads a backbone feature
``f = BN(conv(x))`` that also feeds the next block (conv -> BN -> Hardswish, and its residual sum). An
adapter before the inner conv grew one region with the model's own layers from ``x``, which as a whole
folds into no one layer: it was kept ("bn2 feeds act ... c1 needs a 16x24 map"), although the adapter
alone, from ``f``, folds into the inner conv. The planner now cuts such a kept region where an adapter's
branches part from the value it reads (past a layer), so that the adapter's region starts there.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_adapters, rel_err
from torch import fx, nn

import repfold
from repfold.frontends.fx import op_counts

ort = pytest.importorskip("onnxruntime")


class Head(nn.Module):
    """The FPN's 1x1 inner conv (the adapter goes before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv(x)


class LoRAHead(nn.Module):
    """The same conv with a LoRA branch beside it: ``conv(x) + B(A(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 1)
        self.lora_A = nn.Conv2d(16, 2, 1, bias=False)
        self.lora_B = nn.Conv2d(2, 8, 1, bias=False)

    def forward(self, x):
        return self.conv(x) + self.lora_B(self.lora_A(x))


class Fanout(nn.Module):
    """``f = BN(conv(x))`` feeds the next block (conv -> BN -> Hardswish; with ``residual``, a conv -> BN
    more and the sum with ``f``, as MobileNet-V3's block 14) and the head."""

    def __init__(self, residual: bool = False, lora: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.c1, self.bn = nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16)
        self.c2, self.bn2, self.act = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish()
        if residual:
            self.c3, self.bn3 = nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)
        self.head = LoRAHead() if lora else Head()

    def forward(self, x):
        f = self.bn(self.c1(x))
        y = self.act(self.bn2(self.c2(f)))
        if self.residual:
            y = f + self.bn3(self.c3(y))
        return y, self.head(f)


def build(residual: bool = False, lora: bool = False, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = Fanout(residual, lora).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, LoRAHead):
                m.lora_B.weight.normal_(0, 0.2)  # as after training (PEFT starts it at zero)
    return model.to(dtype)


def x_of(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(2, 24, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def adapted(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = repfold.insert(model, before=["head"], example_inputs=x, bias=False)
    randomize_adapters(gm)
    return gm.eval()


def err(a, b) -> float:
    return max(rel_err(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("residual", [False, True], ids=["fanout", "fanout-residual"])
def test_adapter_reading_a_feature_the_next_block_reads_folds_into_the_head_conv(residual):
    model, x = build(residual), x_of()
    gm = adapted(model, x)
    folded, report = repfold.fold(gm, return_report=True)
    assert len(report.layered) == 1 and not report.kept, str(report)
    (region,) = report.layered
    assert "head.conv (Conv2d)" in region.into, str(report)
    with torch.no_grad():
        y = gm(x)
        assert err(y, model(x)) > 1e-3  # the adapter changes the output
        assert err(folded(x), y) < 1e-10
    base = op_counts(fx.symbolic_trace(model))
    got = op_counts(folded)
    assert all(got.get(k, 0) <= n for k, n in base.items()) and set(got) <= set(base), (got, base)
    assert got["Conv2d"] == base["Conv2d"]  # no adapter layer left behind
    assert not any(n.target.startswith("repfold_adapters") for n in folded.graph.nodes if n.op == "call_module")


def test_adapter_reading_a_feature_the_next_block_reads_folds_through_torch_export():
    model, x = build(residual=True), x_of()
    gm = adapted(model, x)
    folded, report = repfold.fold(torch.export.export(gm, (x,)), return_report=True)
    assert len(report.layered) == 1 and not report.kept, str(report)
    with torch.no_grad():
        y = gm(x)
        assert err(folded.module()(x), y) < 1e-10
    assert report.ops_after["Conv2d"] == 4 and "BatchNorm2d" not in report.ops_after, report.ops_after


def test_lora_beside_a_conv_reading_a_feature_the_next_block_reads_folds_into_that_conv():
    model, x = build(lora=True), x_of()
    folded, report = repfold.fold(model, example_inputs=x, return_report=True, graph=True)
    assert len(report.layered) == 1 and not report.kept, str(report)
    with torch.no_grad():
        assert err(folded(x), model(x)) < 1e-10
    got = op_counts(folded)
    assert got["Conv2d"] == 3 and "add" not in got, got  # c1, c2 and the head's conv, the LoRA summed into it


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def _run(proto: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {proto.graph.input[0].name: x.numpy()})


@pytest.mark.parametrize("residual", [False, True], ids=["fanout", "fanout-residual"])
def test_adapter_reading_a_feature_the_next_block_reads_folds_in_onnx(residual):
    model, x = build(residual, dtype=torch.float32), x_of(torch.float32)
    gm = adapted(model, x)
    proto, base = _export(gm, x), _export(model, x)
    folded, report = repfold.fold(proto, return_report=True)
    assert len(report.layered) == 1 and not report.kept, str(report)
    want = _run(proto, x)
    assert err(want, _run(base, x)) > 1e-3  # the adapter changes the output
    assert err(_run(folded, x), want) < 1e-5
    got, had = Counter(n.op_type for n in folded.graph.node), Counter(n.op_type for n in base.graph.node)
    assert all(got[k] <= had[k] for k in got), (got, had)


def test_faster_rcnn_mobilenet_v3_backbone_folds_every_adapter_before_the_fpn():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    gm = repfold.insert(model.backbone, before=["fpn.inner_blocks.*.0", "fpn.layer_blocks.*.0"],
                        example_inputs=x, bias=False)
    randomize_adapters(gm, std=0.05)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    assert len(report.layered) == 4 and not report.kept, str(report)  # was 3 folded, 1 kept
    assert not any(n.target.startswith("repfold_adapters") for n in folded.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        y, base = gm(x), model.backbone(x)
        z = folded(x)
    assert max(rel_err(y[k], base[k]) for k in y) > 1e-3
    assert max(rel_err(z[k], y[k]) for k in y) < 1e-5
