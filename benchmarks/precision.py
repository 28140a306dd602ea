"""How far a fold moves a model's outputs, by dtype: repfold's float64 arithmetic against folding in the model's dtype.

    python benchmarks/precision.py               # ViT-S/16, adapters before attn and mlp

For float32, float16 and bfloat16 copies of one model with trained-like
(random, non-zero) adapters, two folds:

* repfold: the new weights computed in float64 and cast once to the dtype;
* a fold in the model's own dtype: the same algebra, ``W' = W·(I + s·U·D)``
  and ``b' = W·s·(U·b_D + b_U) + b``, computed in that dtype.

For each: how far the folded weights are from the exact fold (of the float64
model), and how far the outputs are from the float64 unfolded model's, next
to the unfolded model's own error in that dtype. The models run on the CPU
in their dtype. Writes benchmarks/results/precision.{json,md}, then exits
non-zero when a folded model is further from the float64 model than
``FACTOR`` times the unfolded model in the same dtype (the fold may not add
more error than running in that dtype does).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
from _common import trained_like

import repfold
from repfold.adapters.modules import RepAdapter

RESULTS = Path(__file__).parent / "results"
ABSORBER = {"attn": "qkv", "mlp": "fc1"}  # the Linear each ViT scope starts with
FACTOR = 2.0  # repfold's folded output error may be at most this times the unfolded model's, in each dtype


def dense_up(a: RepAdapter) -> torch.Tensor:
    """The grouped 1x1 up-projection as its dense (channels, hidden) matrix."""
    w = a.up.weight.reshape(a.channels, -1)
    per_out, per_in = a.channels // a.groups, a.hidden_dim // a.groups
    out = torch.zeros(a.channels, a.hidden_dim, dtype=w.dtype)
    for g in range(a.groups):
        out[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = w[g * per_out:(g + 1) * per_out]
    return out


@torch.no_grad()
def naive_fold(gm: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with every adapter of ``gm`` folded into the Linear after it, in the model's dtype."""
    out = copy.deepcopy(base)
    for scope in gm.meta["repfold"]["adapters"]:
        a: RepAdapter = gm.get_submodule(gm.meta["repfold"]["adapters"][scope])
        layer = out.get_submodule(f"{scope}.{ABSORBER[scope.rpartition('.')[2]]}")
        D, bD = a.down.weight.reshape(a.hidden_dim, -1), a.down.bias
        U, bU = dense_up(a), a.up.bias
        M = torch.eye(a.channels, dtype=D.dtype) + a.scale * (U @ D)
        c = a.scale * (U @ bD + bU)
        layer.bias.copy_(layer.weight @ c + layer.bias)
        layer.weight.copy_(layer.weight @ M)
    return out


def absorbers(gm) -> list[str]:
    return [f"{scope}.{ABSORBER[scope.rpartition('.')[2]]}" for scope in gm.meta["repfold"]["adapters"]]


def weight_error(model, reference, paths: list[str]) -> float:
    """Largest change of a folded weight from the exact (float64) fold, relative to that weight's scale."""
    worst = 0.0
    for p in paths:
        want = reference.get_submodule(p).weight.detach().double()
        got = model.get_submodule(p).weight.detach().double()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def measure(model_name: str, dtypes: list[str]) -> list[dict]:
    torch.manual_seed(0)
    base32 = timm.create_model(model_name, pretrained=False).eval()
    x32 = torch.randn(4, *base32.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    gm32 = trained_like(repfold.insert(base32, before=["attn", "mlp"], example_inputs=x32), seed=2)
    gm64 = copy.deepcopy(gm32).double()
    exact = repfold.fold(gm64)  # the reference weights
    with torch.no_grad():
        y_ref = gm64(x32.double())
    scale, paths = float(y_ref.abs().max()), absorbers(gm32)
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        gm, base, x = copy.deepcopy(gm32).to(dtype), copy.deepcopy(base32).to(dtype), x32.to(dtype)
        folded, naive = repfold.fold(gm), naive_fold(gm, base)
        with torch.no_grad():
            err = {k: float((m(x).double() - y_ref).abs().max()) / scale
                   for k, m in (("unfolded", gm), ("repfold", folded), ("naive", naive))}
        rows.append({
            "model": model_name, "dtype": name,
            "weights_repfold": weight_error(folded, exact, paths), "weights_naive": weight_error(naive, exact, paths),
            "output_unfolded": err["unfolded"], "output_repfold": err["repfold"], "output_naive": err["naive"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        ("| model | dtype | folded weights vs exact: repfold / in-dtype fold | "
        "outputs vs float64 reference: unfolded / repfold / in-dtype fold |"),
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['weights_repfold']:.1e} / {r['weights_naive']:.1e} | "
                     f"{r['output_unfolded']:.1e} / {r['output_repfold']:.1e} / {r['output_naive']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--quick", action="store_true", help="ViT-Ti/16 (a smoke run)")
    ap.add_argument("--out", help="folder for precision.{json,md} (default benchmarks/results, quick: results/quick)")
    args = ap.parse_args()
    model = "vit_tiny_patch16_224" if args.quick else args.model
    out = Path(args.out) if args.out else RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(model, ["float32", "float16", "bfloat16"])
    (out / "precision.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "precision.md").write_text(table(rows))
    print(table(rows))
    bad = [r for r in rows if not r["output_repfold"] <= FACTOR * r["output_unfolded"]]
    if bad:
        raise SystemExit("precision.py: the fold adds error: " + "; ".join(
            f"{r['dtype']}: {r['output_repfold']:.1e} vs unfolded {r['output_unfolded']:.1e}" for r in bad))


if __name__ == "__main__":
    main()
