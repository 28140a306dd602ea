"""Folding at the cost of what changes: ``fold(..., inplace=True)``, insert's shared weights, the block-wise
product written straight into a layer, and shapes found without a forward pass."""

from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import timm
import torch
from repfold.patterns._base import write_product
from torch import fx, nn

import repfold
from repfold.core.affine import LowRank, OnDemand, Product
from repfold.frontends.trace import _fake_shapes, shape

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             pretrained=False).eval().double()


def _trained(gm: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return gm.eval()


def _inserted(model: nn.Module) -> fx.GraphModule:
    gm = _trained(repfold.insert(model, before=["attn", "mlp"], example_inputs=X))
    with torch.no_grad():
        assert float((gm(X) - model(X)).abs().max()) > 1e-2  # the adapters change the output
    return gm


def test_insert_shares_the_frozen_weights_and_never_the_parameter_objects():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = _inserted(model)
    own = dict(model.named_parameters())
    for name, p in gm.named_parameters():
        if name.startswith("repfold_adapters."):
            continue
        assert p.data_ptr() == own[name].data_ptr()  # no copy of the backbone
        assert p is not own[name] and not p.requires_grad  # frozen on insert's side only
    assert all(p.requires_grad for p in model.parameters())
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    gm(X).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # training the adapters
    folded = repfold.fold(gm.eval())  # and folding into a new model leave the model as it was
    assert folded is not gm
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_graph_module_folds_in_place_into_its_own_tensors():
    model = _vit()
    base = copy.deepcopy(model)
    gm = _inserted(model)
    with torch.no_grad():
        want = gm(X)
    copied = repfold.fold(gm)
    qkv = gm.get_submodule("blocks.0.attn.qkv").weight
    ptr = qkv.data_ptr()
    out, report = repfold.fold(gm, inplace=True, return_report=True)
    assert out is gm and isinstance(out, fx.GraphModule)
    assert len(report.folded) == 4 and not report.kept
    assert out.get_submodule("blocks.0.attn.qkv").weight.data_ptr() == ptr  # written where it was
    assert not any(name.startswith("repfold_adapters") for name, _ in out.named_modules())
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in base.parameters())
    assert all(p.requires_grad for p in out.parameters())  # trainable again, as before insert
    with torch.no_grad():
        assert float((out(X) - want).abs().max()) < 1e-10
        assert float((out(X) - copied(X)).abs().max()) < 1e-12
    # insert's graph shared the model's weights: the model holds the folded values now, as the docs say
    assert model.blocks[0].attn.qkv.weight.data_ptr() == ptr


def test_fold_into_the_model_in_place_returns_the_model_itself():
    model = _vit()
    gm = _inserted(model)
    with torch.no_grad():
        want = gm(X)
    out, report = repfold.fold(gm, into=model, inplace=True, return_report=True)
    assert out is model and type(out).__name__ == "VisionTransformer"
    assert report.into == "VisionTransformer" and report.into_error <= 1e-12
    with torch.no_grad():
        assert float((model(X) - want).abs().max()) < 1e-10


def test_a_peft_model_folds_in_place_as_merge_and_unload_does():
    peft = pytest.importorskip("peft")
    model = _vit()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv", "fc1"]))
    torch.manual_seed(1)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    wrapped.eval()
    merged = copy.deepcopy(wrapped).merge_and_unload()
    with torch.no_grad():
        want = wrapped(X)
        assert float((want - _vit()(X)).abs().max()) > 1e-2  # the LoRA changes the output
        assert float((want - merged.base_model(X) if hasattr(merged, "base_model") else want - merged(X)).abs()
                     .max()) < 1e-10
    out, report = repfold.fold(wrapped, inplace=True, example_inputs=X, return_report=True)
    assert out is model  # unwrapped to the base model, itself
    assert len(report.folded) == 4 and not report.kept
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in merged.parameters())
    with torch.no_grad():
        assert float((out(X) - want).abs().max()) < 1e-10


class _Tied(nn.Module):
    """Two Linear layers holding one weight, an adapter-like scale before the first."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x * self.gamma)))


def test_an_in_place_fold_never_writes_into_a_tied_weight():
    torch.manual_seed(0)
    model = _Tied().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        plain = model.b(torch.relu(model.a(x)))
    assert float((want - plain).abs().max()) > 1e-2  # the scale changes the output
    tied = model.a.weight.clone()
    out = repfold.fold(model, inplace=True, example_inputs=x, graph=False)
    with torch.no_grad():
        assert float((out(x) - want).abs().max()) < 1e-12
    assert torch.equal(model.b.weight, tied)  # the second layer reads the weight as it was


def test_inplace_is_refused_where_no_module_can_be_edited():
    model = _vit()
    ep = torch.export.export(model, (X,))
    with pytest.raises(TypeError, match="inplace"):
        repfold.fold(ep, inplace=True)
    with pytest.raises(TypeError, match="graph=True"):
        repfold.fold(model, inplace=True, graph=True, example_inputs=X)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_product_is_written_by_rows_with_one_rounding(dtype):
    gen = np.random.default_rng(0)
    W = torch.from_numpy(gen.standard_normal((300, 40))).to(dtype)
    U, V = gen.standard_normal((40, 3)), gen.standard_normal((3, 40))
    d, g = gen.standard_normal(40), gen.standard_normal(300)
    P = Product(OnDemand(W.shape, None, lambda: W), LowRank(d, U, V), g)
    exact = g[:, None] * (W.double().numpy() @ (np.diag(d) + U @ V))
    out = torch.empty(W.shape, dtype=dtype)
    from repfold.patterns import _base

    rows, _base._ROWS = _base._ROWS, 1000  # several blocks of rows
    try:
        rounding = write_product(P, out)
    finally:
        _base._ROWS = rows
    once = torch.from_numpy(exact).to(dtype)  # the exact product, rounded once
    if dtype == torch.float32:
        assert float((out.double() - once.double()).abs().max()) <= float(once.double().abs().max()) * 2 ** -23
        assert rounding == 0.0
    else:  # float32 arithmetic, then the half cast: at most one step of the half type off the exact product
        step = torch.finfo(dtype).eps * np.abs(exact)
        assert np.all(np.abs(out.double().numpy() - exact) <= step + 1e-6)
        assert rounding == pytest.approx(float(np.abs(out.double().numpy() - exact).max()), rel=1e-3)


def test_shapes_come_from_fake_tensors_and_from_a_real_run_where_values_decide():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[torch.nonzero(x > 0, as_tuple=True)].sum() + x.mean(dim=0)

    model = _vit().float()
    gm = fx.symbolic_trace(model)
    assert _fake_shapes(gm, (X.float(),))
    assert tuple(list(gm.graph.nodes)[-2].meta["tensor_meta"].shape) == (2, 1000)
    odd = fx.symbolic_trace(DataDependent())
    x = torch.randn(5, 3)
    assert not _fake_shapes(odd, (x,))  # a nonzero's shape depends on the values
    shape(odd, (x,))  # so the graph runs once for real
    assert tuple(list(odd.graph.nodes)[-2].meta["tensor_meta"].shape) == (3,)


def test_a_layer_with_adapters_on_both_sides_folds_in_place_as_into_a_copy():
    model = _vit()
    gm = _trained(repfold.insert(model, before=["fc1", "qkv"], after=["fc1", "proj"], example_inputs=X))
    with torch.no_grad():
        want = gm(X)
        assert float((want - model(X)).abs().max()) > 1e-2  # the adapters change the output
    copied, report = repfold.fold(gm, return_report=True)
    out, again = repfold.fold(gm, inplace=True, return_report=True)
    assert [r.line() for r in again.regions] == [r.line() for r in report.regions]
    assert len(report.folded) >= 6
    with torch.no_grad():
        assert float((out(X) - want).abs().max()) < 1e-10
        assert float((out(X) - copied(X)).abs().max()) < 1e-12


def test_a_hugging_face_model_traced_by_torch_export_folds_in_place():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    linears = sorted({n.rpartition(".")[2] for n, m in base.named_modules()
                      if isinstance(m, nn.Linear) and m is not base.classifier})  # (their names vary by version)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=linears, r=4, init_lora_weights=False)).eval()
    layer = next(m for n, m in base.named_modules() if n.endswith(linears[0]) and hasattr(m, "base_layer"))
    with torch.no_grad():
        want = model(x).logits
        with model.disable_adapter():
            assert float((want - model(x).logits).abs().max()) > 1e-3  # the LoRA changes the output
        assert float((want - copy.deepcopy(model).merge_and_unload()(x).logits).abs().max()) < 1e-4
    ptr = layer.base_layer.weight.data_ptr()
    path = next(n for n, m in base.named_modules() if m is layer)
    out, report = repfold.fold(model, inplace=True, example_inputs=x, return_report=True)
    assert out is base and not report.kept
    assert out.get_submodule(path).weight.data_ptr() == ptr  # written where it was
    with torch.no_grad():
        assert float((out(x).logits - want).abs().max()) < 1e-5


def test_a_fold_of_insert_graph_reuses_its_shapes_while_nothing_they_depend_on_changed(monkeypatch):
    from repfold.frontends import fx as fx_frontend

    calls = []
    real = fx_frontend.shape
    monkeypatch.setattr(fx_frontend, "shape", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    model = _vit()
    gm = _inserted(model)
    assert not calls  # insert's own plan of the fold reused the shapes it had just found
    with torch.no_grad():
        want = gm(X)
    folded = repfold.fold(gm)
    assert not calls  # the adapters' own ops were shaped from their inputs' shapes alone
    with torch.no_grad():
        assert float((folded(X) - want).abs().max()) < 1e-10
    repfold.fold(copy.deepcopy(gm).float())  # another dtype: found again
    assert len(calls) == 1
    other = copy.deepcopy(gm)
    out = next(n for n in other.graph.nodes if n.op == "output")
    with other.graph.inserting_before(out):
        doubled = other.graph.call_function(torch.mul, (out.args[0], 2.0))
    out.args = (doubled,)
    other.recompile()  # another graph: found again
    with torch.no_grad():
        assert float((repfold.fold(other)(X) - 2 * want).abs().max()) < 1e-9
    assert len(calls) == 2


class _Functional(nn.Module):
    """A scale, then a Linear written as ``F.linear`` on tensors of its own (read by get_attr once traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.w = nn.Parameter(torch.randn(6, 8))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.nn.functional.linear(x * self.s, self.w, self.b)


def test_a_functional_linear_folds_in_place_into_the_weight_it_reads():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Functional().double().eval())
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        want = gm(x)
    with torch.no_grad():
        assert float((want - torch.nn.functional.linear(x, gm.w, gm.b)).abs().max()) > 1e-2  # the scale counts
    ptr = gm.w.data_ptr()
    out, report = repfold.fold(gm, inplace=True, example_inputs=x, return_report=True)
    assert out is gm and len(report.folded) == 1
    assert not any(n.op == "call_function" and n.target is operator.mul for n in out.graph.nodes)
    with torch.no_grad():
        assert float((out(x) - want).abs().max()) < 1e-12
    read = next(n.target for n in out.graph.nodes if n.op == "get_attr" and n.target.startswith("w"))
    assert out.get_parameter(read).data_ptr() == ptr  # F.linear's weight, written where it was


def test_folds_in_two_threads_at_once_give_what_each_gives_alone():
    from concurrent.futures import ThreadPoolExecutor

    graphs = [_inserted(_vit()) for _ in range(2)]
    _trained(graphs[1], seed=2)
    with torch.no_grad():
        want = [g(X) for g in graphs]
    with ThreadPoolExecutor(2) as pool:
        folded = list(pool.map(repfold.fold, graphs))
    with torch.no_grad():
        for f, w in zip(folded, want):
            assert float((f(X) - w).abs().max()) < 1e-10
