"""Real backbones: adapters before attention and MLP, random weights, folded in fx and via ONNX.

Small variants keep CI fast; every parameter that a fresh model initialises
to (nearly) zero, such as heads and LayerScale, is made random so the
adapters' effect reaches the output.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_base_operators, export, fold_checked, randomize_adapters, rel_err, timm

import repfold
from repfold.frontends.fx import op_counts as fx_counts
from repfold.frontends.onnx import n_weights
from repfold.frontends.onnx import op_counts as onnx_counts

BACKBONES = {
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                                       window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
             {"before": ["attn", "mlp"]}, 64),
    "swin-after-norm1": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                                                   window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
                         {"after": ["norm1"]}, 64),
    "convnext": (lambda: timm.create_model("convnext_atto", pretrained=False), {"before": ["mlp"]}, 64),
    "convnext-conv-mlp": (lambda: timm.create_model("convnext_atto", pretrained=False, conv_mlp=True),
                          {"before": ["mlp"]}, 64),
    "torchvision-vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                     num_heads=2, hidden_dim=32, mlp_dim=64),
                        {"before": ["self_attention", "mlp"]}, 32),
}



def _timm(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


# More families, each in its smallest variant; adapters before the attention and MLP scopes (by their names).
BACKBONES.update({
    "vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), {"before": ["attn", "mlp"]}, 32),
    "deit": (_timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), {"before": ["attn", "mlp"]}, 32),
    "pvt-v2": (_timm("pvt_v2_b0"), {"before": ["attn", "mlp"]}, 64),
    "twins": (_timm("twins_pcpvt_small", img_size=64, depths=(1, 1, 1, 1)), {"before": ["attn", "mlp"]}, 64),
    "poolformer": (_timm("poolformer_s12"), {"before": ["mlp"]}, 64),
    "mixer": (_timm("mixer_s16_224", img_size=32), {"before": ["mlp_tokens", "mlp_channels"]}, 32),
    "edgenext": (_timm("edgenext_xx_small"), {"before": ["mlp"]}, 64),
    "cait": (_timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1),
             {"before": ["attn", "mlp"]}, 32),
    "beit": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
             {"before": ["attn", "mlp"]}, 32),
    # MobileNetV3: before the squeeze-excite's and the head's biased 1x1 convs, and before the bias-free
    # 1x1 convs of the blocks (each takes a bias); all fold
    "mobilenetv3": (_timm("mobilenetv3_small_050"), {"before": ["conv_pw", "conv_reduce", "conv_head"]}, 64),
})

# Adapters a backbone keeps, by frontend, and what every such reason says. Each is a limit of the rules,
# not a wrong fold: the region reaches an op the algebra cannot see through.
KEPT = {
    # class attention reads the class token alone (a slice of the tokens)
    "cait": ({"fx": 1, "onnx": 1}, "no layer can absorb it"),
    # (mobilenetv3 keeps none: in blocks 1.1, 2.1 and 4.1 the adapter before conv_pw reads the previous
    # block's output, its conv_pwl's BatchNorm, which the block's residual sum reads too; the region grew from
    # before that conv_pwl through the adapter into conv_pw and folded into no one layer. It is now cut where
    # the adapter's branches part from the value it reads: tests/test_fanout.py)
}


def same_kinds(counts: dict) -> dict:
    """Operator counts with fx's two spellings of one permutation counted together."""
    out = dict(counts)
    if "transpose" in out:
        out["permute"] = out.get("permute", 0) + out.pop("transpose")
    return out


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
    check_kept(name, "fx", report, gm)
    if not report.kept:  # the base model's operators, or fewer (BEiT's run-time qkv bias is a constant now)
        got, base = same_kinds(fx_counts(folded)), same_kinds(fx_counts(repfold.fold(model, example_inputs=x, graph=True)))
        assert all(n <= base.get(k, 0) for k, n in got.items()), (got, base)


def test_folded_multihead_attention_model_exports_as_its_base_does():
    """insert freezes every base weight, and a frozen nn.MultiheadAttention in eval mode takes PyTorch's
    fused path, which TorchScript cannot export; the folded model has its trainable flags back."""
    _model, gm, x = build("torchvision-vit", torch.float32)
    folded, report = repfold.fold(gm, return_report=True)
    check_kept("torchvision-vit", "fx", report, gm)
    proto = export(folded, x, dynamo=False)
    with torch.no_grad():
        assert rel_err(_run(proto, x), folded(x)) < 1e-5


# Regions that hold two adapters, by frontend (none now: a region that would leave a second adapter behind
# its first one's layer is cut after that layer, and the rest planned as a region of its own).
SHARED: dict[str, dict[str, int]] = {}


def _holds(region, target: str) -> bool:
    """Whether an op of ``region`` belongs to the adapter module ``target`` (fx and TorchScript op names)."""
    own = target.removeprefix("repfold_adapters.")
    return any(f"{target}." in op or f"/{own}/" in op for op in region.ops)


def check_kept(name: str, frontend: str, report, gm) -> None:
    """Every adapter ``insert`` placed is in exactly one region, folded or kept for the reason KEPT gives.

    An adapter the fold does not find would pass every other check: left in place, it stays exact.
    """
    counts, why = KEPT.get(name, ({}, ""))
    targets = list(gm.meta["repfold"]["adapters"].values())
    shared = SHARED.get(name, {}).get(frontend, 0)
    # (the model's own LayerScale, BatchNorm or constant scales fold too, as regions of their own)
    assert targets and len(report.layered) == len(targets) - shared, f"{len(targets)} adapters inserted\n{report}"
    assert all(why in r.reason for r in report.kept), str(report)
    where = {t: [r for r in report.layered if _holds(r, t)] for t in targets}
    if any(where.values()):  # the adapters' names survive (fx, TorchScript export; the dynamo export renames)
        lost = [t for t, rs in where.items() if len(rs) != 1]
        assert not lost, f"adapters not in exactly one region: {lost}\n{report}"
        assert all(any(_holds(r, t) for t in targets) for r in report.layered), f"a region without an adapter\n{report}"
        kept = sum(not rs[0].folded for rs in where.values())
    else:
        assert not shared
        kept = len(report.kept)
    assert kept == counts.get(frontend, 0), f"{kept} adapters kept\n{report}"


def test_convnext_keeps_the_adapter_before_its_depthwise_conv():
    model, _, x = build("convnext")
    gm = repfold.insert(model, before=["conv_dw", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) > 1e-3
        assert rel_err(folded(x), gm(x)) < 1e-10
    mlp = [r for r in report.layered if all("mlp" in i for i in r.into) and r.folded]
    kept = report.kept
    assert len(gm.meta["repfold"]["adapters"]) == 24
    assert len(report.layered) == 24, str(report)  # one per adapter (LayerScale folds too, as a region of its own)
    assert len(mlp) == 12 and len(kept) == 12
    assert all("would densify a depthwise conv" in r.reason or "also feeds" in r.reason for r in kept)


def _run(proto, x):
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


ONNX_CASES = [(name, False) for name in BACKBONES if name != "swin-after-norm1"] + [
    (name, True) for name in ("swin", "convnext", "convnext-conv-mlp", "torchvision-vit")  # dynamo: slower
]


@pytest.mark.parametrize("name, dynamo", ONNX_CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in ONNX_CASES])
def test_onnx_fold_of_a_real_backbone(name, dynamo):
    import onnx

    model, gm, x = build(name, torch.float32)
    adapted, base = export(gm, x, dynamo), export(model, x, dynamo)
    folded, report = repfold.fold(adapted, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    check_kept(name, "onnx", report, gm)
    y_adapted, y_folded = _run(adapted, x), _run(folded, x)
    assert rel_err(y_adapted, _run(base, x)) > 1e-3
    assert rel_err(y_folded, y_adapted) < 1e-5
    if not report.kept:
        assert_base_operators(onnx_counts(folded), onnx_counts(base))  # PoolFormer: GroupNorm's affine folds too
        assert n_weights(folded) <= n_weights(base)


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_dynamic_batch_export_folds_and_stays_dynamic(name):
    """Shape arithmetic on a dynamic batch (Swin's window partition) keeps the channel axis whole."""
    from test_cli import export

    _model, gm, x = build(name, torch.float32)
    adapted = export(gm, x, {"image": {0: "batch"}})
    folded, report = repfold.fold(adapted, return_report=True)
    check_kept(name, "onnx", report, gm)
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        assert rel_err(_run(folded, xb), _run(adapted, xb)) < 1e-5


def test_full_size_vit_b16_folds_in_fx():
    """One full-size backbone in every run: ViT-B/16 (86 M parameters), random biases, batch 1, float32."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or p.abs().max() < 1e-3:  # biases as in a trained model; the head too
                p.normal_(0, 0.02)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm, std=0.05)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3, "the adapters must change the output"
        assert rel_err(folded(x), y) <= 1e-5
    assert len(gm.meta["repfold"]["adapters"]) == len(report.layered) == 24 and not report.kept, str(report)
    n_base = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in folded.parameters()) == report.params_after <= n_base


FULL_SIZE = {
    "vit-b16": ("vit_base_patch16_224", ["attn", "mlp"]),
    "deit-s": ("deit_small_patch16_224", ["attn", "mlp"]),
    "swin-t": ("swin_tiny_patch4_window7_224", ["attn", "mlp"]),
    "convnext-t": ("convnext_tiny", ["mlp"]),
    "pvt-v2-b1": ("pvt_v2_b1", ["attn", "mlp"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_backbone(name):
    """`make test-slow`: the real sizes, folded in fx (float32) and through ONNX."""
    timm_name, where = FULL_SIZE[name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:  # LayerScale and heads start near zero: the adapters' effect would not show
                p.normal_(0, 0.1)
    x = torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    gm = repfold.insert(model, before=where, example_inputs=x)
    folded, report = fold_checked(gm, model, x, std=0.05, tol=1e-4)
    assert len(report.layered) == len(gm.meta["repfold"]["adapters"]) and not report.kept, str(report)
    assert same_kinds(fx_counts(folded)) == same_kinds(fx_counts(repfold.fold(model, example_inputs=x, graph=True)))
    adapted, base = export(gm, x, False), export(model, x, False)
    folded_onnx, report = repfold.fold(adapted, return_report=True)
    assert len(report.layered) == len(gm.meta["repfold"]["adapters"]) and not report.kept, str(report)
    assert rel_err(_run(folded_onnx, x), _run(adapted, x)) < 1e-4
    assert_base_operators(onnx_counts(folded_onnx), onnx_counts(base))
