"""The torch.export frontend: ``repfold.fold(ep)`` and ``repfold.insert(ep)`` (issue 14)."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections import Counter

import pytest
import timm
import torch
from conftest import export, fold_checked, randomize_adapters, rel_err
from torch import nn

import repfold


def _vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:  # zero biases and head: random, so no adapter effect is hidden
                p.normal_(0, 0.02)
    return model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _adapted(model, x, **kw):
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x, **kw)
    randomize_adapters(gm)
    return gm.eval()


def _aten_counts(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def test_fold_of_an_exported_program_is_a_new_program_with_the_base_weights_and_ops():
    model, x = _vit()
    gm = _adapted(model, x)
    ep = torch.export.export(gm, (x,))
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    graph_before = str(ep.graph)
    folded, report = repfold.fold(ep, return_report=True)
    assert isinstance(folded, torch.export.ExportedProgram)
    assert report.frontend == "torch.export" and len(report.regions) == 4 and not report.kept, str(report)
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3
        assert rel_err(folded.module()(x), y) < 1e-5
    base = torch.export.export(model, (x,))
    assert sorted(folded.state_dict) == sorted(base.state_dict)  # a replaced weight keeps its name
    assert _aten_counts(folded) == _aten_counts(base)
    # the input program is untouched
    assert str(ep.graph) == graph_before
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items())


def test_folded_program_saves_loads_decomposes_and_exports_to_onnx(tmp_path):
    model, x = _vit()
    folded = repfold.fold(torch.export.export(_adapted(model, x), (x,)))
    path = tmp_path / "folded.pt2"
    torch.export.save(folded, path)
    loaded = torch.export.load(path)
    core = loaded.run_decompositions()
    with torch.no_grad():
        ref = folded.module()(x)
        assert rel_err(loaded.module()(x), ref) == 0
        assert rel_err(core.module()(x), ref) < 1e-6
    onnx = pytest.importorskip("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        got = torch.onnx.export(folded, dynamo=True, verbose=False).model_proto
        want = torch.onnx.export(torch.export.export(model, (x,)), dynamo=True, verbose=False).model_proto
    assert isinstance(got, onnx.ModelProto)
    assert Counter(n.op_type for n in got.graph.node) == Counter(n.op_type for n in want.graph.node)


def test_a_dynamic_batch_stays_dynamic():
    model, _ = _vit()
    x = torch.randn(2, 3, 32, 32)  # (an example batch of 1 would make torch.export specialise it)
    batch = torch.export.Dim("batch", min=1, max=8)
    ep = torch.export.export(_adapted(model, x), (x,), dynamic_shapes=({0: batch},))
    folded = repfold.fold(ep)
    ranges = [(int(r.lower), int(r.upper)) for r in folded.range_constraints.values()]
    assert ranges == [(1, 8)]  # the program's own range, not one export would guess
    for n in (1, 3):
        xb = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            assert rel_err(ep.module()(xb), model(xb)) > 1e-3  # the adapters matter
            assert rel_err(folded.module()(xb), ep.module()(xb)) < 1e-5


class Tied(nn.Module):
    """One Linear called twice (non-strict export shares one weight between the calls), an adapter before each."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.LayerNorm(8), nn.LayerNorm(8)
        self.shared = nn.Linear(8, 8)
        self.first, self.second = nn.Identity(), nn.Identity()

    def forward(self, x):
        return self.shared(self.first(self.a(x))) + self.shared(self.second(self.b(x)))


def test_a_weight_shared_by_two_calls_is_never_corrupted():
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 5, 8)
    gm = repfold.insert(model, before=["first", "second"], example_inputs=x)
    randomize_adapters(gm)
    ep = torch.export.export(gm.eval(), (x,))
    shared = ep.state_dict["shared.weight"].clone()
    folded, report = repfold.fold(ep, return_report=True)
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3
        assert rel_err(folded.module()(x), y) < 1e-5
    assert len(report.regions) == 2 and all(r.folded for r in report.regions), str(report)
    assert torch.equal(ep.state_dict["shared.weight"], shared)


def test_insert_takes_an_exported_program_with_module_paths_as_scopes():
    model, x = _vit()
    ep = torch.export.export(model, (x,))
    gm = repfold.insert(ep, before=["attn", "mlp"])  # example inputs: the program's own
    assert sorted(gm.meta["repfold"]["adapters"]) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    _folded, report = fold_checked(gm, model, x)
    assert len(report.regions) == 4 and not report.kept, str(report)
    assert all(r.source.startswith("blocks.") for r in report.regions)  # not torch.export's L__self__ keys


def test_hugging_face_vit_through_torch_export():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8)
    vit = transformers.ViTModel(cfg).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = repfold.insert(torch.export.export(vit, (x,)), before=["attention", "mlp"])
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(torch.export.export(gm, (x,)), return_report=True)
    assert len(report.regions) == 4 and not report.kept, str(report)
    with torch.no_grad():
        y = gm(x)[0]
        assert rel_err(y, vit(x).last_hidden_state) > 1e-3
        assert rel_err(folded.module()(x)[0], y) < 1e-5


def test_a_program_without_adapters_folds_to_the_same_outputs():
    model, x = _vit()
    ep = torch.export.export(model, (x,))
    folded, report = repfold.fold(ep, return_report=True)
    assert not report.regions
    with torch.no_grad():
        assert torch.equal(folded.module()(x), ep.module()(x))


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")
def test_folded_program_compiles_with_aot_inductor(tmp_path):
    model, x = _vit()
    folded = repfold.fold(torch.export.export(_adapted(model, x), (x,)))
    path = torch._inductor.aoti_compile_and_package(folded, package_path=str(tmp_path / "folded.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert rel_err(runner(x), folded.module()(x)) < 1e-5


def _attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """As torchvision's ``shifted_window_attention``: a function fx keeps whole, given the layer's weights."""
    return torch.nn.functional.linear(x, weight, bias).softmax(-1)


torch.fx.wrap("_attention")


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)

    def forward(self, x):
        return _attention(x, self.qkv.weight, self.qkv.bias)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = Attention()

    def forward(self, x):
        return self.attn(self.norm(x))


class Branchy(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        if x.shape[1] > 3:
            x = x * 2.0
        return self.mlp(self.norm(x))


@pytest.mark.parametrize(("cls", "scope"), [(Wrapped, "attn"), (Branchy, "mlp")], ids=["wrapped-layer", "untraceable"])
def test_insert_falls_back_to_torch_export_and_says_so(cls, scope):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 5, 8)
    gm = repfold.insert(model, before=scope, example_inputs=x, strict=True)
    assert gm.meta["repfold"]["trace"] == "torch.export"
    _folded, report = fold_checked(gm, model, x)
    assert report.frontend == "fx, traced by torch.export" and [r.folded for r in report.regions] == [True]


def test_torchvision_swin_folds_every_region_through_torch_export():
    """fx keeps ``shifted_window_attention`` whole, with qkv inside: insert traces with torch.export instead."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    assert gm.meta["repfold"]["trace"] == "torch.export"
    folded, report = fold_checked(gm, model, x, std=0.05)
    assert len(report.regions) == 24 and not report.kept, str(report)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    # what the user deploys: the graph insert returned, through the TorchScript exporter, against itself in
    # eager mode (its attention mask was lost from the file: 2% off, even with every adapter zero)
    with torch.no_grad():
        y = gm(x)
    assert rel_err(_onnx_run(export(gm, x, dynamo=False), x), y) < 1e-5
    assert rel_err(_onnx_run(export(folded, x, dynamo=False), x), y) < 1e-5


def _onnx_run(proto, x):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


class _SliceWrites(nn.Module):
    """Writes into slices of values it made, as torchvision's Swin (its shifted windows' mask: one slice per
    axis) and Swin V2 (the key part of its qkv bias zeroed) do, and other in-place ops into views, beside a
    Linear to put an adapter before."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        mask = x.new_zeros((8, 8))
        count = 0
        for h in ((0, -4), (-4, -2), (-2, None)):
            for w in ((0, -4), (-4, -2), (-2, None)):
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask[0].mul_(-2)  # any other in-place op into a view (a select, a slice) was lost too
        mask[:, 5:].relu_()
        mask[:, torch.tensor([1, 3])] = 1.5  # index_put_ with a None index: no TorchScript export at all
        bias = self.proj.bias.clone()
        bias[2:4].zero_()
        bias[6:].copy_(torch.ones(8)[:2])
        return nn.functional.linear(x, self.proj.weight, bias) + mask


class SliceWrites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _SliceWrites()

    def forward(self, x):
        return x + self.attn(x)


@pytest.mark.parametrize("dynamo", [False, True])
def test_the_graph_insert_traced_with_torch_export_exports_to_onnx_as_the_model_does(dynamo):
    """torch.export writes ``m[a:b, c:d] = v`` as an ATen ``fill_`` of a named view sliced once per axis. The
    TorchScript exporter drops a write into a view that the traced code names (the fx code insert returns
    names every value), so the graph exported wrongly while the model did not: the writes go back to index
    assignments."""
    torch.manual_seed(0)
    model = SliceWrites().eval()
    x = torch.randn(2, 8, 8)
    gm = repfold.insert(torch.export.export(model, (x,)), before=["attn"])
    randomize_adapters(gm)
    gm.eval()
    with torch.no_grad():
        y, base = gm(x), model(x)
    assert rel_err(y, base) > 1e-3
    assert rel_err(_onnx_run(export(model, x, dynamo), x), base) < 1e-6  # the exporter is faithful to the model
    assert rel_err(_onnx_run(export(gm, x, dynamo), x), y) < 1e-6


def test_a_decomposed_program_folds_and_stays_decomposed():
    """``run_decompositions()`` (core ATen, what ExecuTorch takes): Linear is ``addmm(b, x, t(W))`` behind
    views, convolutions ``aten.convolution``, batch norm the tuple-valued ``_native_batch_norm_legit``."""
    model, x = _vit()
    gm = _adapted(model, x)
    folded, report = repfold.fold(torch.export.export(gm, (x,)).run_decompositions(), return_report=True)
    assert len(report.regions) == 4 and not report.kept, str(report)
    base = torch.export.export(model, (x,)).run_decompositions()
    assert sorted(folded.state_dict) == sorted(base.state_dict)
    assert "aten.addmm.default" in _aten_counts(folded) and "aten.linear.default" not in _aten_counts(folded)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3
        assert rel_err(folded.module()(x), gm(x)) < 1e-5


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "core-aten"])
def test_eval_batch_norm_in_a_program_folds_with_scales(decomposed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions() if decomposed else ep
    folded, report = repfold.fold(ep, return_report=True, scales=True)
    assert [r.into for r in report.regions] == [["0 (Conv2d 3x3)"]], str(report)
    assert not any("batch_norm" in str(k) for k in _aten_counts(folded))
    # and its tensors are gone from the program (ep.module() read num_batches_tracked, which kept them)
    assert not any(k.startswith("1.") for k in folded.state_dict), list(folded.state_dict)
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert rel_err(folded.module()(x), model(x)) < 1e-5


class BranchyDropout(Branchy):
    """Untraceable by fx, with a dropout of its own, handed to insert in training mode (as built)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(self.drop(x))


def test_the_export_fallback_records_the_model_in_eval_mode_and_leaves_it_as_it_was():
    torch.manual_seed(0)
    model = BranchyDropout()  # training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 8)
    gm = repfold.insert(model, before="mlp", example_inputs=x)
    assert gm.meta["repfold"]["trace"] == "torch.export" and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    folded = repfold.fold(gm.eval())
    with torch.no_grad():
        assert torch.equal(folded(x), folded(x))  # no dropout of the model's own left running
        assert rel_err(folded(x), model.eval()(x)) < 1e-5  # the adapters start as identities


def test_a_program_exported_in_training_mode_is_folded_with_a_warning():
    model = BranchyDropout()
    ep = torch.export.export(model, (torch.randn(2, 5, 8),))
    with pytest.warns(UserWarning, match="exported in training mode"):
        repfold.fold(ep)
    with pytest.warns(UserWarning, match="exported in training mode"):
        repfold.insert(ep, before="mlp")
