"""Real backbones: adapters before attention and MLP, random weights, folded in fx and via ONNX.

Small variants keep CI fast; every parameter that a fresh model initialises
to (nearly) zero, such as heads and LayerScale, is made random so the
adapters' effect reaches the output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import export, randomize_adapters, rel_err, timm

import repfold
from repfold._fx import op_counts as fx_counts
from repfold._onnx import op_counts as onnx_counts

BACKBONES = {
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                                       window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
             dict(before=["attn", "mlp"]), 64),
    "swin-after-norm1": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                                                   window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
                         dict(after=["norm1"]), 64),
    "convnext": (lambda: timm.create_model("convnext_atto", pretrained=False), dict(before=["mlp"]), 64),
    "convnext-conv-mlp": (lambda: timm.create_model("convnext_atto", pretrained=False, conv_mlp=True),
                          dict(before=["mlp"]), 64),
    "torchvision-vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                     num_heads=2, hidden_dim=32, mlp_dim=64),
                        dict(before=["self_attention", "mlp"]), 32),
}


def build(name: str, dtype=torch.float64):
    make, where, size = BACKBONES[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.1)
    model = model.to(dtype)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)
    gm = repfold.insert(model, example_inputs=x, **where)
    randomize_adapters(gm)
    gm.eval()
    return model, gm, x


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_fx_fold_of_a_real_backbone(name, dtype, tol):
    model, gm, x = build(name, dtype)
    folded, report = repfold.fold(gm, return_report=True)
    folded.graph.lint()
    with torch.no_grad():
        y_base, y_adapted, y_folded = model(x), gm(x), folded(x)
    assert rel_err(y_adapted, y_base) > 1e-3, "the adapters must change the output"
    assert rel_err(y_folded, y_adapted) < tol
    assert report.regions and all(r.folded for r in report.regions), str(report)
    assert fx_counts(folded) == fx_counts(repfold.fold(model, example_inputs=x))


def test_convnext_keeps_the_adapter_before_its_depthwise_conv():
    model, _, x = build("convnext")
    gm = repfold.insert(model, before=["conv_dw", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        assert rel_err(folded(x), gm(x)) < 1e-10
    mlp = [r for r in report.regions if all("mlp" in i for i in r.into) and r.folded]
    kept = report.kept
    assert len(mlp) == 12 and len(kept) == 11
    assert all("would densify a depthwise conv" in r.reason or "also feeds" in r.reason for r in kept)


def _run(proto, x):
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["swin", "convnext", "convnext-conv-mlp", "torchvision-vit"])
def test_onnx_fold_of_a_real_backbone(name, dynamo):
    import onnx

    model, gm, x = build(name, torch.float32)
    adapted, base = export(gm, x, dynamo), export(model, x, dynamo)
    folded, report = repfold.fold(adapted, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    assert report.regions and all(r.folded for r in report.regions), str(report)
    y_adapted, y_folded = _run(adapted, x), _run(folded, x)
    assert rel_err(y_adapted, _run(base, x)) > 1e-3
    assert rel_err(y_folded, y_adapted) < 1e-5
    got, want = onnx_counts(folded), onnx_counts(base)
    # The TorchScript exporter folds shape arithmetic into Constant nodes differently
    # for the two graphs; every other operator count must match.
    got.pop("Constant", None), want.pop("Constant", None)
    assert got == want
    assert n_weights(folded) == n_weights(base)


def n_weights(proto) -> int:
    """Elements in initializers and Constant nodes (exporters store buffers as either)."""

    n = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.name == "value")
    return n


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_dynamic_batch_export_folds_and_stays_dynamic(name):
    """Shape arithmetic on a dynamic batch (Swin's window partition) keeps the channel axis whole."""
    from test_cli import export

    model, gm, x = build(name, torch.float32)
    adapted = export(gm, x, {"image": {0: "batch"}})
    folded, report = repfold.fold(adapted, return_report=True)
    assert report.regions and all(r.folded for r in report.regions), str(report)
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        assert rel_err(_run(folded, xb), _run(adapted, xb)) < 1e-5
