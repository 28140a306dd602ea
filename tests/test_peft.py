"""Interop: a PEFT LoRA model (LoRA on a timm ViT's qkv and fc1) folds like PEFT's own merge_and_unload()."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import image, make_vit, rel_err
from test_cli import export, ops, run

import repfold

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora():
    model, x = make_vit(), image()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.0)
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))  # as if trained
    adapted.eval()
    with torch.no_grad():
        assert rel_err(adapted(x), model(x)) > 1e-2
    merged = copy.deepcopy(adapted).merge_and_unload()
    return adapted, merged, x


def test_peft_lora_onnx_folds_to_the_merged_export(lora):
    adapted, merged, x = lora
    exported, reference = export(adapted, x), export(merged, x)
    folded, report = repfold.fold(exported, return_report=True)
    assert len(report.layered) == 4 and not report.kept
    assert all("base_layer" in r.into[0] for r in report.layered)
    assert ops(folded) == ops(repfold.fold(reference))  # GELU's × 0.5 folds in both
    assert report.params_after == repfold.fold(reference, return_report=True)[1].params_after
    assert rel_err(run(folded, x.numpy()), run(exported, x.numpy())) < 1e-5


def test_peft_lora_through_torch_export_folds_to_the_merged_program(lora):
    """A PEFT model does not trace with torch.fx; torch.export takes it, and the fold gives the program of
    ``merge_and_unload`` (PEFT's per-layer casts of the LoRA input go with the LoRA branch)."""
    from collections import Counter

    adapted, merged, x = lora
    folded, report = repfold.fold(torch.export.export(adapted, (x,)), return_report=True)
    assert len(report.regions) == 4 and len(report.folded) == 4, str(report)
    reference = torch.export.export(merged, (x,))

    def aten(ep):  # eval-mode dropout may leave a re-export: no op of the merged model's is missing or extra
        return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "dropout" not in str(n.target))

    assert aten(folded) == aten(reference)
    peft_names = sorted(k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in folded.state_dict)
    assert peft_names == sorted(reference.state_dict)  # PEFT's paths, the LoRA weights gone
    with torch.no_grad():
        assert rel_err(folded.module()(x), adapted(x)) < 1e-5


def _configs():
    targets = ["qkv", "attn.proj", "fc1", "fc2"]
    return {
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
        "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=targets),
        "lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=targets),
        "boft": peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=targets),
        "ia3": peft.IA3Config(target_modules=targets, feedforward_modules=["fc2"]),
        "vera": peft.VeraConfig(r=4, target_modules=targets),
        "fourierft": peft.FourierFTConfig(n_frequency=64, target_modules=targets),
        "hra": peft.HRAConfig(r=4, target_modules=targets),
        "oft": peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets),
    }


def _trained(model, config, x):
    """PEFT's model for ``config`` with every adapter weight random and non-zero (as if trained: PEFT starts
    most at zero effect), checked to change the output; ``(adapted, merge_and_unload's model, its output)``."""
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    adapted.eval()
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    with torch.no_grad():
        y = adapted(x)
        assert rel_err(y, model(x)) > 1e-3
    return adapted, merged, y


# what the exporters themselves cannot export (before repfold sees the model)
_UNEXPORTABLE = {("lokr", "torchscript"), ("fourierft", "torchscript"), ("boft", "torchscript"),
                 ("boft", "dynamo"), ("hra", "export"), ("hra", "dynamo")}


@pytest.mark.parametrize("path", ["export", "torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["dora", "loha", "lokr", "boft", "ia3", "vera", "fourierft", "hra", "oft"])
def test_every_mergeable_peft_type_folds_to_at_most_the_merged_models_operators(kind, path):
    """The adapter's weight is computed at run time from its parameters (LoHa's Hadamard product, LoKr's
    Kronecker product, BOFT's Cayley rotations, DoRA's weight norm, VeRA's scaled shared matrices,
    FourierFT's inverse FFT, HRA's Householder reflections of the layer's own weight, OFT's block rotations
    of the layer's input), or it is a per-channel scale (IA3): that weight-only subgraph is evaluated in
    float64 and the region folds, on qkv, attn.proj, fc1 and fc2, to no more operators than the same export
    of ``merge_and_unload``'s model."""
    from collections import Counter

    from conftest import export as onnx_export

    if (kind, path) in _UNEXPORTABLE:
        pytest.skip("the exporter cannot export this adapter type")
    model, x = make_vit(), image()
    adapted, merged, y = _trained(model, _configs()[kind], x)
    if path == "export":
        folded, report = repfold.fold(torch.export.export(adapted, (x,)), return_report=True)
        with torch.no_grad():
            got = folded.module()(x)

        def count(ep):
            return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "dropout" not in
                           str(n.target))

        have, most = count(folded), count(torch.export.export(merged, (x,)))
    else:
        proto = onnx_export(adapted, x, dynamo=path == "dynamo")
        folded, report = repfold.fold(proto, return_report=True)
        got = torch.from_numpy(run(folded, x.numpy()))
        have, most = ops(folded), ops(onnx_export(merged, x, dynamo=path == "dynamo"))
        have.pop("Constant", None), most.pop("Constant", None)
    assert len(report.folded) >= 8 and not report.kept, str(report)
    assert all(n <= most.get(k, 0) for k, n in have.items()), (have - most)
    assert rel_err(got, y) < 1e-5


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_peft_on_convs_through_torch_export_folds_into_the_base_convs(kind):
    """PEFT on a ResNet's 1×1 and 3×3 convs: LoHa / LoKr / DoRA compute the conv's ``ΔW`` at run time, and
    torch.export leaves that conv an ATen call of a computed weight (read as ``F.conv2d``). Each adapter folds
    into its base conv, and the program has no more ops than ``merge_and_unload``'s."""
    from collections import Counter

    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # (timm starts each block's last gain at zero)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = r".*layer\d\.\d\.conv[12]"  # each basic block's two 3×3 convs (a string: PEFT's full-match regex)
    config = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
              "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
              "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=targets),
              "lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=targets)}[kind]
    adapted, merged, y = _trained(model, config, x)
    folded, report = repfold.fold(torch.export.export(adapted, (x,)), return_report=True)
    assert len(report.layered) == 8 and len(report.folded) == len(report.regions), str(report)
    assert all("base_layer" in r.into[0] for r in report.layered), str(report)

    def count(ep):
        return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")

    have, most = count(folded), count(torch.export.export(merged, (x,)))
    assert all(n <= most.get(k, 0) for k, n in have.items()), (have - most)
    with torch.no_grad():
        assert rel_err(folded.module()(x), y) < 1e-5
