"""Rule: an average pool is a kernel map of its input, or, where that cannot go on, an op that commutes with
the region's map and is replayed on the source.

The same window averages every channel, so ``pool(M·x + c) = M·pool(x) + c`` for any channel map ``M``
(the constant only where no window reads padding). NeXtViT's efficient attention pools its tokens for the
keys and values (``norm1 -> tokens -> AvgPool1d -> BatchNorm1d -> k, v``): both norms fold into q, k and
v, as timm's ``reparameterize_model`` merges them, on every path, judged against the eager model.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import export, fold_checked, rel_err
from torch import nn

import repfold
from repfold.frontends.fx import op_counts
from repfold.frontends.trace import set_module

C, HEADS = 16, 2


def _randomize_norms(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


class ReducedAttention(nn.Module):
    """timm NeXtViT's ``EfficientAttention``: queries from every token, keys and values from tokens averaged
    by ``sr`` and normalised by ``norm``."""

    def __init__(self, sr: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(C, C) for _ in range(4))
        self.sr, self.norm = nn.AvgPool1d(sr, sr), nn.BatchNorm1d(C)

    def forward(self, x):  # (B, N, C)
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, HEADS, -1).transpose(1, 2)
        x = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        k = self.k(x).reshape(B, -1, HEADS, C // HEADS).transpose(1, 2)
        v = self.v(x).reshape(B, -1, HEADS, C // HEADS).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """NeXtViT's transformer block, its attention half: ``x + attn(tokens(norm1(x)))``, channels first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(C)
        self.attn = ReducedAttention()

    def forward(self, x):
        x = self.stem(x)
        B, _, H, W = x.shape
        out = self.norm1(x).reshape(B, C, -1).transpose(-1, -2)
        return x + self.attn(out).transpose(-1, -2).reshape(B, C, H, W)


class PooledHead(nn.Module):
    """A norm, an average pool over the whole 8x8 map, and a classifier on the flattened result (``padding``:
    a 9x9 window over the map and a zero border, counted in the divisor)."""

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.norm = nn.BatchNorm2d(C)
        self.pool = nn.AvgPool2d(8 + padding, padding=padding)
        self.fc = nn.Linear(C, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.norm(torch.relu(self.stem(x)))), 1))


def _model(cls, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = cls(**kw).eval()
    _randomize_norms(model)
    return model


def _assert_norms_matter(model: nn.Module, x: torch.Tensor) -> None:
    """The norms the fold is to take really change the output (against the model with them as identities)."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            set_module(plain, name, nn.Identity())
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) > 1e-2


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _norms_fx(gm) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules()) + sum(
        v for k, v in op_counts(gm).items() if "batch_norm" in k)


@pytest.mark.parametrize("cls", [Block, PooledHead])
def test_a_norm_before_an_average_pool_folds_into_the_layers_after_it_fx(cls):
    model = _model(cls).double()
    x = _x().double()
    _assert_norms_matter(model, x)
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert _norms_fx(folded) == 0, op_counts(folded)
    assert all(r.folded for r in report.regions), report
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12
    pools = [m for m in folded.modules() if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d))]
    assert len(pools) == 1  # the pool replayed on the source once, for both k and v (Block)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls", [Block, PooledHead])
def test_a_norm_before_an_average_pool_folds_into_the_layers_after_it_onnx(cls, dynamo):
    ort = pytest.importorskip("onnxruntime")
    from repfold.frontends.onnx import op_counts as onnx_counts

    model = _model(cls)
    x = _x()
    _assert_norms_matter(model, x)
    proto = export(model, x, dynamo)
    folded = repfold.fold(proto)
    counts, before = onnx_counts(folded), onnx_counts(proto)
    assert "BatchNormalization" not in counts, counts
    assert counts.get("AveragePool", 0) == before.get("AveragePool", 0) == 1, counts
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {folded.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_an_adapter_before_a_pooled_attention_folds_into_q_k_v():
    model = _model(Block)
    x = _x()
    gm = repfold.insert(copy.deepcopy(model), before="attn", example_inputs=(x,))
    folded, report = fold_checked(gm, model, x)
    adapters = [r for r in report.regions if not r.scale]
    assert adapters and all(r.folded for r in adapters), report
    assert not [n for n, _ in folded.named_parameters() if "repfold_adapters" in n]
    assert sum(p.numel() for p in folded.parameters()) <= sum(p.numel() for p in model.parameters())


def test_a_shift_before_a_zero_padded_pool_stays():
    """``pool(x + c)`` holds less than ``c`` where a window reads padding: the norm's shift cannot pass the
    pool, so the norm stays, and the output is the model's."""
    model = _model(PooledHead, padding=1).double()
    x = _x().double()
    _assert_norms_matter(model, x)
    folded = repfold.fold(model, example_inputs=(x,), graph=True)
    assert _norms_fx(folded) == 1
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12
