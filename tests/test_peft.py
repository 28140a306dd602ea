"""Interop: a PEFT LoRA model (LoRA on a timm ViT's qkv and fc1) folds like PEFT's own merge_and_unload()."""

from __future__ import annotations

import copy
import math

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
    assert len(report.regions) == 4 and len(report.folded) == 4
    assert all("base_layer" in r.into[0] for r in report.regions)
    assert ops(folded) == ops(reference)
    assert report.params_after == sum(math.prod(t.dims) for t in reference.graph.initializer)
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
