"""Regressions for the defects models nobody here wrote exposed (issue 13), each on a small model of its own.

* torchvision MViT: fx's dead-code pass deleted in-place writes whose result is unread;
* timm BoTNet / HaloNet / LambdaNet / ResNeXt-ts: adapters on a spatial axis;
* timm Swin-T stage 4: a shape read kept a region reported folded running;
* timm XCiT: the ONNX fold read a whole concatenation where the layer read a token slice;
* PEFT VeRA: a factored map scaled per channel crashed the fold, reported as bad input;
* timm TResNet: an adapter after the space-to-depth stem formed no region, and the report left it out;
* timm SAM2 Hiera (TorchScript ONNX): shapes lost after a tiled position table hid every region;
* torchvision MaxViT: a BatchNorm's fold copied layout ops that stayed anyway (more operators).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import export, randomize_adapters, rel_err
from test_cli import run
from torch import nn

import repfold
from repfold import cli as _cli
from repfold.adapters.modules import RepAdapter
from repfold.frontends.onnx import n_params


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _add_rel_pos(h: torch.Tensor) -> torch.Tensor:
    h[:, 1:, 1:] += 0.5  # as MViT's relative positions: getitem, iadd, setitem
    return h


def _add_shortcut(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h[:, 0] = h[:, 0] + s[:, 0]  # a setitem, in a function whose result MViT never reads
    return h


torch.fx.wrap("_add_rel_pos")
torch.fx.wrap("_add_shortcut")


class Effects(nn.Module):
    """In-place writes whose results nobody reads (methods, functions, modules, setitem and ``+=`` on a
    slice inside wrapped functions, as MViT has them), an assert and a random draw: each changes the
    output, and none of their results is read."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        _add_rel_pos(h)
        _add_shortcut(h, x * 0.5)  # (a wrapped call may write every tensor it is given: not the input)
        g = h * 1.0
        g.mul_(3.0)  # a method, result unread
        torch.relu_(g)  # a function, result unread
        self.act(g)  # a module with inplace=True, result unread
        torch._assert(h.shape[1] == 4, "four tokens")
        torch.rand_like(g)  # a random draw, unread: removing it would shift the next one
        return g + torch.rand_like(g)


def test_fold_with_nothing_to_fold_is_bitwise_equal_with_in_place_ops_asserts_and_random_ops():
    torch.manual_seed(0)
    model = Effects().eval()
    x = torch.randn(2, 4, 8)
    folded, report = repfold.fold(copy.deepcopy(model), example_inputs=(x,), return_report=True, graph=True)
    assert report.regions == []
    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    want = reference(x)
    torch.manual_seed(3)
    got = folded(x)
    assert _same_bits(got, want)


def test_mvit_style_in_place_writes_survive_a_fold_with_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), Effects()).eval()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    model = model.double()
    gm = repfold.insert(model, before=["1.fc"], example_inputs=x, axis=-1)
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    assert [r.folded for r in report.regions] == [True]
    torch.manual_seed(5)
    want = copy.deepcopy(gm)(x)
    torch.manual_seed(5)
    got = copy.deepcopy(folded)(x)
    torch.manual_seed(5)
    assert rel_err(copy.deepcopy(model)(x), want) > 1e-3  # the adapter matters
    assert rel_err(got, want) < 1e-10
    assert report.params_after <= sum(p.numel() for p in model.parameters())  # (BatchNorm folds too)


class WrittenSource(nn.Module):
    """An adapter (written by hand) reads ``h``, which is then written in place before the layer reads
    the adapter: folding would have the layer read the written ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.adapter = RepAdapter(8, 4, 2, rank=3)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        h = self.norm(x)
        a = self.adapter(h)
        h.mul_(2.0)
        return self.fc(a) + h.sum(-1, keepdim=True)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1.0)
        return self.fc(x) + self.calls


def test_a_buffer_written_in_forward_that_fx_cannot_record_is_refused():
    model = Counter().eval()
    with pytest.raises(repfold.TraceError, match="writes buffer 'calls'"):
        repfold.fold(model, example_inputs=(torch.randn(2, 4),), graph=True)
    assert model.calls.item() == 0  # the caller's model is untouched


def test_a_source_written_in_place_is_kept_with_the_reason():
    torch.manual_seed(0)
    model = WrittenSource().double().eval()
    randomize_adapters_module(model.adapter)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert rel_err(model(x), without_adapter(model)(x)) > 1e-3  # the adapter matters
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert len(report.regions) == 1 and not report.regions[0].folded
    assert "written in place" in report.regions[0].reason
    assert torch.allclose(folded(x), model(x), rtol=0, atol=1e-12)


class WrittenInside(nn.Module):
    """A value inside a region, ``layer(h) + lora(h)``, written in place before the next layer reads it:
    through an ``nn.Identity`` (the same tensor), directly, or through a view (the property generator's
    blocks without activation, with in-place effects after each unit)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.layer, self.lora, self.next = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.identity, self.how = nn.Identity(), how

    def forward(self, x):
        t = torch.tanh(x)
        y = self.layer(t) + self.lora(t)
        if self.how == "identity":
            z = self.identity(y)
            z.mul_(1.5)
            torch.relu_(z)
        elif self.how == "direct":
            torch.relu_(y)
        else:
            torch.relu_(y.view(-1, 4))
        return self.next(y)


@pytest.mark.parametrize("how", ["identity", "direct", "view"])
def test_a_value_written_in_place_inside_a_region_is_read_as_written(how):
    """The next layer read the written value; the fold composed it with the region as if unwritten (a silent
    wrong output). Now the write ends the region there: the two branches fold into one layer, the write and
    the next layer stay."""
    model, x = WrittenInside(how).double().eval(), torch.randn(2, 3, 4, dtype=torch.float64)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.lora.weight.zero_(), plain.lora.bias.zero_()
        assert rel_err(plain(x), model(x)) > 1e-3  # the branch (random, non-zero) matters
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-12
    assert [len(r.into) for r in report.regions if r.folded] == [1], str(report)  # one of the two, not next


def without_adapter(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``adapter`` is an identity: the base model."""
    base = copy.deepcopy(model)
    base.adapter = nn.Identity()
    return base


def randomize_adapters_module(adapter: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.3)


class ShapeOfBottleneck(nn.Module):
    """A hand-written adapter whose bottleneck's shape is read: no value of that shape stays after a fold."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.down, self.up = nn.Linear(8, 3), nn.Linear(3, 8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        h = self.norm(x)
        d = self.down(h)
        a = h + self.up(d)
        return self.fc(a) * (d.shape[-1] / 3.0)


def test_a_shape_read_that_would_keep_a_region_running_keeps_it_with_the_reason():
    torch.manual_seed(0)
    model = ShapeOfBottleneck().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    base = copy.deepcopy(model)
    with torch.no_grad():
        base.up.weight.zero_()
        base.up.bias.zero_()
    assert rel_err(model(x), base(x)) > 1e-3  # the hand-written adapter branch matters
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert len(report.regions) == 1 and not report.regions[0].folded
    assert "shape of" in report.regions[0].reason and "running" in report.regions[0].reason
    assert torch.equal(folded(x), model(x))
    assert report.params_after == report.params_before


class WindowShape(nn.Module):
    """An adapter on (B, H, W, C), a reshape to tokens whose shape is read (Swin's window partition)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.adapter = RepAdapter(8, 4, 2, rank=4)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        a = self.adapter(self.norm(x))
        w = a.reshape(-1, a.shape[1] * a.shape[2], a.shape[3])
        n = w.shape[1]
        return self.qkv(w) / n


def test_shape_reads_inside_a_folded_region_move_to_a_value_that_stays():
    torch.manual_seed(0)
    model = WindowShape().double().eval()
    randomize_adapters_module(model.adapter)
    x = torch.randn(2, 3, 3, 8, dtype=torch.float64)
    assert rel_err(model(x), without_adapter(model)(x)) > 1e-3
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert [r.folded for r in report.regions] == [True]
    assert rel_err(folded(x), model(x)) < 1e-10
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("adapter."))
    assert report.params_after == base
    assert not any(n.op == "call_module" and "adapter" in str(n.target) for n in folded.graph.nodes)


class ChannelsFirstAttention(nn.Module):
    """NCHW entering a scope whose first reader is not a conv (BoTNet / HaloNet's attn): an Identity, a
    BatchNorm, an activation, then the 1x1 qkv conv."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 3 * c, 1))

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("size", [5, 6, 7])
def test_insert_puts_the_adapter_on_the_channel_axis_read_off_the_graph(size):
    model = ChannelsFirstAttention().eval()
    x = torch.randn(1, 6, size, size)
    gm = repfold.insert(model, before="attn", example_inputs=x)
    adapter = gm.get_submodule("repfold_adapters.attn")
    assert adapter.axis == 1 and adapter.channels == 6


class SummedThenHead(nn.Module):
    """MobileOne's ``attn`` (an Identity): its input a sum that starts from ``0 +``, its reader a ReLU, a pool,
    an ``nn.Flatten`` and the classifier's Linear; ``head=False``: no layer after it."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        self.conv, self.attn = nn.Conv2d(3, 6, 1), nn.Identity()
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)) if head else None

    def forward(self, x):
        y = self.attn(0 + self.conv(x) if self.head is None else x)
        return y if self.head is None else self.head(y)


@pytest.mark.parametrize("head", [True, False], ids=["read-through-flatten", "made-through-add-of-zero"])
def test_insert_reads_the_channel_axis_through_a_flatten_module_and_a_sum_from_zero(head):
    """timm's ``mobileone_s0`` with ``before="attn"`` asked for ``axis=``."""
    gm = repfold.insert(SummedThenHead(head).eval(), before="attn", example_inputs=torch.randn(1, 3 if not head else 6, 5, 5))
    assert gm.get_submodule("repfold_adapters.attn").axis == 1


class NoLayerNearby(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2


def test_an_ambiguous_axis_names_the_scope_and_asks_for_axis():
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = NoLayerNearby()

        def forward(self, x):
            return self.act(x)

    x = torch.randn(1, 4, 5, 6)
    with pytest.raises(ValueError, match=r"'act'.*axis="):
        repfold.insert(Wrap(), before="act", example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it cannot fold: no layer nearby
        gm = repfold.insert(Wrap(), before="act", example_inputs=x, axis=1)
    assert gm.get_submodule("repfold_adapters.act").channels == 4


def test_insert_warns_for_an_adapter_that_will_not_fold_and_strict_refuses_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 9, 9)
    with pytest.warns(UserWarning, match=r"before '2' will not fold: .*not exact at the borders"):
        repfold.insert(model, before="2", example_inputs=x)
    with pytest.raises(ValueError, match="not exact at the borders"):
        repfold.insert(model, before="2", example_inputs=x, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bias-free: exact at the borders, no warning
        gm = repfold.insert(model, before="2", example_inputs=x, bias=False, strict=True)
    randomize_adapters(gm)
    folded, report = repfold.fold(gm.eval(), return_report=True)
    assert rel_err(gm(x), model(x)) > 1e-3
    assert [r.folded for r in report.regions] == [True]
    assert rel_err(folded(x), gm(x)) < 1e-5


class ClassTokenMlp(nn.Module):
    """XCiT's class-attention block: an MLP on the class token, a slice of a concatenation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        x = torch.cat([self.norm(x[:, 0:1]), x[:, 1:]], dim=1)
        cls = self.mlp(x[:, 0:1])
        return torch.cat([cls, x[:, 1:]], dim=1) + x


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_fold_of_an_mlp_on_a_token_slice_loads_and_matches(dynamo):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ClassTokenMlp().eval()
    x = torch.randn(1, 5, 8)
    gm = repfold.insert(model, before="mlp", example_inputs=x)
    randomize_adapters(gm)
    gm.eval()
    proto = export(gm, x, dynamo)
    folded, report = repfold.fold(proto, return_report=True)
    assert len(report.layered) == 1
    runs = [run(p, x.numpy()) for p in (proto, folded, export(model, x, dynamo))]
    assert rel_err(runs[0], runs[2]) > 1e-3  # the adapter matters
    assert rel_err(runs[1], runs[0]) < 1e-5
    if report.folded:  # the base model's own export: the exporters add constants of their own
        assert report.params_after <= n_params(export(model, x, dynamo))


def test_a_zero_diagonal_scaled_per_channel_stays_zero():
    from repfold.core.affine import LowRank, scale

    U, V = np.ones((6, 2)), np.ones((2, 3))  # a 6x3 map: no diagonal to add to
    M = scale(np.arange(6.0), LowRank(0.0, U, V))
    assert np.allclose(np.asarray(M), np.arange(6.0)[:, None] * (U @ V))


# --- the command line: a bug of ours is not bad input --------------------------------------


def _small_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)).eval()
    x = torch.randn(1, 4, 8)
    gm = repfold.insert(model, before="1", example_inputs=x)
    randomize_adapters(gm)
    path = tmp_path / "a.onnx"
    onnx.save(export(gm.eval(), x, False), path)
    return path


def test_an_internal_error_exits_3_with_one_line_naming_the_region_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from repfold.core import engine as _engine
    path, out = _small_model(tmp_path), tmp_path / "f.onnx"

    def broken(*args, **kwargs):
        with _engine.folding("the region at /0/LayerNormalization"):
            raise IndexError("index 192 is out of bounds")

    monkeypatch.setattr("repfold.frontends.onnx.fold_onnx", broken)
    assert _cli.main([str(path), "-o", str(out)]) == _cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "internal error" in err and "repfold bug" in err and "/0/LayerNormalization" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    assert _cli.main([str(path), "-o", str(out), "--debug"]) == _cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_a_model_onnxruntime_refuses_is_never_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from repfold.frontends import onnx as _onnx
    path, out = _small_model(tmp_path), tmp_path / "f.onnx"
    real = _onnx.fold_onnx

    def corrupting(model, **kwargs):
        folded, report = real(model, **kwargs)
        bias = next(t for t in folded.graph.initializer if len(t.dims) == 1 and "folded" in t.name)
        bias.CopyFrom(onnx.numpy_helper.from_array(np.zeros(5, np.float32), bias.name))  # wrong width
        return folded, report

    monkeypatch.setattr(_onnx, "fold_onnx", corrupting)
    assert _cli.main([str(path), "-o", str(out)]) == _cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "onnxruntime cannot load the folded model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


class StandardisedConv(nn.Conv2d):
    """timm's ScaledStdConv2dSame in small: an nn.Conv2d whose forward pads and standardises its weight, and
    that fx cannot trace through (it branches on a shape), so it stays whole."""

    def forward(self, x):
        if x.shape[-1] < 1:
            raise ValueError("empty input")
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / self.weight.std(dim=(1, 2, 3), keepdim=True)
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), w, self.bias)


def test_a_layer_subclass_that_computes_something_else_is_not_folded_into():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GELU(), StandardisedConv(6, 6, 3, bias=False)).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    gm = repfold.insert(model, before="2", example_inputs=x, bias=False, leaf_modules=(StandardisedConv,))
    randomize_adapters(gm)
    folded, report = repfold.fold(gm.eval(), return_report=True, leaf_modules=(StandardisedConv,))
    assert rel_err(gm(x), model(x)) > 1e-3
    assert len(report.regions) == 1 and not report.regions[0].folded, str(report)
    assert rel_err(folded(x), gm(x)) < 1e-12


class SpaceToDepthStem(nn.Module):
    """TResNet's stem: pixels folded into channels by view / permute / view, then a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3)

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
        return self.conv(x.view(n, c * 4, h // 2, w // 2)).relu()


def test_an_adapter_after_a_space_to_depth_stem_folds_into_the_conv():
    torch.manual_seed(0)
    model = SpaceToDepthStem().eval()
    x = torch.randn(1, 3, 12, 12)
    gm = repfold.insert(model, before="conv", example_inputs=x, bias=False, strict=True)
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    assert rel_err(gm(x), model(x)) > 1e-3
    assert [r.folded for r in report.regions] == [True]
    assert rel_err(folded(x), gm(x)) < 1e-5
    assert report.params_after <= sum(p.numel() for p in model.parameters())  # (BatchNorm folds too)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_fold_after_a_space_to_depth_stem(dynamo):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = SpaceToDepthStem().eval()
    x = torch.randn(1, 3, 12, 12)
    gm = repfold.insert(model, before="conv", example_inputs=x, bias=False)
    randomize_adapters(gm)
    proto = export(gm.eval(), x, dynamo)
    folded, report = repfold.fold(proto, return_report=True)
    assert [r.folded for r in report.regions] == [True]
    runs = [run(p, x.numpy()) for p in (proto, folded)]
    assert rel_err(runs[1], runs[0]) < 1e-5
    assert rel_err(runs[0], model(x)) > 1e-3


def test_an_adapter_in_no_region_is_reported_kept(monkeypatch):
    """An adapter the engine cannot see at all (here: every value's shape hidden from it) is still named."""
    from repfold.core import engine as _engine
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 5, 8)
    gm = repfold.insert(model, before="2", example_inputs=x)
    randomize_adapters(gm)
    real = _engine.plan
    monkeypatch.setattr(_engine, "plan", lambda steps, consumers, shape, *a, **k: real(
        steps, consumers, lambda name: None, *a, **k))
    folded, report = repfold.fold(gm.eval(), return_report=True)
    assert len(report.regions) == 1 and not report.regions[0].folded
    assert "before '2' forms no region" in report.regions[0].reason
    assert any("down" in u for u in report.unseen) and "not examined" in str(report)
    assert rel_err(gm(x), model(x)) > 1e-3  # the adapter left in place matters: the report must name it
    assert rel_err(folded(x), gm(x)) == 0


class TiledTable(nn.Module):
    """SAM2's Hiera: a position table tiled to the input's size (TorchScript exports the tile with If
    nodes on shapes), then channels-last tokens into an MLP. Shape inference alone loses every shape
    after the tile, and with it the region."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, c, 2, 2))
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        x = x + self.table.tile([1, 1, x.shape[2] // 2, x.shape[3] // 2])
        return self.mlp(self.norm(x.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_shapes_settle_through_branches_on_shapes(dynamo):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TiledTable().eval()
    x = torch.randn(1, 8, 4, 6)
    gm = repfold.insert(model, before="mlp", example_inputs=x)
    randomize_adapters(gm)
    proto = export(gm.eval(), x, dynamo)
    folded, report = repfold.fold(proto, return_report=True)
    assert [r.folded for r in report.layered] == [True] and not report.unseen
    runs = [run(p, x.numpy()) for p in (proto, folded)]
    assert rel_err(runs[0], model(x)) > 1e-3
    assert rel_err(runs[1], runs[0]) < 1e-5



def test_a_second_adapter_behind_the_first_ones_layer_folds_as_a_region_of_its_own():
    """torchvision EfficientNet-V2: the fused MBConv's 1x1 projection and BatchNorm have no activation after
    them, so adapters before that projection and before the next block's 3x3 conv share one affine region.
    The first folded into the projection; the second stayed in the model, inside a region reported folded."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 32, 32)
    scopes = ["features.2.0.block.1.0", "features.2.1.block.0.0"]
    gm = repfold.insert(model, before=scopes, example_inputs=x, bias=False, strict=True)
    randomize_adapters(gm, std=2.0)  # deep in a network whose head barely moves at this size
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    assert [r.into for r in report.layered] == [[f"{s} (Conv2d{k})"] for s, k in zip(scopes, ("", " 3x3"))], str(report)
    assert report.params_after <= sum(p.numel() for p in model.parameters())  # (BatchNorm folds too)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3
        assert rel_err(folded(x), gm(x)) < 1e-5


class Departition(nn.Module):
    """torchvision MaxViT between blocks: windows back to an image (reshape, permute, reshape), then an
    ``nn.Identity`` projection for the residual beside a pre-norm BatchNorm and a 1x1 conv."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.proj, self.norm, self.conv = nn.Identity(), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)

    def forward(self, w):  # w: (B, 4 windows, 4 pixels, C)
        b, c = w.shape[0], w.shape[-1]
        x = w.reshape(b, 2, 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, 4, 4)
        return self.proj(x) + self.conv(self.norm(x))


def test_a_scale_fold_reads_layout_ops_that_stay_instead_of_copying_them():
    # MaxViT: the BatchNorm folded into the conv, which read copies of the three layout ops while the
    # originals stayed for the residual (through the Identity): 21 more reshapes and permutes, reported
    # as "fewer operators than without adapters"
    model = Departition().eval()
    w = torch.randn(2, 4, 4, 8)
    folded, report = repfold.fold(model, example_inputs=(w,), return_report=True, graph=True)
    assert report.regions and report.regions[0].folded, report
    before, after = report.ops_before, report.ops_after
    assert all(after.get(k, 0) <= n for k, n in before.items()) and set(after) <= set(before), report
    assert after.get("BatchNorm2d", 0) == 0, report
    with torch.no_grad():
        assert rel_err(folded(w), model(w)) < 1e-5


def test_an_adapter_region_cut_short_is_kept_whole_not_folded_in_pieces():
    # timm EfficientFormer-V2: the adapter before the downsampling attention (whose depthwise query conv
    # refuses its map) was cut down to its own down-projection, "folded" into itself, and the rest planned
    # as scale regions: reported folded, while the adapter still ran
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientformerv2_s0", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)  # (its attention's shapes are fixed for this size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = repfold.insert(model, before=["stages.3.downsample.attn"], example_inputs=(x,))
    randomize_adapters(gm)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3, "the adapter must change the output"
    folded, report = repfold.fold(gm, return_report=True)
    assert not any("repfold_adapters" in into for r in report.folded for into in r.into), report
    assert [r for r in report.kept if any("repfold_adapters" in op for op in r.ops)], report
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) < 1e-5


def test_a_conv_whose_weight_is_a_constant_node_after_a_reflect_pad_folds_without_a_crash():
    """timm TResNet's ONNX export: its anti-aliasing blur conv reads a reflect Pad, and the TorchScript exporter
    keeps the blur filter in a Constant node; asking whether that weight was computed raised an IndexError."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((4, 1, 3, 3), 1 / 9, dtype=np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "w"], ["y"], group=4, strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "blur", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    folded, report = repfold.fold(model, return_report=True, graph=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert not report.regions
    np.testing.assert_array_equal(run(folded, x), run(model, x))
