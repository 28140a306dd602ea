"""The fold written back into the user's own class, as module edits, checked: ``fold(model)`` (the default
for a module) and ``fold(gm, into=model)``.

After ``gm = insert(model, ...)`` and training, a user deploys their own class (timm's
``VisionTransformer``, with ``pretrained_cfg``, ``forward_features``, a state dict that loads into
``timm.create_model``), not a GraphModule. The copy is judged against the eager model with adapters.
"""

import copy
import types
import warnings

import pytest
import torch
from conftest import randomize_adapters, rel_err, timm
from torch import nn

import repfold


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()


def test_insert_then_fold_into_the_model_gives_its_own_class_back():
    model = _vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    untouched = copy.deepcopy(model.state_dict())
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    gm.eval()
    with torch.no_grad():
        want = gm(x)
        assert rel_err(want, model(x)) > 1e-2  # the adapters change the output
    out, report = repfold.fold(gm, into=model, return_report=True)
    assert type(out) is type(model) and out is not model
    assert out.pretrained_cfg == model.pretrained_cfg and hasattr(out, "forward_features")
    assert report.into == "VisionTransformer" and len(report.edits) == 4 and report.into_error <= 1e-6
    assert "written into VisionTransformer" in str(report)
    with torch.no_grad():
        assert rel_err(out(x), want) < 1e-5
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in model.parameters())
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    fresh.load_state_dict(out.state_dict())  # the deployed checkpoint loads into a fresh model of the same name
    with torch.no_grad():
        assert rel_err(fresh(x), want) < 1e-5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in untouched.items())  # the input is untouched
    assert not _tensor_ids(out) & (_tensor_ids(model) | _tensor_ids(gm))  # and shares no tensor with the result


def _tensor_ids(m: nn.Module) -> set[int]:
    return {id(t) for t in [*m.parameters(), *m.buffers()]}


class _Wrapped(nn.Module):
    """A layer wrapped with an adapter of its own (PEFT's tuner layers call theirs ``base_layer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(6, 6, bias=False)
        self.lora_A = nn.Linear(6, 2, bias=False)
        self.lora_B = nn.Linear(2, 6, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * 0.5


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return x * self.gamma


class _Model(nn.Module):
    def __init__(self, inline_scale: bool = False) -> None:
        super().__init__()
        self.proj = _Wrapped()
        self.norm = nn.BatchNorm1d(6)
        self.ls = _Scale()
        self.head = nn.Linear(6, 3)
        self.inline = nn.Parameter(torch.rand(6) + 0.5) if inline_scale else None

    def forward(self, x):
        h = torch.relu(self.proj(x))
        h = self.ls(self.norm(h))
        if self.inline is not None:
            h = h * self.inline  # functional code of the model's own: a class edit cannot remove it
        return self.head(h)


def _toy(**kw):
    torch.manual_seed(0)
    model = _Model(**kw).eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    return model, torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def test_a_wrapper_becomes_its_layer_and_folded_modules_become_identities():
    model, x = _toy()
    plain = copy.deepcopy(model)
    nn.init.zeros_(plain.proj.lora_B.weight)
    plain.norm, plain.ls = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) > 1e-2  # the adapter, the norm and the scale change the output
    out, report = repfold.fold(model, example_inputs=(x,), into=model, return_report=True)
    assert type(out) is _Model
    assert isinstance(out.proj, nn.Linear) and out.proj is not model.proj.base_layer  # re-weighted copy
    assert isinstance(out.norm, nn.Identity) and isinstance(out.ls, nn.Identity)
    assert any("proj (_Wrapped) -> its base_layer" in e for e in report.edits), report.edits
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
    assert isinstance(model.proj, _Wrapped) and isinstance(model.norm, nn.BatchNorm1d)  # untouched


def test_functional_code_the_fold_removed_refuses_the_class_with_the_reason():
    model, x = _toy(inline_scale=True)
    with pytest.raises(ValueError, match="computes something else than the folded graph"):
        repfold.fold(model, example_inputs=(x,), into=model)


def test_an_adapter_that_did_not_fold_is_named():
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 5, 6)
    with pytest.warns(UserWarning, match="will not fold"):  # between a GELU and a LayerNorm: no layer takes it
        gm = repfold.insert(model, before="2", example_inputs=x)
    randomize_adapters(gm)
    with pytest.raises(ValueError, match="did not fold"):
        repfold.fold(gm, into=model)


def test_into_takes_a_module_only():
    model, x = _toy()
    with pytest.raises(TypeError, match="into="):
        repfold.fold(torch.export.export(model, (x,)), into=model)


def test_peft_lora_layers_become_their_re_weighted_base_layers():
    """PEFT's LoRA wrappers (traced by torch.export, as fold does for a PeftModel) are each replaced by their
    base layer, re-weighted: what ``merge_and_unload`` does to them, with the fold's check."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    config = peft.LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        assert rel_err(want, base(x)) > 1e-2
    out, report = repfold.fold(model, example_inputs=(x,), into=model, return_report=True)
    assert type(out) is type(model) and len(report.edits) == 2
    inner = out.base_model.model
    assert [type(m) for m in inner] == [nn.Linear, nn.ReLU, nn.Linear], inner
    merged = copy.deepcopy(model).merge_and_unload()
    assert sum(p.numel() for p in inner.parameters()) == sum(p.numel() for p in merged.parameters())
    with torch.no_grad():
        assert rel_err(out(x), want) < 1e-5 and rel_err(inner(x), want) < 1e-5


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_the_fewest_structural_edits_keep_the_models_layout():
    """A conv's BatchNorm becomes an identity and the conv stays where it was (its state dict keys with it),
    although the block is then a wrapper of one layer: the wrapper rule is only for a wrapper whose own
    code still runs what folded."""
    torch.manual_seed(0)
    model = nn.Sequential(_ConvBN(), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bn.running_mean.normal_()
        model[0].bn.bias.normal_()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(model)
    plain[0].bn = nn.Identity()
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) > 1e-2  # the BatchNorm the fold takes changes the output
    out = repfold.fold(model, example_inputs=(x,), into=model)
    assert isinstance(out[0], _ConvBN) and isinstance(out[0].bn, nn.Identity)
    assert set(out.state_dict()) == {"0.conv.weight", "0.conv.bias"}
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
    # code of the model's own that folds its BatchNorms again (ultralytics' fuse(), run by its exporter) finds
    # one that changes nothing: the conv comes back bitwise as it is
    again = torch.nn.utils.fusion.fuse_conv_bn_eval(out[0].conv, out[0].bn)
    assert torch.equal(again.weight, out[0].conv.weight) and torch.equal(again.bias, out[0].conv.bias)


def _hf(family: str):
    """A small Hugging Face classifier with random weights, and an input for it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
        return (transformers.ViTForImageClassification(config).eval(),
                torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return (transformers.BertForSequenceClassification(config).eval(),
            torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_peft_lora_classifier_round_trips_through_save_pretrained(tmp_path, family):
    """A Hugging Face classifier with PEFT LoRA on every Linear of its blocks: ``fold(model)`` gives what
    ``merge_and_unload`` returns, the base model of its own class (the PeftModel's ``get_base_model()``),
    re-weighted; it saves and loads with transformers' own ``save_pretrained`` / ``from_pretrained`` and
    reproduces the eager model with adapters."""
    peft = pytest.importorskip("peft")
    base, x = _hf(family)
    linears = sorted({n.rpartition(".")[2] for n, m in base.named_modules()
                      if isinstance(m, nn.Linear) and m is not base.classifier})  # every Linear of its blocks
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=linears, r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        want = model(x).logits
        assert rel_err(want, base(x).logits) > 1e-3
    inner, report = repfold.fold(model, example_inputs=(x,), return_report=True)  # the default: its own class,
    assert type(inner) is type(base) and not report.kept  # unwrapped as merge_and_unload does
    assert report.into == type(base).__name__ and "get_base_model()" in report.edits[-1]
    merged = copy.deepcopy(model).merge_and_unload()

    def layers(m):  # the modules that hold weights (the fold also made eval-mode dropouts identities)
        return sorted(type(t).__name__ for t in m.modules() if next(t.parameters(recurse=False), None) is not None)

    assert layers(inner) == layers(merged)
    assert sum(p.numel() for p in inner.parameters()) == sum(p.numel() for p in merged.parameters())
    inner.save_pretrained(tmp_path)
    back = type(base).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(back(x).logits, want) < 1e-5


def test_a_module_folds_into_its_own_class_by_default():
    model, x = _toy()
    plain = copy.deepcopy(model)
    nn.init.zeros_(plain.proj.lora_B.weight)
    plain.norm, plain.ls = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) > 1e-2  # the adapter, the norm and the scale change the output
    out, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    assert type(out) is _Model and isinstance(out.proj, nn.Linear) and isinstance(out.norm, nn.Identity)
    assert report.into == "_Model" and report.into_error <= 1e-6 and not report.kept
    assert not _tensor_ids(out) & _tensor_ids(model)
    graph = repfold.fold(model, example_inputs=(x,), graph=True)
    assert isinstance(graph, torch.fx.GraphModule)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5 and rel_err(graph(x), model(x)) < 1e-5


class _Inline(nn.Module):
    """An adapter module beside one written inline in ``forward``: the class cannot drop the inline one."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = _Wrapped()
        self.down, self.up = nn.Linear(6, 2), nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.adapter(x))
        h = h + self.up(self.down(h))  # an adapter spelled inline
        return self.head(h)


def test_an_adapter_written_inline_is_left_in_the_class_warned_and_folded_with_graph_true():
    torch.manual_seed(0)
    model = _Inline().eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(model)
    nn.init.zeros_(plain.up.weight)
    nn.init.zeros_(plain.up.bias)
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) > 1e-2  # the inline adapter changes the output
    with pytest.warns(UserWarning, match="1 adapter region.* left running in _Inline"):
        out, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    assert type(out) is _Inline and isinstance(out.adapter, nn.Linear)  # the module adapter folded
    assert isinstance(out.up, nn.Linear) and torch.equal(out.up.weight, model.up.weight)  # the inline one stays
    [kept] = report.kept
    assert "forward code" in kept.reason and "graph=True" in kept.reason
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph, g_report = repfold.fold(model, example_inputs=(x,), graph=True, return_report=True)
    assert not g_report.kept and isinstance(graph, torch.fx.GraphModule)
    with torch.no_grad():
        assert rel_err(graph(x), model(x)) < 1e-5


def test_a_timm_vit_with_seed_style_adapter_modules_folds_to_its_class(tmp_path):
    """The RepAdapter paper's own code: adapter modules set on each block, and the block's forward replaced
    by one that calls them. The fold makes them identities: a ``VisionTransformer`` with the base model's
    parameters, whose state dict loads into a fresh ``timm.create_model``."""
    model = _vit()
    base = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)

    def forward(self, x):  # as in the seed code: the adapters before attn and mlp, the rest timm's
        x = x + self.drop_path1(self.ls1(self.attn(self.adapter_attn(self.norm1(x)))))
        return x + self.drop_path2(self.ls2(self.mlp(self.adapter_mlp(self.norm2(x)))))

    for block in model.blocks:
        for name in ("adapter_attn", "adapter_mlp"):
            adapter = repfold.RepAdapter(model.embed_dim, hidden_dim=8, groups=2).eval()
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            setattr(block, name, adapter)
        block.forward = types.MethodType(forward, block)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        assert rel_err(want, base(x)) > 1e-2
    out, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    assert type(out).__name__ == "VisionTransformer" and len(report.folded) == 4 and not report.kept
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in base.parameters())
    torch.save(out.state_dict(), tmp_path / "folded.pt")  # the checkpoint a user ships, into a fresh model
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    fresh.load_state_dict(torch.load(tmp_path / "folded.pt"))
    with torch.no_grad():
        assert rel_err(out(x), want) < 1e-5 and rel_err(fresh(x), want) < 1e-5


def test_timm_reparameterizable_blocks_fold_in_their_class_as_timms_merge_does():
    """RepVGG's branches are submodules summed in the block's forward: the block becomes the chain of
    layers left of it (its 3x3 conv, then its activation), named as they were; as many convs as timm's
    ``reparameterize_model``, no BatchNorm."""
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    with torch.no_grad():
        assert rel_err(model(x), fresh(x)) > 1e-2  # the statistics the fold takes change the output
    out, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    ref = timm.utils.reparameterize_model(copy.deepcopy(model))

    def count(m, kind):
        return sum(isinstance(t, kind) for t in m.modules())

    assert type(out) is type(model) and not report.kept
    assert count(out, nn.Conv2d) == count(ref, nn.Conv2d) and count(out, nn.BatchNorm2d) == 0
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5


def test_a_norm_weight_in_forward_code_stays_and_the_lora_after_it_folds():
    """Llama's RMSNorm multiplies by its weight in its own forward: in the graph that scale and the LoRA
    adapters on q, k, v after it are one region. The class keeps the scale where it is (the region is cut
    there) and folds the adapters alone: what ``merge_and_unload`` gives, unwrapped to the ``LlamaModel``."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=50, num_key_value_heads=2, use_cache=False)
    base = transformers.LlamaModel(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
        init_lora_weights=False)).eval()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        assert rel_err(want, base(ids).last_hidden_state) > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no adapter is left running
        out, report = repfold.fold(model, example_inputs=(ids,), return_report=True)
    assert type(out) is type(base) and not report.kept and len(report.layered) == 4
    merged = copy.deepcopy(model).merge_and_unload()
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in merged.parameters())
    assert torch.equal(out.layers[0].input_layernorm.weight, base.layers[0].input_layernorm.weight)
    with torch.no_grad():
        assert rel_err(out(ids).last_hidden_state, want) < 1e-5


class _Indexed(nn.Module):
    """Layers in a ModuleList its forward indexes (diffusers' attention: ``self.to_out[0]``, ``[1]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_out = nn.ModuleList([nn.Linear(6, 6), nn.Dropout(0.1)])

    def forward(self, x):
        return self.to_out[1](self.to_out[0](x))


def test_a_container_the_code_indexes_keeps_its_entries_and_their_fold():
    """After the fold, all that is left of ``to_out`` is its Linear: the list stays a list (the code
    indexes it), its Linear becomes the re-weighted base layer."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Indexed().eval()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["to_out.0"], r=2, init_lora_weights=False)).eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        assert rel_err(want, base(x)) > 1e-2
    out, report = repfold.fold(model, example_inputs=(x,), return_report=True)
    assert type(out) is _Indexed and not report.kept
    assert isinstance(out.to_out, nn.ModuleList) and isinstance(out.to_out[0], nn.Linear)
    with torch.no_grad():
        assert rel_err(out(x), want) < 1e-5
