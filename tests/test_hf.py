"""Hugging Face transformers vision models, which torch.fx cannot trace (they check sizes in Python): insert and
fold take their torch.export graph. BEiT-style attention (Data2Vec-Vision) and Swin-V2 have a key projection
without a bias, which takes the adapter's constant as one."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, rel_err

import repfold

transformers = pytest.importorskip("transformers")

_SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
          "image_size": 32, "patch_size": 8}
MODELS = {  # config, the scopes adapters go before
    "vit": (lambda: transformers.ViTConfig(**_SMALL), ["attention", "mlp"]),
    "data2vec": (lambda: transformers.Data2VecVisionConfig(**_SMALL), ["attention", "intermediate"]),
    "swinv2": (lambda: transformers.Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1],
                                                 num_heads=[1, 2], window_size=4), ["attention", "intermediate"]),
    "convnext": (lambda: transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
                 ["pwconv1", "pwconv2"]),
}


def _out(model, x):
    return model(x).last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
def test_hugging_face_models_fold_through_torch_export(name):
    config, before = MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():  # no zero bias or scale hides an adapter's effect
            if "bias" in n or "lambda" in n or "layer_scale" in n:
                p.normal_(0, 0.1)
    x = torch.randn(1, 3, 32, 32)
    base, base_report = repfold.fold(model, example_inputs=(x,), return_report=True)
    assert base_report.frontend == "fx, traced by torch.export"
    gm = repfold.insert(model, before=before, example_inputs=x)
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        y = _out(gm, x)
        assert rel_err(y, _out(model, x)) > 1e-3
        assert rel_err(_out(folded, x), y) < 1e-5
        assert rel_err(_out(base, x), _out(model, x)) < 1e-5  # the model's own folds (its LayerScale, say)
    assert report.layered and all(r.folded for r in report.layered), str(report)
    assert all(n <= base_report.ops_after.get(k, 0) for k, n in report.ops_after.items()), str(report)
    assert report.params_after <= base_report.params_after + sum(r.new_bias for r in report.layered)
