"""Parallel branches summed into one conv: RepVGG, ACNet / DBB-style blocks, LoRA on a kxk conv.

Every block here has BatchNorm with random (non-default) statistics in its
branches; the fold must give one conv, exact in float64 and within float32
rounding, in fx, torch.export and ONNX. Where the branches cannot be one
conv exactly (different padding modes, different dilations), the block is
kept as it is and the outputs stay bitwise.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from conftest import export, rel_err
from test_cli import run
from torch import nn

import repfold
from repfold.core.affine import Kernel, NotAffine, add


def _bn(c: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return bn


class Branches(nn.Module):
    """``act(Σ_k bn_k(conv_k(x)) [+ bn(x)])``: each branch a conv (or a 1x1 then a conv) and a BatchNorm."""

    def __init__(self, c: int, convs: list, identity: bool = True, act: bool = True, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.branches = nn.ModuleList(
            nn.Sequential(*conv, _bn(next(m.out_channels for m in reversed(conv) if hasattr(m, "out_channels")), gen))
            for conv in convs)
        self.identity = _bn(c, gen) if identity else None
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        y = self.identity(x) if self.identity is not None else 0
        for b in self.branches:
            y = y + b(x)
        return self.act(y)


def conv(c, k, stride=1, pad=None, dil=1, groups=1, mode="zeros", out=None):
    k = k if isinstance(k, tuple) else (k, k)
    pad = tuple(d * (n - 1) // 2 for d, n in zip((dil, dil), k)) if pad is None else pad
    return nn.Conv2d(c, out or c, k, stride, pad, dil, groups, bias=False, padding_mode=mode)


C = 8
BLOCKS = {
    # RepVGG: 3x3 + 1x1 + identity
    "repvgg": lambda: Branches(C, [[conv(C, 3)], [conv(C, 1)]]),
    # stride 2: no identity, the 1x1 reads the 3x3's centre tap
    "repvgg-stride2": lambda: Branches(C, [[conv(C, 3, 2)], [conv(C, 1, 2)]], identity=False),
    # ACNet: 3x3 + 1x3 + 3x1, the asymmetric kernels on the square's middle row and column
    "acnet": lambda: Branches(C, [[conv(C, 3)], [conv(C, (1, 3))], [conv(C, (3, 1))]], identity=False),
    # MobileOne-style depthwise: two 3x3 branches, a 1x1 scale branch, the identity, groups kept
    "depthwise": lambda: Branches(C, [[conv(C, 3, groups=C)], [conv(C, 3, groups=C)], [conv(C, 1, groups=C)]]),
    # large + small kernel (FastViT's ReparamLargeKernelConv), dilated 3x3 beside a 5x5 of the same span
    "large-small": lambda: Branches(C, [[conv(C, 7)], [conv(C, 3)]], identity=False),
    "dilated": lambda: Branches(C, [[conv(C, 5, dil=2)], [conv(C, 1)]]),
    # DBB's 1x1 -> kxk branch, exact where the 1x1 adds no constant before the zero padding
    "dbb": lambda: Branches(C, [[conv(C, 3)], [conv(C, 1), conv(C, 3)]], identity=False),
    # the same beside a 1x1 and an identity: three branches, not an adapter's two layers beside an identity
    "dbb-identity": lambda: Branches(C, [[conv(C, 1)], [conv(C, 1), conv(C, 3)]]),
    # reflect padding on every branch that reads any
    "reflect": lambda: Branches(C, [[conv(C, 3, mode="reflect")], [conv(C, 1)]]),
    # two reflect-padded 3x3s: the exporters share one Pad between them
    "reflect2": lambda: Branches(C, [[conv(C, 3, mode="reflect")], [conv(C, 3, mode="reflect")], [conv(C, 1)]]),
    # DBB's 1x1 -> average pool branch: a pool counting its zero padding is a depthwise conv of 1/9 taps
    "avgpool": lambda: Branches(C, [[conv(C, 3)], [conv(C, 1), nn.AvgPool2d(3, 1, 1)]], identity=False),
}


class Ghost(nn.Module):
    """RepGhost's module: ``cat(y, dw(y) + bn(y))`` with ``y`` a 1x1 conv's output (then a ReLU or nothing);
    the identity branch's BatchNorm goes into the depthwise conv."""

    def __init__(self, c: int, act: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.primary = nn.Sequential(conv(c, 1), _bn(c, gen), nn.ReLU() if act else nn.Identity())
        self.cheap = Branches(c, [[conv(c, 3, groups=c)]], act=False, seed=seed + 1)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


class Twice(nn.Module):
    """FastViT's patch embedding: a large and a small depthwise kernel summed, then at once (nothing
    non-linear between) a 1x1 conv beside an identity BatchNorm: two blocks, two convs."""

    def __init__(self, c: int, seed: int = 0):
        super().__init__()
        self.large = Branches(c, [[conv(c, 7, groups=c)], [conv(c, 3, groups=c)]], identity=False, act=False,
                              seed=seed)
        self.mix = Branches(c, [[conv(c, 1)]], seed=seed + 1)

    def forward(self, x):
        return self.mix(self.large(x))


# blocks of the timm families that fold into more than one conv: (module, convs after the fold)
CHAINS = {
    "ghost-relu": (lambda: Ghost(C, act=True), 2),
    "ghost": (lambda: Ghost(C, act=False), 2),
    "large-then-1x1": (lambda: Twice(C), 2),
    # a 1x1 conv right after a block's sum (no activation) goes with the block into its 3x3
    "block-then-conv": (lambda: nn.Sequential(Branches(C, [[conv(C, 3)], [conv(C, 1)]], act=False), conv(C, 1)), 1),
}


def _convs(model) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _x(dtype=torch.float32, size=12):
    return torch.randn(2, C, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_fx_branches_become_one_conv(name, dtype, tol):
    model = BLOCKS[name]().eval().to(dtype)
    x = _x(dtype)
    with torch.no_grad():  # the other branches matter: the block is not its first branch alone
        assert rel_err(model.act(model.branches[0](x)), model(x)) > 1e-3
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < tol
    assert _convs(folded) == 1, report
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), report
    assert len(report.layered) == 1 and report.layered[0].folded, report


@pytest.mark.parametrize("name", ["repvgg", "acnet", "depthwise", "dbb", "dbb-identity", "avgpool", "reflect",
                                  "reflect2"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_branches_become_one_conv(name, dynamo):
    """(Reflect padding exports as a Pad before its Conv: the two are read as one padded conv.)"""
    model = BLOCKS[name]().eval()
    x = _x()
    proto = export(model, x, dynamo)
    folded, report = repfold.fold(proto, return_report=True)
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1, report
    assert not any(n.op_type in ("Add", "BatchNormalization") for n in folded.graph.node), report
    with torch.no_grad():
        assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("path", ["fx", "torchscript", "dynamo"])
def test_blocks_in_a_row_fold_each_into_its_conv(name, path):
    """An identity branch's BatchNorm beside the one conv of its block goes into that conv, also where the
    block reads another conv's output with nothing non-linear between (a region that ends there, and one
    that starts there)."""
    make, want = CHAINS[name]
    model = make().eval()
    x = _x()
    with torch.no_grad():
        y = model(x)
    if path == "fx":
        folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
        with torch.no_grad():
            assert rel_err(folded(x), y) < 1e-5
        assert _convs(folded) == want, report
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), report
        assert not any(n.target is operator.add for n in folded.graph.nodes), report
    else:
        folded, report = repfold.fold(export(model, x, path == "dynamo"), return_report=True)
        assert sum(n.op_type == "Conv" for n in folded.graph.node) == want, report
        assert not any(n.op_type in ("Add", "BatchNormalization") for n in folded.graph.node), report
        assert rel_err(run(folded, x.numpy()), y) < 1e-5
    assert not report.kept, report


@pytest.mark.parametrize("name", ["repvgg", "reflect"])
def test_export_branches_become_one_conv(name):
    model = BLOCKS[name]().eval()
    x = _x()
    ep = torch.export.export(model, (x,))
    folded, report = repfold.fold(ep, return_report=True)
    convs = [n for n in folded.graph.nodes if "conv" in str(n.target)]
    assert len(convs) == 1, report
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-5


@pytest.mark.parametrize("convs", [
    # a zero-padded 3x3 beside a reflect-padded one: their border taps read different things
    [[conv(C, 3)], [conv(C, 3, mode="reflect")]],
    # two dilations of one span: no one kernel holds both
    [[conv(C, 3, dil=2)], [conv(C, 5)]],
    # a 1x1 with a BatchNorm before a zero-padded 3x3: the constant would reach the padding
    [[conv(C, 3)], [conv(C, 1), nn.BatchNorm2d(C), conv(C, 3)]],
    # the same before a zero-padded average pool
    [[conv(C, 3)], [conv(C, 1), nn.BatchNorm2d(C), nn.AvgPool2d(3, 1, 1)]],
    # a pool that divides by the taps inside the input: no conv (its border taps weigh more)
    [[conv(C, 3)], [conv(C, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)]],
], ids=["padding-modes", "dilations", "constant-before-padding", "constant-before-pool-padding", "pool-without-pad"])
def test_branches_that_cannot_be_one_conv_stay(convs):
    model = Branches(C, convs, identity=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.bias.fill_(0.5)
    x = _x(torch.float64)
    model = model.double()
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10
    assert _convs(folded) > 1, report  # the branches stay branches (their BatchNorms may fold in)


class Adapted(nn.Module):
    """A conv, ReLU, then a multi-branch block: ``repfold.insert`` puts an adapter before the block."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(4)
        self.stem, self.block, self.head = nn.Conv2d(C, C, 3, padding=1), BLOCKS[name](), nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))))


def _adapted(name: str, bias: bool):
    model, x = Adapted(name).eval().double(), _x(torch.float64)
    gm = repfold.insert(model, before=["block"], example_inputs=(x,), bias=bias)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.startswith("repfold_adapters"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
        assert rel_err(gm(x), model(x)) > 1e-3
    return model, gm, x


@pytest.mark.parametrize("name", ["repvgg", "repvgg-stride2", "acnet", "large-small", "dbb"])
def test_an_adapter_before_a_multi_branch_block_folds_into_its_sum(name):
    # the adapter's sum with its identity feeds branches of one layer each: all of it is one conv
    model, gm, x = _adapted(name, bias=False)
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) < 1e-10
    assert not report.kept, report
    assert _convs(folded) == _convs(repfold.fold(model, example_inputs=(x,), graph=True)), report


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_an_adapter_before_a_multi_branch_block_folds_into_its_sum(dynamo):
    _, gm, x = _adapted("acnet", bias=False)
    gm, x = gm.float(), x.float()
    folded, report = repfold.fold(export(gm, x, dynamo), return_report=True)
    assert not report.kept and sum(n.op_type == "Conv" for n in folded.graph.node) == 3, report
    with torch.no_grad():
        assert rel_err(run(folded, x.numpy()), gm(x)) < 1e-5


@pytest.mark.parametrize("name, bias", [("repvgg", True), ("depthwise", False), ("large-small", True)])
def test_an_adapter_that_cannot_join_the_block_is_kept_whole(name, bias):
    # a bias before zero-padded convs, a dense map into depthwise ones: the region must not fold its
    # adapter's two layers into one of them (a "fold" that leaves an adapter layer running)
    _, gm, x = _adapted(name, bias)
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) < 1e-10
    assert report.kept, report
    assert not any("repfold_adapters" in into for r in report.folded for into in r.into), report
    assert any(isinstance(m, nn.Conv2d) and "repfold_adapters" in n for n, m in folded.named_modules())


class LoraConv(nn.Module):
    """PEFT's LoRA on a 3x3 conv: ``conv(x) + s·B(A(x))``, A a 3x3 conv to rank r, B a 1x1 back."""

    def __init__(self, c=C, r=2):
        super().__init__()
        torch.manual_seed(3)
        self.base = nn.Conv2d(c, c, 3, padding=1)
        self.A = nn.Conv2d(c, r, 3, padding=1, bias=False)
        self.B = nn.Conv2d(r, c, 1, bias=False)
        self.after = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.after(torch.relu(self.base(x) + 0.5 * self.B(self.A(x))))


def test_lora_on_a_kxk_conv_folds_into_it():
    model = LoraConv().eval().double()
    x = _x(torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), model.after(torch.relu(model.base(x)))) > 1e-3
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10
    assert _convs(folded) == 2 and report.layered[0].folded, report
    assert "base" in report.layered[0].into[0]


def _timm_family(name: str):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return timm, model, torch.randn(1, 3, 64, 64, generator=gen)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "repghostnet_050"])
def test_timm_reparam_families_fold_like_timm(name):
    timm, model, x = _timm_family(name)
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
        ref = timm.utils.reparameterize_model(model)
    assert _convs(folded) <= _convs(ref), report
    assert not report.kept, report


@pytest.mark.parametrize("name", ["repvit_m0_9", "fastvit_t8", "repghostnet_050"])
def test_onnx_timm_reparam_families_fold_to_timms_operators(name):
    """The export of a train-form model, folded, has no more operators of any kind than the export of
    timm's reparameterised model (which timm cannot make from an export)."""
    import collections
    import copy

    timm, model, x = _timm_family(name)
    folded, report = repfold.fold(export(model, x, False), return_report=True)
    ref = export(timm.utils.reparameterize_model(copy.deepcopy(model)), x, False)
    got, want = (collections.Counter(n.op_type for n in p.graph.node) for p in (folded, ref))
    # (not Identity: the TorchScript exporter shares equal initializers through Identity nodes, which
    # depend on which weights happen to be equal)
    assert all(n <= want[k] for k, n in got.items() if k != "Identity"), (got, want)
    with torch.no_grad():
        assert rel_err(run(folded, x.numpy()), model(x)) < 1e-5
    assert not report.kept, report


# --- the kernel-map algebra --------------------------------------------------------------


def _kernel(K, groups=1, stride=(1, 1), dil=(1, 1), start=(-1, -1), padding="zeros"):
    return Kernel(np.asarray(K, dtype=np.float64), groups, stride, dil, start, padding)


def test_a_smaller_kernel_lands_in_the_centre():
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(4, 4, 3, 3)), rng.normal(size=(4, 4, 1, 1))
    s = _kernel(big).plus(_kernel(small, start=(0, 0), padding=None))
    want = big.copy()
    want[:, :, 1, 1] += small[:, :, 0, 0]
    assert s.start == (-1, -1) and np.allclose(s.K, want)


def test_the_identity_is_a_delta_kernel_and_groups_stay():
    rng = np.random.default_rng(1)
    dw = rng.normal(size=(4, 1, 3, 3))
    s = add(_kernel(dw, groups=4), 1.0)  # the identity: the scalar map 1·I
    assert s.groups == 4
    want = dw.copy()
    want[:, 0, 1, 1] += 1
    assert np.allclose(s.K, want)


def test_kernels_that_cannot_share_taps_are_refused():
    rng = np.random.default_rng(2)
    a = _kernel(rng.normal(size=(2, 2, 3, 3)))
    with pytest.raises(NotAffine, match="stride"):
        a.plus(_kernel(rng.normal(size=(2, 2, 3, 3)), stride=(2, 2)))
    with pytest.raises(NotAffine, match="pad"):
        a.plus(_kernel(rng.normal(size=(2, 2, 3, 3)), padding="reflect"))
    with pytest.raises(NotAffine, match="matrix"):
        np.asarray(a)
