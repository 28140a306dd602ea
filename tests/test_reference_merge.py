"""Folds that must cost no more operators than the ecosystem's own merge (timm's ``reparameterize_model``).

Each model here is built from timm's own blocks, with random BatchNorm
statistics; its fold must compute what the model computes and have, op kind
by op kind, no more operators than timm's merged model traced, exported or
written to ONNX the same way:

* LeViT's ``LinearNorm``: a BatchNorm1d over the tokens flattened into the
  batch (``bn(linear(x).flatten(0, 1)).reshape_as(x)``), one after another
  without an activation between (LeViT's downsampling stages);
* FastViT's MobileOne block and RepMixer on the torch.export path, where
  timm's ``out += branch(x)`` is an in-place ``aten.add_``;
* iFormer's ``RepCPE`` (``x + BN(dwconv(x))``, the identity summed into the
  depthwise kernel) before an attention that flattens the positions;
* YOLOv10's head, whose one-to-many branch export mode computes and no longer
  returns: torch.export keeps it, ultralytics' ``fuse()`` drops it;
* BatchNorms inside a block torch.fx keeps whole (TinyViT's ``TinyVitBlock``,
  EfficientViT-MSRA's ``LocalWindowAttention``, which timm registers as not
  traceable): timm's merge fuses them, and so does the fold;
* the attention mask that masks nothing, which Hugging Face models build under
  torch.export (and skip under ``jit.trace``): the graph ``insert`` returns,
  and the fold of an ExportedProgram, call attention without it;
* NextViT's ``NextTransformerBlock``: the BatchNorm1d after the keys' average
  pooling into k and v (one transpose copied for both). Known and left: its
  ``norm1`` (after the patch embedding's folded BatchNorm and a token
  transpose, and with ``sr_ratio > 1`` reaching k/v through the pooling, which
  the algebra cannot carry) stays where timm merges it into q/k/v.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from conftest import export, randomize_adapters, rel_err
from test_cli import run
from torch import nn
from torch.nn import functional as F

import repfold
from repfold.frontends.fx import op_counts

timm = pytest.importorskip("timm")
from timm.models.fastvit import MobileOneBlock, RepMixer
from timm.models.iformer import ConvNorm, RepCPE
from timm.models.levit import LinearNorm
from timm.models.nextvit import NextTransformerBlock
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
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
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

    from repfold.core.affine import Affine, Channels, NotAffine

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


# --- iFormer: RepCPE's identity into its depthwise conv, before an attention's flatten -------------------


class _Tokens(nn.Module):
    """An attention's entry as iFormer's: 1x1 convs with BatchNorms, then the positions flattened into tokens."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.q, self.k = ConvNorm(c, c), ConvNorm(c, c)

    def forward(self, x):
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        return x + (k @ (q.transpose(1, 2) @ k).softmax(-1).transpose(1, 2)).reshape(x.shape)


def _iformer(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(ConvNorm(3, 8, 3, 1, 1), nn.GELU(), RepCPE(8, 3), _Tokens(8), RepCPE(8, 3), _Tokens(8))
    return _randomize_bns(model).to(dtype)


@pytest.mark.parametrize("path", ["fx", "export", "onnx"])
def test_iformer_rep_cpe_identity_sums_into_its_conv(path):
    """The kernel map of RepCPE's conv ends at the attention's flatten; its sum with the identity beside it
    still folds into the conv (before: the conv started a region of its own, and the Add stayed)."""
    dtype = torch.float32 if path == "onnx" else torch.float64
    model, x = _iformer(dtype), _x(1, 3, 6, 6, dtype=dtype)
    merged = reparameterize_model(copy.deepcopy(model))
    if path == "fx":
        folded = repfold.fold(model, example_inputs=(x,), graph=True)
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-10
        got, want = collections.Counter(op_counts(folded)), collections.Counter(op_counts(torch.fx.symbolic_trace(merged)))
    elif path == "export":
        folded = repfold.fold(torch.export.export(model, (x,), strict=False))
        with torch.no_grad():
            assert rel_err(folded.module()(x), model(x)) < 1e-10
        got, want = _aten(folded), _aten(torch.export.export(merged, (x,), strict=False))
    else:
        folded = repfold.fold(export(model, x, False))
        with torch.no_grad():
            assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5
        got = collections.Counter(n.op_type for n in folded.graph.node)
        want = collections.Counter(n.op_type for n in export(merged, x, False).graph.node)
    _at_most(got, want, skip=("Identity", "Constant"))


# --- YOLOv10: a branch torch.export keeps that nothing reads ------------------------------------------


class _DeadBranch(nn.Module):
    """A head that computes a second branch and returns the first only (YOLOv10's one-to-many head in export
    mode), and a buffer it writes in place whose result nobody reads."""

    def __init__(self, writes: bool = True) -> None:
        super().__init__()
        self.writes = writes
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.one = nn.Conv2d(8, 4, 1)
        self.many = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        y = self.stem(x)
        self.many(y)  # computed, not returned
        if self.writes:
            self.calls.add_(1)
        return self.one(y)


def test_export_drops_a_branch_nobody_reads_and_keeps_writes():
    model = _randomize_bns(_DeadBranch()).double()
    x = _x(1, 3, 6, 6)
    ep = torch.export.export(model, (x,), strict=False)
    assert _aten(ep)["aten.conv2d"] == 4
    folded, report = repfold.fold(ep, return_report=True)
    assert _aten(folded)["aten.conv2d"] == 2 and _aten(folded)["aten.batch_norm"] == 0, report
    assert not any(k.startswith("many.") for k in folded.state_dict), list(folded.state_dict)
    module = folded.module()
    with torch.no_grad():
        assert rel_err(module(x), model(x)) < 1e-10
        calls = float(module.calls)
        module(x)
    assert float(module.calls) == calls + 1  # the in-place write, read by nobody, still runs
    # a torch.fx trace keeps what it computes (a Python-level op may write without saying so)
    model.writes = False  # (torch.fx refuses a forward that writes a buffer)
    fx_folded = repfold.fold(model, example_inputs=(x,), graph=True)
    assert sum(1 for n in fx_folded.graph.nodes if n.op == "call_module" and n.target.startswith("many")) == 2


# --- TinyViT / EfficientViT-MSRA: BatchNorms inside a block fx keeps whole -------------------------------


class _Windowed(nn.Module):
    """A block fx cannot trace (control flow on the input's size), with conv + BatchNorm submodules and a
    submodule attribute its forward reads (EfficientViT-MSRA's ``self.attn.resolution``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.local = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.mix = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.mix.size = 4

    def forward(self, x):
        if x.shape[-1] > self.mix.size:  # (not traceable)
            x = x + self.local(x)
        return x + self.mix(x)


def test_batch_norms_fold_inside_a_block_fx_keeps_whole():
    torch.manual_seed(0)
    model = _randomize_bns(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Windowed(8), nn.GELU(), _Windowed(8))).double()
    x = _x(1, 3, 6, 6)
    folded, report = repfold.fold(model, example_inputs=(x,), leaf_modules=(_Windowed,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), report
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in reparameterize_model_bn(model).parameters())
    assert any(r.source.startswith("1.local") and r.folded for r in report.regions), report
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in folded.parameters())


def reparameterize_model_bn(model: nn.Module) -> nn.Module:
    """``model`` with every conv + BatchNorm pair of a Sequential fused, as timm's ``ConvNorm.fuse()`` does."""
    merged = copy.deepcopy(model)
    for m in merged.modules():
        if isinstance(m, nn.Sequential):
            for k in range(len(m) - 1):
                if isinstance(m[k], nn.Conv2d) and isinstance(m[k + 1], nn.BatchNorm2d):
                    m[k] = torch.nn.utils.fusion.fuse_conv_bn_eval(m[k], m[k + 1])
                    m[k + 1] = nn.Identity()
    return merged


# --- Hugging Face under torch.export: an attention mask that masks nothing ---------------------------------


class _Masked(nn.Module):
    """Attention with a mask made from constants: all True (Hugging Face's bidirectional mask under
    torch.export) or causal (a mask that masks)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        n = x.shape[1]
        keep = torch.arange(n) >= 0
        mask = keep[None, None, None, :].expand(1, 1, n, n)
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("causal", [False, True])
def test_a_mask_that_masks_nothing_is_dropped(causal):
    torch.manual_seed(0)
    model, x = _Masked(causal).double().eval(), _x(1, 5, 8)
    ep = torch.export.export(model, (x,), strict=False)
    folded = repfold.fold(ep)

    def masks(graph):
        sdpa = [n for n in graph.nodes if "scaled_dot_product_attention" in str(n.target)]
        return [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in sdpa]

    assert masks(ep.graph) != [None]
    assert (masks(folded.graph) == [None]) is not causal
    gm = repfold.insert(ep.module(), before=["proj"], example_inputs=(x,))
    assert (masks(gm.graph) == [None]) is not causal
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-10
        assert rel_err(gm(x), model(x)) < 1e-10  # (the adapter starts as an identity)
    randomize_adapters(gm)
    gm.eval()
    gm_folded = repfold.fold(gm)
    assert (masks(gm_folded.graph) == [None]) is not causal
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3  # the trained adapter changes the output
        assert rel_err(gm_folded(x), gm(x)) < 1e-10


# --- NextViT: BatchNorms before the attention's q/k/v ----------------------------------------------------


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_nextvit_block_pooled_norm_folds_into_kv(sr_ratio):
    torch.manual_seed(0)
    model = _randomize_bns(NextTransformerBlock(128, 128, drop_path=0.0, sr_ratio=sr_ratio)).double()
    x = _x(1, 128, 4, 4)
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10
    norms = [n.target for n in folded.graph.nodes if n.op == "call_module" and "norm" in n.target]
    assert norms == ["norm1"], (norms, report)  # (the known gap, above)
    merged = copy.deepcopy(model)
    merged.reparameterize()
    want = collections.Counter(op_counts(torch.fx.symbolic_trace(merged)))
    want["BatchNorm2d"] += 1
    _at_most(collections.Counter(op_counts(folded)), want)


# --- CoaT: a positional conv shared by the blocks of a stage ---------------------------------------------


class _SharedPosConv(nn.Module):
    """CoaT-Lite's ``ConvPosEnc``, one module every block of a stage calls: ``x + dwconv(x)``, then flattened."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.blocks = nn.ModuleList([nn.Linear(c, c) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = self.cpe(x) + x
            b, c, h, w = x.shape
            x = block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        return x


@pytest.mark.parametrize("path", ["fx", "onnx"])
def test_a_shared_conv_takes_no_copy_of_the_models_own_sum(path):
    """Summing the identity into one call of a conv other calls read too would copy its weights (+ the conv's
    values per call): the model's own sum stays (an adapter's region still folds into such a layer)."""
    torch.manual_seed(0)
    model, x = _SharedPosConv().eval(), _x(1, 8, 4, 4, dtype=torch.float32)
    if path == "fx":
        folded = repfold.fold(model, example_inputs=(x,), graph=True)
        n_params = sum(p.numel() for p in folded.parameters())
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-6
    else:
        from repfold.frontends.onnx import n_params as onnx_params

        proto = export(model, x, False)
        folded = repfold.fold(proto)
        n_params = onnx_params(folded)
        assert n_params <= onnx_params(proto)
        assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5
    assert n_params <= sum(p.numel() for p in model.parameters())


# --- GhostNet: a slice of every channel, which torch.export writes as an alias -----------------------------


class _FullSlice(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c = c

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))[:, : self.c] * 2  # (GhostNet's ``out[:, :self.out_chs]``)


def test_an_alias_stays_a_view_after_a_fold():
    """torch.export writes a slice of every channel as ``aten.alias``; the fold reads it as the identity, and the
    folded program must not copy where the model viewed (GhostNet's export path had 32 ``aten.clone`` more)."""
    model, x = _randomize_bns(_FullSlice()).double(), _x(1, 3, 5, 5)
    ep = torch.export.export(model, (x,), strict=False)
    assert _aten(ep)["aten.alias"] == 1
    folded = repfold.fold(ep)
    got = _aten(folded)
    assert got["aten.clone"] == 0 and got["aten.batch_norm"] == 0, got
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-10
    gm = repfold.fold(model, example_inputs=(x,), graph=True)  # (fx: no alias, nothing to restore)
    assert not any(n.target == "clone" for n in gm.graph.nodes)
