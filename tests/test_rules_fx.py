"""Each fold rule end to end on a small hand-written model: folded (exact, base operators) or refused with its reason."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn import functional as F

import repfold
from repfold.frontends.fx import op_counts

torch.manual_seed(0)


ADAPTER_TENSORS = ("A", "B", "scale", "gamma", "beta")  # adapter parameters outside adapter modules


def without_adapters(model: nn.Module) -> nn.Module:
    """A copy with every adapter weight zeroed: what the model computes without its adapters."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, ADAPTERS) or name.rpartition(".")[2] in ADAPTER_TENSORS:
                for p in m.parameters():
                    p.zero_()
        for name, p in base.named_parameters():
            if name.rpartition(".")[2] in ADAPTER_TENSORS:
                p.zero_()
    return base


def fold(model, *xs, **kw):
    """Fold ``model`` in float64 after checking its adapters change the output; (folded, report, error)."""
    model = model.double().eval()
    xs = tuple(x.double() for x in xs)
    with torch.no_grad():
        want = model(*xs)
        assert rel_err(without_adapters(model)(*xs), want) > 1e-3, "the adapters do not change the output"
    example = xs if len(xs) > 1 else xs[0]
    out, report = repfold.fold(model, example_inputs=example, return_report=True, graph=True, **kw)
    out.graph.lint()
    own = repfold.fold(model, example_inputs=example, **kw)  # the default: the model's own class, as exact
    assert type(own) is type(model)
    with torch.no_grad():
        assert rel_err(own(*xs), want) < 1e-9
        return out, report, rel_err(out(*xs), want)


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Adapter(nn.Module):
    """A channels-first RepAdapter written by hand with convs of ``dim`` spatial dimensions."""

    def __init__(self, c: int, hidden: int = 3, groups: int = 1, bias: bool = True, dim: int = 2) -> None:
        super().__init__()
        self.down = CONV[dim](c, hidden, 1, bias=bias)
        self.up = CONV[dim](hidden, c, 1, groups=groups, bias=bias)
        self.drop = nn.Dropout(0.1)
        self.s = 0.7

    def forward(self, x):
        return self.up(self.drop(self.down(x))) * self.s + x


class ConvNet(nn.Module):
    def __init__(self, adapter: nn.Module | None, conv: nn.Conv2d, after: bool = False, fan_out: bool = False) -> None:
        super().__init__()
        self.adapter, self.conv, self.after, self.fan_out = adapter, conv, after, fan_out

    def forward(self, x):
        x = torch.tanh(x)
        if self.after:
            y = self.conv(x)
            out = self.adapter(y)
            return out + torch.sigmoid(y) if self.fan_out else out
        return self.conv(self.adapter(x) if self.adapter is not None else x)


def image(c: int = 4, dim: int = 2) -> torch.Tensor:
    return torch.randn(2, c, *[6] * dim)


def test_unpadded_3x3_conv_absorbs_a_biased_adapter():
    model = ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, stride=2, dilation=1))
    out, report, err = fold(model, image())
    assert err < 1e-12 and [r.folded for r in report.regions] == [True]
    assert op_counts(out)["Conv2d"] == 1


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_take_the_constant_exactly(mode):
    model = ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode))
    _, report, err = fold(model, image())
    assert err < 1e-12 and report.regions[0].folded


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_position_copying_pads_pass_through(mode):
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter, self.conv = Adapter(4), nn.Conv2d(4, 5, 3)

        def forward(self, x):
            return self.conv(F.pad(self.adapter(torch.tanh(x)), (1, 2, 0, 1), mode=mode))

    out, report, err = fold(Padded(), image())
    assert err < 1e-12 and report.regions[0].folded
    assert op_counts(out) == {"tanh": 1, "pad": 1, "Conv2d": 1}


def test_zero_padded_conv_refuses_a_constant():
    model = ConvNet(Adapter(4), nn.Conv2d(4, 5, 3, padding=1))
    _, report, err = fold(model, image())
    assert err < 1e-12 and not report.regions[0].folded
    assert "not exact at the borders" in report.regions[0].reason


def test_zero_padded_conv_takes_an_unbiased_adapter():
    model = ConvNet(Adapter(4, bias=False), nn.Conv2d(4, 5, 3, padding=1))
    _, report, err = fold(model, image())
    assert err < 1e-12 and report.regions[0].folded


def test_dense_adapter_into_depthwise_conv_is_refused():
    model = ConvNet(Adapter(4), nn.Conv2d(4, 4, 3, groups=4))
    out, report, err = fold(model, image())
    (region,) = report.regions
    assert err < 1e-12 and not region.folded  # kept in place: the output is the adapted model's
    assert "would densify a depthwise conv: cost x4" in region.reason
    assert op_counts(out)["Conv2d"] == 3  # the adapter's two 1x1 convs are still there


@pytest.mark.parametrize("dim", [1, 3])
def test_conv1d_and_conv3d_absorb_like_conv2d(dim):
    conv = CONV[dim](4, 5, 3, stride=2, dilation=2 if dim == 1 else 1)
    out, report, err = fold(ConvNet(Adapter(4, dim=dim), conv), image(dim=dim))
    assert err < 1e-12 and report.regions[0].folded
    assert op_counts(out)[f"Conv{dim}d"] == 1


class Blocky(nn.Module):
    """A block-diagonal adapter: down and up grouped like the conv it feeds."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 2, 1, groups=2)
        self.up = nn.Conv2d(2, 4, 1, groups=2)

    def forward(self, x):
        return self.up(self.down(x)) + x


def test_grouped_adapter_fits_a_conv_with_the_same_groups():
    model = ConvNet(Blocky(), nn.Conv2d(4, 4, 3, groups=2))
    out, report, err = fold(model, image())
    assert err < 1e-12 and report.regions[0].folded
    assert op_counts(out)["Conv2d"] == 1


def test_adapter_after_a_conv_folds_backward():
    model = ConvNet(Adapter(5), nn.Conv2d(4, 5, 3, padding=1), after=True)
    _out, report, err = fold(model, image())
    assert err < 1e-12 and report.regions[0].folded
    assert report.regions[0].into == ["conv (Conv2d 3x3)"]


def test_backward_fold_refused_when_the_conv_output_feeds_more():
    model = ConvNet(Adapter(5), nn.Conv2d(4, 5, 3, padding=1), after=True, fan_out=True)
    _, report, err = fold(model, image())
    assert err < 1e-12 and not report.regions[0].folded
    assert "also feeds ops outside the region" in report.regions[0].reason


class Bottleneck(nn.Module):
    """A linear bottleneck into the next block's 1x1 conv (EfficientNet, MobileNet-V2: a projection and its
    BatchNorm, no activation, no residual), an adapter between them or not."""

    def __init__(self, adapter: bool) -> None:
        super().__init__()
        self.project, self.bn1 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.adapter = Adapter(6) if adapter else nn.Identity()
        self.expand, self.bn2 = nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.bn2(self.expand(self.adapter(self.bn1(self.project(x))))))


def test_an_adapter_between_two_layers_in_series_folds_into_one_of_them():
    """The region chains the projection, the adapter and the 1x1 conv (all linear): no one layer takes it,
    so it is cut after the projection, and the adapter folds into the conv (it was kept)."""
    out, report, err = fold(Bottleneck(adapter=True), image())
    assert err < 1e-12 and [r.folded for r in report.regions] == [True], str(report)
    assert op_counts(out)["Conv2d"] == 2 and not op_counts(out).get("BatchNorm2d")


def test_the_models_own_layers_in_series_are_no_adapter_region():
    """Without the adapter the same chain was reported as an adapter region, kept; now its BatchNorms fold."""
    model, x = Bottleneck(adapter=False).double().eval(), image().double()
    out, report = repfold.fold(model, example_inputs=x, return_report=True, graph=True)
    assert not [r for r in report.regions if not r.folded], str(report)
    assert op_counts(out)["Conv2d"] == 2 and not op_counts(out).get("BatchNorm2d")
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-12


class BlendThenAdapter(nn.Module):
    """EfficientViM's block ``x + γ·(BN(dwconv(x)) - x)`` (one conv beside an identity), then an adapter
    before a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.adapter, self.pw = Adapter(4), nn.Conv2d(4, 6, 1)
        self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        t = torch.tanh(x)
        y = t + self.gamma * (self.bn(self.dw(t)) - t)
        return self.pw(self.adapter(y))


def test_a_block_of_one_conv_beside_an_identity_sums_into_it_before_an_adapter():
    """The block and the adapter made one region, in which one conv beside an identity looks like an adapter:
    the conv started a region of its own and only its BatchNorm folded (a second fold summed the block). The
    region is now cut where the block's branches join: the block sums into its conv, the adapter into the
    1x1 conv."""
    out, report, err = fold(BlendThenAdapter(), image())
    assert err < 1e-12, str(report)
    assert op_counts(out)["Conv2d"] == 2 and not {"sub", "mul", "add", "BatchNorm2d"} & set(op_counts(out)), \
        op_counts(out)


class Tokens(nn.Module):
    """LayerNorm, then a user-written linear piece, then separate q/k/v Linears or a fused one."""

    def __init__(self, piece: nn.Module, separate: bool = False, c: int = 6) -> None:
        super().__init__()
        self.norm, self.piece, self.separate = nn.LayerNorm(c), piece, separate
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        x = self.piece(self.norm(x))
        if self.separate:
            return torch.tanh(self.q(x)) * torch.tanh(self.k(x)) + torch.tanh(self.v(x))
        return torch.tanh(self.qkv(x))


class LinearAdapter(nn.Module):
    def __init__(self, c: int = 6, r: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(c, r, bias=bias), nn.Linear(r, c, bias=bias)

    def forward(self, x):
        return x + 0.5 * self.b(self.a(x))


class PaperAdapter(nn.Module):
    """The token-form RepAdapter as the paper's public code writes it, with Conv1d on (B, C, N)."""

    def __init__(self, c: int = 6, hidden: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.conv_A = nn.Conv1d(c, hidden, 1)
        self.conv_B = nn.Conv1d(hidden, c, 1, groups=groups)
        self.dropout = nn.Dropout(0.1)
        self.s = 0.6

    def forward(self, x):
        h = x.transpose(1, 2)
        h = self.conv_B(self.dropout(self.conv_A(h))) * self.s + h
        return h.transpose(1, 2).contiguous()


ADAPTERS = (Adapter, Blocky, LinearAdapter, PaperAdapter)


class AdapterThen(nn.Module):
    """LayerNorm, a LinearAdapter, then ``after(h)``: the op under test, with a Linear ``fc`` to end in."""

    def __init__(self, out: int = 6) -> None:
        super().__init__()
        self.norm, self.ad, self.fc = nn.LayerNorm(6), LinearAdapter(), nn.Linear(6, out)

    def forward(self, x):
        return self.after(self.ad(self.norm(x)))

    def after(self, h):
        raise NotImplementedError


def tokens(c: int = 6) -> torch.Tensor:
    return torch.randn(2, 5, c)


@pytest.mark.parametrize("separate", [False, True])
def test_paper_form_with_conv1d_on_tokens_folds_into_qkv(separate):
    out, report, err = fold(Tokens(PaperAdapter(), separate=separate), tokens())
    assert err < 1e-12 and report.regions[0].folded
    counts = op_counts(out)
    assert "Conv1d" not in counts and "transpose" not in counts and "contiguous" not in counts
    assert counts["Linear"] == (3 if separate else 1)


class Functional(nn.Module):
    """A layer written with ``F.linear`` on the module's own tensors."""

    def __init__(self, piece: nn.Module, bias: bool = True) -> None:
        super().__init__()
        self.norm, self.piece = nn.LayerNorm(6), piece
        self.weight = nn.Parameter(torch.randn(4, 6))
        self.bias = nn.Parameter(torch.randn(4)) if bias else None

    def forward(self, x):
        return torch.tanh(F.linear(self.piece(self.norm(x)), self.weight, self.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_f_linear_absorbs_with_new_weights(bias):
    model = Functional(LinearAdapter(bias=bias), bias=bias).double()
    before = model.weight.detach().clone()
    out, report, err = fold(model, tokens())
    assert err < 1e-12 and report.regions[0].into == ["linear (F.linear)"]
    assert op_counts(out) == {"LayerNorm": 1, "linear": 1, "tanh": 1}
    assert sum(p.numel() for p in out.parameters()) == 12 + 24 + (4 if bias else 0)  # the base model's
    assert torch.equal(model.weight, before)  # the user's tensors are untouched


def test_f_linear_without_bias_takes_one_for_a_constant():
    """A bias-less ``F.linear`` (HF BEiT's and Swin-V2's key) takes the adapter's constant as a bias of its
    own: ``F.linear`` with a bias is no operator more. (ONNX's bare MatMul refuses: its Add would be one.)"""
    out, report, err = fold(Functional(LinearAdapter(), bias=False), tokens())
    assert err < 1e-12 and report.regions[0].folded and report.regions[0].new_bias == 4
    assert op_counts(out) == {"LayerNorm": 1, "linear": 1, "tanh": 1}
    assert sum(p.numel() for p in out.parameters()) == 12 + 24 + 4  # the base model's, and the new bias


def test_linear_form_adapter_folds_into_separate_q_k_v():
    out, report, err = fold(Tokens(LinearAdapter(), separate=True), tokens())
    assert err < 1e-12 and report.regions[0].folded and len(report.regions[0].into) == 3
    assert op_counts(out)["Linear"] == 3  # q, k and v (the fused qkv is not called here)


def test_chain_with_batchnorm_and_scale_shift():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.ad = LinearAdapter()
            self.bn = nn.BatchNorm1d(6)
            self.gamma = nn.Parameter(torch.randn(6))
            self.beta = nn.Parameter(torch.randn(6))

        def forward(self, x):
            x = self.ad(x) * self.gamma + self.beta
            return self.bn(x.transpose(1, 2)).transpose(1, 2)

    with torch.no_grad():
        chain = Chain()
        chain.bn.running_mean.normal_()
        chain.bn.running_var.uniform_(0.5, 2)
    out, report, err = fold(Tokens(chain), tokens())
    assert err < 1e-12 and report.regions[0].folded
    assert "BatchNorm1d" not in op_counts(out)


class LoRA(nn.Module):
    def __init__(self, c: int = 6, r: int = 2) -> None:
        super().__init__()
        self.norm, self.layer = nn.LayerNorm(c), nn.Linear(c, 2 * c)
        self.A, self.B = nn.Linear(c, r, bias=False), nn.Linear(r, 2 * c, bias=False)

    def forward(self, x):
        x = self.norm(x)
        return torch.tanh(self.layer(x) + 0.3 * self.B(self.A(x)))


def test_lora_branch_collapses_into_its_layer():
    out, report, err = fold(LoRA(), tokens())
    assert err < 1e-12 and report.regions[0].into == ["layer (Linear)"]
    assert op_counts(out)["Linear"] == 1


def test_scale_only_regions_fold_by_default():
    class IA3(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(6), nn.Linear(6, 4)
            self.scale = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            return torch.tanh(self.fc(self.norm(x) * self.scale))

    x = tokens()
    out, report, err = fold(IA3(), x, scales=False)
    assert report.regions == []  # with scales=False a lone scale is the model's own (LayerScale-like)
    assert err < 1e-12 and op_counts(out)["mul"] == 1  # left as it is
    out, report, err = fold(IA3(), x)
    (region,) = report.regions
    assert err < 1e-12 and region.folded and region.scale and region.into == ["fc (Linear)"]
    assert "mul" not in op_counts(out) and "scales and shifts only folded" in str(report)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_models_own_shift_folds_into_a_bias_less_layer_only_per_channel(per_channel):
    """CAFormer's StarReLU ``s · relu(x)² + b`` (one number each) before its bias-free ``fc2``: folding would
    give ``fc2`` a bias of its width for one number, more parameters than the model has: left as it is. A
    per-channel shift (SSF's, BatchNorm's) folds: the new bias replaces as many values of the model's own."""
    class StarReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6, bias=False)
            n = 8 if per_channel else 1
            self.s, self.b = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))

        def forward(self, x):
            return self.fc2(self.s * F.relu(self.fc1(x)) ** 2 + self.b)

    model, x = StarReLU().double().eval(), tokens().double()
    out, report = repfold.fold(model, example_inputs=x, return_report=True, graph=True)
    with torch.no_grad():
        err = rel_err(out(x), model(x))
    params = sum(p.numel() for p in model.parameters())
    if per_channel:
        (region,) = report.regions
        assert err < 1e-12 and region.folded and region.into == ["fc2 (Linear)"]
        assert report.params_after == params - 8 - 8 + 6  # s and b gone, fc2 took a bias
    else:
        assert report.regions == [] and err == 0 and report.params_after == params


@pytest.mark.parametrize("kdim", [None, 5])
def test_multihead_attention_absorbs_per_slot(kdim):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.ad = nn.LayerNorm(6), LinearAdapter()
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True, kdim=kdim, vdim=kdim)

        def forward(self, x, ctx):
            h = self.ad(self.norm(x))
            kv = h if kdim is None else ctx
            return self.mha(h, kv, kv, need_weights=False)[0]

    _, report, err = fold(Attn(), tokens(), torch.randn(2, 3, kdim or 6))
    assert err < 1e-12 and report.regions[0].into == ["mha (MultiheadAttention)"]


def test_fan_out_to_a_consumer_that_cannot_absorb_names_it():
    class Fan(AdapterThen):
        def after(self, h):
            return self.fc(h) + torch.sigmoid(h)

    _, report, err = fold(Fan(), tokens())
    assert err < 1e-12 and not report.regions[0].folded
    assert "sigmoid" in report.regions[0].reason


def test_tied_weights_are_not_changed_for_the_other_user():
    model = Tokens(LinearAdapter()).double().eval()
    model.q.weight = model.qkv.weight.__class__(model.qkv.weight[:6].clone())
    shared = nn.Linear(6, 18).double()
    model.qkv, model.other = shared, shared  # one module, used once here and once below

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # both users' outputs, element by element
            return torch.cat([self.inner(x), self.inner.other(torch.tanh(x))], dim=-1)

    twice = Twice(model).double().eval()
    before = shared.weight.detach().clone()
    x = tokens().double()
    out, report, err = fold(twice, x)
    assert err < 1e-12 and report.regions[0].folded
    assert torch.equal(shared.weight, before)
    with torch.no_grad():  # the other user reads the tied weight as it was: its half of the output is unchanged
        assert torch.equal(out(x)[..., 18:], twice(x)[..., 18:])


def _upcast(model):
    import copy

    return copy.deepcopy(model).double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float64_and_casts_once(dtype):
    half = Tokens(LinearAdapter()).eval().to(dtype)
    x = tokens()
    ref, ref_report, ref_err = fold(_upcast(half), x)  # the same fold, in float64 throughout
    assert ref_err < 1e-12 and [r.folded for r in ref_report.regions] == [True]
    out, report = repfold.fold(half, example_inputs=x.to(dtype), return_report=True, graph=True)
    (region,) = report.regions
    assert region.folded and region.into == ["qkv (Linear)"]
    assert out.get_submodule("qkv").weight.dtype == dtype
    got = out.get_submodule("qkv").weight.double()
    exact = ref.get_submodule("qkv").weight
    assert torch.equal(got, exact.to(dtype).double())  # one rounding, of the float64 result
    with torch.no_grad():
        moved = [(new.double() - old).abs().max() for new, old in zip(out.qkv.parameters(), ref.qkv.parameters())]
    rounding = float(max(moved))
    assert region.dtype == str(dtype).removeprefix("torch.") and region.rounding == pytest.approx(rounding)
    assert 0 < region.rounding <= HALF_EPS[dtype] * float(exact.detach().abs().max())  # at most one rounding
    assert f"cast to {region.dtype}: weights moved by up to {region.rounding:.1e}" in region.line()
    with torch.no_grad():  # the folded half model is as close to the float64 one as the unfolded half model
        want = ref(x.double())
        unfolded, folded = rel_err(half(x.to(dtype)), want), rel_err(out(x.to(dtype)), want)
    assert folded <= 2 * unfolded + HALF_EPS[dtype], (folded, unfolded)


HALF_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # half a unit in the last place, relative


@pytest.mark.parametrize("mode, pads", [("constant", (0, 0)), ("replicate", (1, 2)), ("circular", (2, 1)),
                                        ("reflect", (2, 0))])
def test_functional_pad_and_roll_pass_through(mode, pads):
    """Tokens rolled, and padded along the sequence axis by a position-copying mode (or by zero amounts)."""

    class Shift(AdapterThen):
        def after(self, h):
            h = F.pad(torch.roll(h, shifts=1, dims=1).transpose(1, 2), pads, mode=mode).transpose(1, 2)
            n = 5 + sum(pads)
            return torch.tanh(self.fc(h.reshape(2 * n, 6).reshape(2, n, 6)))

    out, report, err = fold(Shift(), tokens())
    assert err < 1e-12 and report.regions[0].folded
    layout = {"transpose": 2, "pad": 1} if any(pads) else {}  # a pad by zero amounts goes, with its transposes
    assert op_counts(out) == {"LayerNorm": 1, "roll": 1, **layout, "Linear": 1, "tanh": 1}


def test_zero_value_pad_by_a_non_zero_amount_ends_the_region():
    """New positions of a constant pad hold 0, not the adapter's constant: the region cannot reach fc."""

    class Padded(AdapterThen):
        def after(self, h):
            return torch.tanh(self.fc(F.pad(h, (0, 0, 1, 2))))

    _out, report, err = fold(Padded(), tokens())
    (region,) = report.regions
    assert err < 1e-12 and not region.folded
    assert "no layer can absorb it" in region.reason and "pad" in region.reason


class _HadamardDelta(nn.Module):
    """A LoHa-style layer: ``W x + ((A₁B₁) ⊙ (A₂B₂)) x``, its ΔW computed at run time from parameters alone
    (cast to the input's dtype, as PEFT writes it)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(6, 5)
        gen = torch.Generator().manual_seed(4)
        self.A, self.B = (nn.Parameter(torch.randn(2, *s, generator=gen)) for s in ((5, 2), (2, 6)))

    def forward(self, x):
        delta = ((self.A[0] @ self.B[0]) * (self.A[1] @ self.B[1])).to(x.dtype)
        return torch.tanh(self.base(x) + F.linear(x, delta))


def test_a_weight_computed_from_parameters_is_evaluated_and_its_subgraph_goes():
    out, report, err = fold(_HadamardDelta(), tokens())
    (region,) = report.regions
    assert err < 1e-12 and region.folded and region.into == ["base (Linear)"], str(report)  # the stored layer
    counts = op_counts(out)
    assert "matmul" not in counts and "mul" not in counts and "linear" not in counts, counts
    assert sum(p.numel() for p in out.parameters()) == 6 * 5 + 5
    assert "to" not in counts  # the cast went with the subgraph


class _WrittenDelta(nn.Module):
    """A ΔW built by writing into a fresh tensor that is read again afterwards: not a constant to the fold
    (only a write whose result is the only reader of the tensor is taken as a pure op)."""

    def __init__(self):
        super().__init__()
        self.base, self.A = nn.Linear(6, 5), nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        delta = torch.zeros(5, 6, dtype=x.dtype)
        delta.narrow(1, 0, 3).copy_(self.A[:, :3])
        return torch.tanh(self.base(x) + F.linear(x, delta))


def test_a_weight_written_in_place_is_not_taken_for_a_constant():
    _, report, err = fold(_WrittenDelta(), tokens())
    assert err < 1e-12 and not report.folded, str(report)  # left as it is: exact
