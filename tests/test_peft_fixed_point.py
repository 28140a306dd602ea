"""PEFT LoRA on a ViT's patch embedding: a fold that makes another possible runs to the end, on every path.

``LoraConfig(target_modules=["proj"])`` on a timm ViT takes ``attn.proj`` (a Linear) and ``patch_embed.proj``
(a 16x16 stride-16 Conv2d). On the conv, LoRA is a branch of two convs beside the base conv, all three reading
the image: ``base(x) + s·B(A(x))`` with ``A`` a 16x16 stride-16 conv and ``B`` a 1x1 conv. Composed, the branch
is one conv of the base conv's geometry, which sums into it: PEFT's ``merge_and_unload()`` leaves one conv.

The fold once found that sum, and then gave it up: the patch embedding's flatten ends the convs' kernel maps,
which sent the next planning pass to start a region at each conv, and that pass folded only the LoRA's scale
into its up-projection (three convs ran) while the report said every region folded.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import export as onnx_export
from conftest import rel_err
from test_cli import ops, run

import repfold
from repfold.core import engine as _engine

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

PATHS = ["fx", "export", "torchscript", "dynamo"]


def _lora_vit(dtype=torch.float32):
    """(PEFT model with random LoRA weights on every ``proj``, its ``merge_and_unload()`` model, input, output)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0)
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    assert isinstance(adapted.base_model.model.patch_embed.proj.base_layer, torch.nn.Conv2d)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:  # as if trained: PEFT starts lora_B at zero
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    adapted = adapted.to(dtype).eval()
    model = model.to(dtype)
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = adapted(x)
        assert rel_err(y, model(x)) > 1e-3  # the adapters change the output
        assert rel_err(merged(x), y) < (1e-5 if dtype == torch.float32 else 1e-12)
    return adapted, merged, x, y


@pytest.fixture(scope="module")
def lora():
    return _lora_vit()


def _aten(ep) -> Counter:
    """The ATen operators of a program (eval-mode dropout and dtype asserts, which a re-export may leave or
    not, aside)."""
    skip = ("dropout", "_assert_tensor_metadata")
    return Counter(str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and not any(s in str(n.target) for s in skip))


def _heavy(counts: Counter) -> int:
    return sum(n for k, n in counts.items() if any(h in k.lower() for h in ("conv", "linear", "gemm", "matmul",
                                                                             "addmm", ".mm", "bmm")))


def _fold(path: str, adapted, merged, x):
    """``(folded output, report, folded op counts, merged op counts, the folded model)`` on ``path``."""
    if path == "fx":
        folded, report = repfold.fold(adapted, example_inputs=(x,), return_report=True, graph=True)
        assert isinstance(folded, torch.fx.GraphModule)
        with torch.no_grad():
            got = folded(x)
            # the GraphModule and the merged model, each exported by torch.export: one vocabulary of operators
            have, most = _aten(torch.export.export(folded, (x,))), _aten(torch.export.export(merged, (x,)))
        convs = [n for n in folded.graph.nodes
                 if n.op == "call_module" and isinstance(folded.get_submodule(n.target), torch.nn.Conv2d)]
        assert len(convs) == 1, folded.graph
    elif path == "export":
        folded, report = repfold.fold(torch.export.export(adapted, (x,)), return_report=True)
        with torch.no_grad():
            got = folded.module()(x)
        have, most = _aten(folded), _aten(torch.export.export(merged, (x,)))
    else:
        dynamo = path == "dynamo"
        folded, report = repfold.fold(onnx_export(adapted, x, dynamo=dynamo), return_report=True)
        got = torch.from_numpy(run(folded, x.numpy()))
        have, most = ops(folded), ops(onnx_export(merged, x, dynamo=dynamo))
    return got, report, have, most, folded


@pytest.mark.parametrize("path", PATHS)
def test_lora_on_the_patch_embedding_sums_into_its_conv(lora, path):
    """Every path folds the conv LoRA (its two convs composed, then summed into the base conv) and both
    attention projections' LoRAs: no operator kind more than the same export of ``merge_and_unload()``'s
    model, the eager PEFT model's outputs, and a report that names the patch embedding's base conv."""
    adapted, merged, x, y = lora
    got, report, have, most, folded = _fold(path, adapted, merged, x)
    assert all(n <= most.get(k, 0) for k, n in have.items()), (have - most, str(report))
    assert _heavy(have) <= _heavy(most), (have - most, str(report))
    assert rel_err(got, y) < 1e-5, str(report)
    assert len(report.layered) == 3 and not report.kept, str(report)
    into = [i for r in report.layered for i in r.into]
    assert sum("patch_embed" in i or "Conv" in i or "conv" in i for i in into) == 1, str(report)
    # a fixed point: folding the result again finds nothing more to fold
    again = repfold.fold(folded, **({"example_inputs": (x,)} if path == "fx" else {}), return_report=True, graph=True)[1]
    assert not again.layered, str(again)


@pytest.mark.parametrize("path", ["fx", "export"])
def test_lora_on_the_patch_embedding_folds_exactly_in_float64(path):
    adapted, merged, x, y = _lora_vit(torch.float64)
    got, report, have, most, _ = _fold(path, adapted, merged, x)
    assert all(n <= most.get(k, 0) for k, n in have.items()), (have - most, str(report))
    assert len(report.layered) == 3 and not report.kept, str(report)
    assert rel_err(got, y) < 1e-12


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_a_fold_given_up_by_a_later_pass_is_reported_kept(lora, path, monkeypatch):
    """A planning pass that starts regions elsewhere (here: forced to start one at each conv of the patch
    embedding, as the pass after the kernel maps' flatten did) must not make a folded adapter vanish from the
    report while its layers still run: the layers a fold of an earlier pass removed and the final plan
    neither folds nor reports are reported kept."""
    adapted, merged, x, y = lora
    plan_once = _engine._plan_once

    def restart_at_the_convs(steps, consumers, shape, label, scales, dtype, shape_reads, position, hazard,
                             fresh, cuts, *rest):
        result, more, *others = plan_once(steps, consumers, shape, label, scales, dtype, shape_reads,
                                          position, hazard, fresh, cuts, *rest)
        image = {f.source for f in result.folds if "16x16" in next(s.label for s in steps if s.name == f.absorber)}
        more = more | {s.name for s in steps if s.op.heavy and s.inputs and s.inputs[0] in image}
        return result, more, *others

    monkeypatch.setattr(_engine, "_plan_once", restart_at_the_convs)
    got, report, have, most, _ = _fold(path, adapted, merged, x)
    assert rel_err(got, y) < 1e-5
    assert _heavy(have) > _heavy(most)  # the forced restart leaves the LoRA's convs running
    kept = [r for r in report.kept if not r.scale]
    assert kept, str(report)  # and the report says so
    assert any("still run" in r.reason for r in kept), str(report)
