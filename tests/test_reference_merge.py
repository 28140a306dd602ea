"""Folds that must cost no more operators than the ecosystem's own merge (timm's ``reparameterize_model``).

Each model here is built from timm's own blocks, with random BatchNorm
statistics; its fold must compute what the model computes and have, op kind
by op kind, no more operators than timm's merged model traced, exported or
written to ONNX the same way:

* LeViT's ``LinearNorm``: a BatchNorm1d over the tokens flattened into the
  batch (``bn(linear(x).flatten(0, 1)).reshape_as(x)``), one after another
  without an activation between (LeViT's downsampling stages);
* FastViT's MobileOne block and RepMixer on the torch.export path, where
  timm's ``out += branch(x)`` is an in-place ``aten.add_``.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from conftest import export, rel_err
from test_cli import run
from torch import nn

import repfold
from repfold._fx import op_counts

timm = pytest.importorskip("timm")
from timm.models.fastvit import MobileOneBlock, RepMixer
from timm.models.levit import LinearNorm
from timm.utils.model import reparameterize_model


def _randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


class _Residual(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.m = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.m(x)


def _levit(dtype=torch.float64) -> nn.Module:
    """LinearNorms as LeViT chains them: after an activation, and one into the next through a residual (its
    downsampling stage's attention projection into its MLP)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GELU(), LinearNorm(16, 32), _Residual(LinearNorm(32, 64), nn.GELU(), LinearNorm(64, 32)),
                          nn.GELU(), LinearNorm(32, 8))
    return _randomize_bns(model).to(dtype)


def _aten(ep) -> collections.Counter:
    return collections.Counter(str(n.target.overloadpacket).rstrip("_") for n in ep.graph.nodes
                               if n.op == "call_function" and hasattr(n.target, "overloadpacket"))


def _at_most(got: collections.Counter, want: collections.Counter, skip=()) -> None:
    more = {k: (n, want[k]) for k, n in got.items() if n > want[k] and k not in skip}
    assert not more, f"more operators than timm's merge (folded, timm): {more}"


def _x(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


# --- LeViT: BatchNorm1d over tokens flattened into the batch -----------------------------------------


def test_levit_linear_norm_folds_fx():
    model, x = _levit(), _x(2, 5, 16)
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10
    got = op_counts(folded)
    assert not any("BatchNorm" in k for k in got), (got, report)
    assert not any(k in got for k in ("flatten", "reshape_as")), got
    want = op_counts(torch.fx.symbolic_trace(reparameterize_model(model)))
    _at_most(collections.Counter(got), collections.Counter(want))


def test_levit_linear_norm_folds_export():
    model, x = _levit(), _x(2, 5, 16)
    ep = torch.export.export(model, (x,), strict=False)
    folded, report = repfold.fold(ep, return_report=True)
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-10
    got = _aten(folded)
    assert got["aten.batch_norm"] == 0, (got, report)
    _at_most(got, _aten(torch.export.export(reparameterize_model(model), (x,), strict=False)))


def test_levit_linear_norm_folds_onnx():
    """The TorchScript exporter writes a bias-less Linear as a bare MatMul: it takes the BatchNorm's shift
    with an Add that replaces the BatchNorm (timm's merge is a Linear with a bias: MatMul + Add)."""
    model, x = _levit(torch.float32), _x(2, 5, 16, dtype=torch.float32)
    folded, report = repfold.fold(export(model, x, False), return_report=True)
    got = collections.Counter(n.op_type for n in folded.graph.node)
    assert got["BatchNormalization"] == 0 and got["Flatten"] == 0, (got, report)
    want = collections.Counter(n.op_type for n in export(reparameterize_model(copy.deepcopy(model)), x, False).graph.node)
    _at_most(got, want, skip=("Identity",))
    with torch.no_grad():
        assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5


def test_bare_matmul_takes_a_bias_only_for_a_shift_of_the_models_own():
    """ONNX's bare MatMul takes a region's constant (as a MatMul + Add) only while the planner settles a
    region of the model's own scales (``shift_adds``), which it keeps unless the Add replaces a per-channel
    shift (a BatchNorm's); an adapter's constant still finds no bias there."""
    from repfold.patterns.linear import Dense

    from repfold._affine import Affine, Channels, NotAffine

    ch = Channels()
    ch.source("x", (2, 5, 3))
    ch.axis["x"] = 2
    v = Affine("x", (2, 5, 3), np.eye(3), np.arange(1.0, 4.0))
    matmul = Dense(np.eye(3), None, axis=2, kind="MatMul", takes_bias="add")
    with pytest.raises(NotAffine, match="no bias"):
        matmul.absorb(v, ch)
    ch.shift_adds = True
    np.testing.assert_array_equal(matmul.absorb(v, ch)[1], np.arange(1.0, 4.0))


def test_onnx_bare_matmul_takes_no_adapter_constant():
    """A Linear with a bias into a bias-less one (two layers, one exit: collapsed as an adapter's would be):
    the constant goes into the layer that has an Add already, never as a new Add after the bare MatMul."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.GELU(), nn.Linear(8, 8, bias=True),
                          nn.Linear(8, 8, bias=False), nn.GELU()).eval()
    x = _x(2, 3, 8, dtype=torch.float32)
    proto = export(model, x, False)
    folded, report = repfold.fold(proto, return_report=True)
    got = collections.Counter(n.op_type for n in folded.graph.node)
    before = collections.Counter(n.op_type for n in proto.graph.node)
    assert got["MatMul"] == before["MatMul"] - 1 and got["Add"] == before["Add"], (got, before, report)
    with torch.no_grad():
        assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5


# --- FastViT on torch.export: ``out += branch(x)`` as aten.add_ ---------------------------------------


def _fastvit_blocks(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        MobileOneBlock(8, 8, 3, stride=1, group_size=0, num_conv_branches=2, use_scale_branch=True),
        MobileOneBlock(8, 8, 3, stride=1, group_size=1, num_conv_branches=1, use_scale_branch=True),
        RepMixer(8, kernel_size=3, layer_scale_init_value=0.5),
    )
    with torch.no_grad():
        model[2].layer_scale.gamma.normal_()
    return _randomize_bns(model).to(dtype)


def test_fastvit_blocks_merge_export():
    model, x = _fastvit_blocks(), _x(1, 8, 9, 9)
    ep = torch.export.export(model, (x,), strict=False)
    before = _aten(ep)
    assert before["aten.add"] > 0 and any(n.target is torch.ops.aten.add_.Tensor for n in ep.graph.nodes)
    folded, report = repfold.fold(ep, return_report=True)
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-10
    got = _aten(folded)
    _at_most(got, _aten(torch.export.export(reparameterize_model(model), (x,), strict=False)))
    assert got["aten.batch_norm"] == 0 and got["aten.add"] == 0 and got["aten.sub"] == 0, (got, report)
    assert got["aten.conv2d"] == 3, (got, report)


class _WritesItsInput(nn.Module):
    """``x += conv(x)`` into the caller's tensor, and ``y += bn(y)`` into a value read again: writes that are
    not a private sum, left as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = y * 1.0
        y += self.bn(z)
        return y + z


def test_export_in_place_sum_kept_where_read_again():
    model = _randomize_bns(_WritesItsInput()).double()
    x = _x(1, 4, 5, 5)
    ep = torch.export.export(model, (x,), strict=False)
    folded = repfold.fold(ep)
    with torch.no_grad():
        np.testing.assert_allclose(folded.module()(x.clone()).numpy(), model(x.clone()).numpy(), rtol=1e-10, atol=1e-12)
