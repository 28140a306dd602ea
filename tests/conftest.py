"""Shared helpers: small real backbones, adapters with random weights, error measures."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

timm = pytest.importorskip("timm")

# Hypothesis profiles: "ci" (the default) is quick and deterministic; "thorough" is `make fuzz`.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Small variants of real timm models: same code paths, a fraction of the cost.
SMALL = {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2}


def make_vit(name: str = "vit_tiny_patch16_224", dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """A small timm ViT-family model with random, non-zero weights everywhere (biases too)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)  # as in a trained model; also keeps exporters from sharing them
    return model.to(dtype)


def image(batch: int = 2, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize_adapters(gm: torch.nn.Module, std: float = 0.2, seed: int = 2) -> None:
    """Stand-in for training: every adapter weight random and non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def fold_checked(gm, model, x, std: float = 0.2, tol: float = 1e-5):
    """Random adapter weights, as after training; ``gm``'s fold, once the adapters are seen to change the
    output and the fold to keep it (within ``tol``)."""
    import repfold

    randomize_adapters(gm, std=std)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)
    with torch.no_grad():
        y = gm(x)
        assert rel_err(y, model(x)) > 1e-3
        assert rel_err(folded(x), y) < tol
    return folded, report


def rel_err(a, b) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def export(model: torch.nn.Module, x: torch.Tensor, dynamo: bool, opset: int = 17):
    """The ONNX proto of ``model`` from one of torch's two exporters (TorchScript's at ``opset``)."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset)
        return onnx.load_from_string(buf.getvalue())


CHEAP = {"Mul", "Div", "Add", "Sub", "Identity"}  # ops of the model's own that a region may take in


def assert_base_operators(got: dict, want: dict) -> None:
    """The base model's operators, except that a constant scale or shift (or an Identity) of the model's
    own inside an adapter region (the x0.5 of a GELU the TorchScript exporter spells out) folds too."""
    got, want = dict(got), dict(want)
    got.pop("Constant", None), want.pop("Constant", None)  # exporters fold shape arithmetic differently
    assert set(got) <= set(want) and all(got[k] <= want[k] for k in got), (got, want)
    fewer = {k for k in want if got.get(k, 0) < want[k]}
    assert fewer <= CHEAP, (got, want)
