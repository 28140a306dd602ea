"""A layer whose bias is computed at run time (Swin V2's qkv: a copy of its bias with the key slice zeroed on
every call). An adapter without a constant folds into its weight, ``W' = W·M``, the bias input left as it
is; one with a constant cannot (``W·c`` has no stored bias to go into): it is kept, with the reason, and
insert says so, with the remedy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, rel_err
from torch import nn
from torch.nn import functional as F

import repfold
from repfold.frontends.fx import op_counts


class Attn(nn.Module):
    """``F.linear(x, W, b)`` with ``b`` the qkv bias cloned and its key slice zeroed, as Swin V2 does."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        with torch.no_grad():
            self.qkv.bias.normal_(0, 0.5)

    def forward(self, x):
        bias = self.qkv.bias.clone()
        n = bias.numel() // 3
        bias[n:2 * n].zero_()
        return F.linear(x, self.qkv.weight, bias)


class Block(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.attn = Attn(c)

    def forward(self, x):
        return torch.tanh(self.attn(self.norm(x)))


def _inserted(bias: bool, block=None, x=None):
    torch.manual_seed(0)
    model = (block or Block()).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64) if x is None else x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = repfold.insert(model, before=["attn"], example_inputs=x, bias=bias)
    randomize_adapters(gm)
    return model, x, gm.eval(), [str(w.message) for w in caught if "repfold.insert" in str(w.message)]


def test_a_bias_free_adapter_folds_into_a_layer_whose_bias_is_computed():
    model, x, gm, warned = _inserted(bias=False)
    assert not warned, warned
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3, "the adapter does not change the output"
    folded, report = repfold.fold(gm, return_report=True)
    assert [r.folded for r in report.regions] == [True], str(report)
    with torch.no_grad():
        assert rel_err(folded(x), y) < 1e-10
    _, base = repfold.fold(model, example_inputs=x, return_report=True)
    assert report.ops_after == base.ops_after and op_counts(folded)["linear"] == 1, str(report)
    # the layer still reads the bias computed at run time, not a stored one (its key slice still zeroed: the
    # output, key slice included, is compared above)
    (linear,) = [n for n in folded.graph.nodes if n.target is F.linear]
    assert linear.args[2].op == "call_method" and linear.args[2].target == "clone"


def test_a_biased_adapter_before_a_computed_bias_is_kept_and_insert_says_why():
    _model, x, gm, warned = _inserted(bias=True)
    assert len(warned) == 1 and "bias is computed at run time" in warned[0] and "bias=False" in warned[0], warned
    folded, report = repfold.fold(gm, return_report=True)
    (region,) = report.regions
    assert not region.folded and "bias is computed at run time" in region.reason, str(report)
    assert "bias=False" in region.reason
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) < 1e-12  # kept: computes what it did


def test_torchvision_swin_v2_folds_every_attn_adapter():
    """Swin V2's ``shifted_window_attention_v2``: its qkv bias is computed (key slice zeroed); insert traces
    through torch.export (fx keeps the function whole). At 64 pixels the last two stages pad their 4x4 and
    2x2 maps with zeros to the 8x8 window before the qkv projection; the first two do not."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = repfold.insert(model, before=["attn"], example_inputs=x, bias=False)
    assert not [w for w in caught if "repfold.insert" in str(w.message)], [str(w.message) for w in caught]
    assert gm.meta["repfold"]["trace"] == "torch.export"
    randomize_adapters(gm, std=0.05)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    assert len(report.regions) == 12 and not report.kept, str(report)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3
        assert rel_err(folded(x), y) < 1e-5
    # the inserted graph without its adapter calls is the model's own, as traced
    base = op_counts(gm)
    for name in {type(m).__name__ for m in gm.get_submodule("repfold_adapters").children()}:
        del base[name]
    counts = op_counts(folded)
    # (the pads by literal zero amounts before each attention are identities: the fold may drop them)
    assert counts.pop("pad") <= base.pop("pad")
    assert counts == base, {k: (counts.get(k), base.get(k)) for k in set(counts) | set(base)
                            if counts.get(k) != base.get(k)}


@pytest.mark.parametrize("biased", [False, True], ids=["bias-free", "biased"])
def test_onnx_matmul_whose_bias_add_is_computed_at_run_time(biased):
    """ONNX's form: ``MatMul`` then ``Add`` of a value that is no constant (a graph input here; Swin V2's
    bias, were an exporter to leave its zeroing in the file). The MatMul alone takes ``W·M``; the Add stays."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, h = 8, 3

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    inits = [init("down", c, h), init("up", h, c), init("qkv", c, 3 * c)]
    nodes = [helper.make_node("MatMul", ["x", "down"], ["d"])]
    if biased:
        inits += [init("down_b", h), init("up_b", c)]
        nodes += [helper.make_node("Add", ["d", "down_b"], ["db"]), helper.make_node("MatMul", ["db", "up"], ["u0"]),
                  helper.make_node("Add", ["u0", "up_b"], ["u"])]
    else:
        nodes.append(helper.make_node("MatMul", ["d", "up"], ["u"]))
    nodes += [helper.make_node("Add", ["x", "u"], ["s"]), helper.make_node("MatMul", ["s", "qkv"], ["m"]),
              helper.make_node("Add", ["m", "bias"], ["y0"]), helper.make_node("Tanh", ["y0"], ["y"])]
    graph = helper.make_graph(
        nodes, "runtime_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, c]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3 * c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3 * c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.normal(size=(2, 5, c)).astype(np.float32), "bias": rng.normal(size=3 * c).astype(np.float32)}

    def run(proto):
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    folded, report = repfold.fold(model, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    (region,) = report.regions
    assert rel_err(run(folded), run(model)) < 1e-5
    if biased:
        assert not region.folded and "bias is computed at run time" in region.reason, str(report)
        return
    assert region.folded, str(report)
    ops = sorted(n.op_type for n in folded.graph.node)
    assert ops == ["Add", "MatMul", "Tanh"], ops
    (add,) = [n for n in folded.graph.node if n.op_type == "Add"]
    assert "bias" in add.input  # the computed bias is still added, as it was


class PadAttn(nn.Module):
    """Swin's window partition of a map its window does not divide: a pad with zeros, then the projection."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c, 2 * c)

    def forward(self, x):  # (B, H, W, C)
        return self.proj(F.pad(x, (0, 0, 0, 2, 0, 1)).reshape(x.shape[0], -1, x.shape[-1]))


class PadBlock(Block):
    def __init__(self, c: int = 8) -> None:
        super().__init__(c)
        self.attn = PadAttn(c)


@pytest.mark.parametrize("bias", [False, True], ids=["bias-free", "biased"])
def test_a_zero_pad_passes_a_region_without_a_constant(bias):
    """``pad(M·x) = M·pad(x)`` with zeros: the fold replays the pad on the source. A constant would not hold at
    the new positions (they read 0): that region is kept, and insert says why."""
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    model, x, gm, warned = _inserted(bias, PadBlock(), x)
    folded, report = repfold.fold(gm, return_report=True)
    (region,) = report.regions
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3, "the adapter does not change the output"
        assert rel_err(folded(x), y) < 1e-10
    if bias:
        assert not region.folded and "pads with zeros a value with a constant" in region.reason, str(report)
        assert len(warned) == 1 and "pads with zeros" in warned[0], warned
        return
    assert region.folded and not warned, (str(report), warned)
    _, base = repfold.fold(model, example_inputs=x, return_report=True)
    assert report.ops_after == base.ops_after, str(report)


@pytest.mark.parametrize("biased", [False, True], ids=["bias-free", "biased"])
def test_onnx_zero_pad_passes_a_region_without_a_constant(biased):
    """ONNX's ``Pad`` (constant mode, value 0 or none) between an adapter and a MatMul: the pad is replayed on
    the source where the region has no constant; one with a constant is kept."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, h = 8, 3

    def init(name, *shape, dtype=np.float32):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(dtype), name)

    inits = [init("down", c, h), init("up", h, c), init("proj", c, 2 * c), init("proj_b", 2 * c),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1, 2, 0], np.int64), "pads"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    nodes = [helper.make_node("MatMul", ["x", "down"], ["d"]), helper.make_node("MatMul", ["d", "up"], ["u0"])]
    if biased:
        inits.append(init("up_b", c))
        nodes.append(helper.make_node("Add", ["u0", "up_b"], ["u"]))
    else:
        nodes.append(helper.make_node("Identity", ["u0"], ["u"]))
    nodes += [helper.make_node("Add", ["x", "u"], ["s"]), helper.make_node("Pad", ["s", "pads", "zero"], ["p"]),
              helper.make_node("MatMul", ["p", "proj"], ["m"]), helper.make_node("Add", ["m", "proj_b"], ["y0"]),
              helper.make_node("Tanh", ["y0"], ["y"])]
    graph = helper.make_graph(
        nodes, "zero_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 2 * c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.normal(size=(2, 3, 4, c)).astype(np.float32)

    def run(proto):
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    folded, report = repfold.fold(model, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    (region,) = report.regions
    assert rel_err(run(folded), run(model)) < 1e-5
    if biased:
        assert not region.folded and "pads with zeros a value with a constant" in region.reason, str(report)
        return
    assert region.folded, str(report)
    ops = sorted(n.op_type for n in folded.graph.node)
    assert ops == ["Add", "MatMul", "Pad", "Tanh"], ops
