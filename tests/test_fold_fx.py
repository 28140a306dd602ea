"""End to end in torch.fx: adapters inserted into real timm ViTs, folded back into their Linears."""


import pytest
import torch
from conftest import image, make_vit, randomize_adapters, rel_err

import repfold

MODELS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]
# float64 checks the algebra; float32 what users see (relative to the output's scale).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def adapted(name, dtype):
    model, x = make_vit(name, dtype), image(dtype=dtype)
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    return model, gm.eval(), x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", MODELS)
def test_fold_keeps_outputs_and_restores_base_cost(name, dtype):
    model, gm, x = adapted(name, dtype)
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-2  # the adapters matter
        folded, report = repfold.fold(gm, return_report=True)
        assert rel_err(folded(x), y) <= TOL[dtype]

    assert len(report.regions) == 4 and not report.kept
    assert sorted(into for r in report.folded for into in r.into) == sorted(
        f"blocks.{i}.{layer} (Linear)" for i in range(2) for layer in ("attn.qkv", "mlp.fc1")
    )
    _, base = repfold.fold(model, example_inputs=x, return_report=True, graph=True)
    assert report.ops_after == base.ops_after
    assert report.params_after == base.params_after == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, repfold.RepAdapter) for m in folded.modules())
    assert next(folded.parameters()).dtype == dtype
    folded.graph.lint()


def test_fold_does_not_touch_its_input():
    _, gm, _x = adapted(MODELS[0], torch.float64)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    repfold.fold(gm)
    assert gm.code == code
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


def test_folded_model_shares_no_tensor_with_its_input():
    """Fold borrows the input's parameters while it works; what it returns owns all of its tensors."""
    _model, gm, x = adapted(MODELS[0], torch.float64)
    fc2 = "blocks.0.mlp.fc2"
    gm.get_submodule("blocks.1.mlp.fc2").weight = gm.get_submodule(fc2).weight  # tied: must stay tied, and still be a copy
    folded = repfold.fold(gm)
    theirs = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    ours = list(folded.parameters()) + list(folded.buffers())
    assert not any(t.untyped_storage().data_ptr() in theirs for t in ours)
    assert folded.get_submodule("blocks.1.mlp.fc2").weight is folded.get_submodule(fc2).weight
    with torch.no_grad():
        y = folded(x)
        for p in folded.parameters():
            p.add_(1.0)  # a user fine-tuning the folded model
        assert torch.equal(repfold.fold(gm)(x), y)


def test_folded_parameters_are_trainable_as_before_insert():
    """insert freezes the model to train adapters; the folded model gets the flags the model had before."""
    model, x = make_vit(MODELS[0], torch.float64), image(dtype=torch.float64)
    model.patch_embed.requires_grad_(False)  # the user's own choice: stays
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x).eval()
    randomize_adapters(gm)
    assert not any(p.requires_grad for n, p in gm.named_parameters() if not n.startswith("repfold_adapters."))
    folded = repfold.fold(gm)
    assert {n: p.requires_grad for n, p in folded.named_parameters()} == {
        n: not n.startswith("patch_embed.") for n, _ in folded.named_parameters()
    }
    assert any(n.startswith("patch_embed.") for n, _ in folded.named_parameters())
    assert not any(p.requires_grad for n, p in gm.named_parameters() if not n.startswith("repfold_adapters."))


def test_folding_twice_changes_nothing():
    _, gm, x = adapted(MODELS[0], torch.float64)
    once = repfold.fold(gm)
    twice, report = repfold.fold(once, example_inputs=x, return_report=True, graph=True)
    assert report.regions == []
    assert torch.equal(twice(x), once(x))


def test_plain_module_with_handwritten_adapter_folds():
    """No insert: a user's own module, traced by fold, found by algebra alone."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.adapter = repfold.RepAdapter(16, 4, 2, scale=0.7)
            self.fc = torch.nn.Linear(16, 32)

        def forward(self, x):
            return torch.relu(self.fc(self.adapter(self.norm(x))))

    block = Block().double().eval()
    for conv in (block.adapter.down, block.adapter.up):  # as after training: weights and biases non-zero
        torch.nn.init.normal_(conv.weight)
        torch.nn.init.normal_(conv.bias)
    assert block.adapter.down.bias.abs().min() > 0 and block.adapter.up.bias.abs().min() > 0
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(block(x), torch.relu(block.fc(block.norm(x)))) > 1e-2  # the adapter matters
    folded, report = repfold.fold(block, example_inputs=x, return_report=True, graph=True)
    assert [r.into for r in report.regions] == [["fc (Linear)"]]
    assert rel_err(folded(x), block(x)) <= 1e-12


def test_training_mode_folds_as_eval_with_a_warning():
    model, gm, x = adapted(MODELS[0], torch.float64)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-2
    with pytest.warns(UserWarning, match="training mode"):
        folded = repfold.fold(gm.train())
    assert not folded.training
    with torch.no_grad():
        assert rel_err(folded(x), gm.eval()(x)) <= 1e-10


def test_unfoldable_region_is_kept_and_explained():
    """An adapter on the residual stream feeds LayerNorm: no Linear of its shape can absorb it."""
    model, x = make_vit(dtype=torch.float64), image(dtype=torch.float64)
    gm = repfold.insert(model, before="blocks.1", example_inputs=x)
    randomize_adapters(gm)
    with torch.no_grad():
        assert rel_err(gm.eval()(x), model(x)) > 1e-2
    folded, report = repfold.fold(gm.eval(), return_report=True)
    (region,) = report.regions
    assert not region.folded
    assert "no layer can absorb it" in region.reason and "layer_norm" in region.reason
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) <= 1e-12


class _ComputedWeights(torch.nn.Module):
    """Layers whose weight is computed from weights alone, as a model of its own may compute one."""

    def __init__(self, kind: str):
        super().__init__()
        import timm

        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.std = timm.layers.StdConv2d(16, 16, 3, padding=1)  # weight standardisation at every call
        self.W = torch.nn.Parameter(torch.randn(64, 64, generator=g) / 8)
        self.A = torch.nn.Parameter(torch.randn(64, 4, generator=g) / 2)
        self.B = torch.nn.Parameter(torch.randn(4, 64, generator=g) / 2)
        self.s = torch.nn.Parameter(torch.rand(64, 1, generator=g) + 0.5)

    def forward(self, x, t):
        F = torch.nn.functional
        if self.kind == "standardised":
            return self.std(x)
        if self.kind == "factored":  # storing A @ B would cost 64·64 values for 2·4·64
            return F.linear(t, self.A @ self.B)
        if self.kind == "shared":  # one computed weight, two layers: storing it for each would double it
            w = self.W * self.s
            return F.linear(F.linear(t, w).relu(), w)
        return t @ self.W.t()  # "transposed": a stored weight laid out for matmul, nothing computed


@pytest.mark.parametrize("kind", ["standardised", "factored", "shared", "transposed"])
def test_a_computed_weight_is_stored_only_where_that_costs_no_more(kind):
    """A layer whose weight is computed from weights alone (timm's weight-standardised conv; PEFT's HRA in
    ONNX) is a region of its own: the weight is evaluated in float64 and stored, and its computation goes.
    Not where storing it would raise the parameter count (a factored ``A @ B``; one computed weight that two
    layers read) or where nothing is computed (a transposed weight): the model stays bitwise as it was."""
    model = _ComputedWeights(kind).eval()
    x, t = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 64)
    folded, report = repfold.fold(torch.fx.symbolic_trace(model), example_inputs=(x, t), return_report=True, graph=True)
    with torch.no_grad():
        want, got = model(x, t), folded(x, t)
    if kind == "standardised":
        assert len(report.folded) == 1 and not report.kept, str(report)
        assert "batch_norm" in report.ops_before and "batch_norm" not in report.ops_after, str(report)
        assert report.params_after <= report.params_before
        assert rel_err(got, want) < 1e-5
    else:
        assert not report.regions, str(report)
        assert torch.equal(got, want)


@pytest.mark.parametrize("bias", [True, False])
def test_a_bias_less_conv_that_takes_an_adapters_constant_says_so(bias):
    """A 1×1 conv without a bias (and no BatchNorm whose shift it would replace) takes the constant of an
    adapter with biases as a bias of its own: exact, no operator more, ``out_channels`` values more, and the
    region's report line says so. A bias-free adapter adds nothing."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GELU(),
                                torch.nn.Conv2d(8, 16, 1, bias=False)).eval()
    x = torch.randn(2, 8, 6, 6)
    gm = repfold.insert(model, before=["2"], example_inputs=x, bias=bias)
    randomize_adapters(gm)
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3
        assert rel_err(folded(x), gm(x)) < 1e-5
    (region,) = report.regions
    assert region.folded and (region.new_bias == 16) == bias and ("took one: 16 values" in region.line()) == bias
    base = sum(p.numel() for p in model.parameters())
    assert report.params_after == base + (16 if bias else 0)


class _ShapeBranch(torch.nn.Module):
    """A forward that branches on a size: torch.fx cannot trace it, torch.export can (Hugging Face's
    models are full of such checks)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        if x.size(-1) % 2:
            x = x[..., :-1]
        return self.bn(self.conv(x))


def test_a_model_fx_cannot_trace_is_folded_through_torch_export():
    model = _ShapeBranch().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(), model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 6, 6)
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert report.frontend == "fx, traced by torch.export" and len(report.folded) == 1, str(report)
    assert "BatchNorm2d" not in str(report.ops_after), str(report)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


def test_a_layer_whose_weight_is_read_elsewhere_too_keeps_it_for_that_reader():
    """A layer rebuilt for an adapter whose weight another op reads by its path (a tied head,
    ``F.linear(h, self.proj.weight)``): the rebuilt layer goes in under a new name, and the other reader
    still reads the weight it read (it used to read the folded one: outputs 100% wrong)."""
    import torch.nn.functional as F
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            a = x + self.up(self.down(x))  # an adapter before proj
            return self.proj(a) + F.linear(torch.relu(x), self.proj.weight)

    torch.manual_seed(0)
    model = Tied().double().eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert (want - (model.proj(x) + F.linear(torch.relu(x), model.proj.weight))).abs().max() > 1e-3
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    assert [r.folded for r in report.regions] == [True], report
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, atol=1e-12, rtol=0)
