"""Every PEFT adapter type that PEFT can merge, folded by repfold on each path, against ``merge_and_unload``.

    python benchmarks/peft_matrix.py                    # writes benchmarks/results/peft.{md,json}
    python benchmarks/peft_matrix.py --types lora,loha --paths export --out /tmp/peft

Models: a small timm ViT (Linear targets ``qkv``, ``attn.proj``, ``fc1``,
``fc2``) and a small timm ResNet (Conv targets: its 1×1 and 3×3 convs), random
initialisation, every adapter weight random and non-zero (as if trained: PEFT
starts most adapters at zero effect). Paths: ``export`` (``torch.export`` then
``repfold.fold(ep)``), ``onnx`` (TorchScript exporter), ``dynamo`` (dynamo
exporter), each folded with ``repfold.fold`` and compared with the PEFT model
itself. A cell reads ``folded/regions`` of the adapter regions (``+k scale``:
regions of per-channel scales only folded too, IA3's or the model's own
BatchNorm), the error relative to the output's largest magnitude, whether no
operator count of the folded model exceeds that of the same export of
``merge_and_unload``'s model (``ops ≤ merged``), and the reason the first kept
region gives.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from zoo import _ort
from zoo import export as onnx_export  # (this folder: the zoo's exporter, quiet)

import repfold

VIT_TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]
CONV_TARGETS = ["conv1", "conv2", "conv3"]  # ResNet bottleneck: 1×1, 3×3, 1×1


def configs(peft) -> dict:
    """Type name -> (config for the ViT, config for the ResNet or None where PEFT has no Conv form)."""
    c = {
        "lora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t),
        "dora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
        "loha": lambda t: peft.LoHaConfig(r=4, alpha=8, target_modules=t),
        "lokr": lambda t: peft.LoKrConfig(r=4, alpha=8, target_modules=t),
        "oft": lambda t: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t),
        "boft": lambda t: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=t),
        "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=[m for m in t if m in ("fc2", "conv3")]),
        "vera": lambda t: peft.VeraConfig(r=4, target_modules=t),
        "hra": lambda t: peft.HRAConfig(r=4, target_modules=t),
        "fourierft": lambda t: peft.FourierFTConfig(n_frequency=64, target_modules=t),
    }
    conv = {"lora", "dora", "loha", "lokr", "oft", "boft", "ia3", "hra"}
    return {k: (f, k in conv) for k, f in c.items()}


def vit():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    return m, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def resnet():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("resnet26", pretrained=False).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def adapt(peft, model, config):
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # as if trained
    return adapted.eval()


def rel_err(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(t)).to(torch.float64) for t in (a, b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def ort(proto, x):
    return _ort(proto, x)[0]


def onnx_ops(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "Identity", "Dropout"))


def aten_ops(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and "dropout" not in str(n.target) and "alias" not in str(n.target))


def summary(report) -> dict:
    """Adapter regions (with layers) found and folded, scale-only regions folded too, the first reason kept."""
    kept = [r for r in report.regions if not r.folded]
    return {"regions": len(report.layered), "folded": sum(r.folded for r in report.layered),
            "scales": sum(r.folded for r in report.regions if r.scale), "reason": kept[0].reason if kept else None}


def at_most(have: Counter, most: Counter) -> bool:
    return all(n <= most.get(k, 0) for k, n in have.items())


def one_path(path: str, adapted, merged, x, y) -> dict:
    if path == "export":
        ep = torch.export.export(adapted, (x,))
        folded, report = repfold.fold(ep, return_report=True)
        got = folded.module()(x)
        same = at_most(aten_ops(folded), aten_ops(torch.export.export(merged, (x,))))
    else:
        proto = onnx_export(adapted, x, dynamo=path == "dynamo")
        folded, report = repfold.fold(proto, return_report=True)
        got = ort(folded, x)
        same = at_most(onnx_ops(folded), onnx_ops(onnx_export(merged, x, dynamo=path == "dynamo")))
    return {**summary(report), "err": rel_err(got, y), "ops_within_merged": same}


def run(types, paths, out: Path) -> list[dict]:
    import peft

    rows = []
    for name, (make, has_conv) in configs(peft).items():
        if types and name not in types:
            continue
        for model_name, (model, x), targets in (("vit", vit(), VIT_TARGETS), ("resnet", resnet(), CONV_TARGETS)):
            if model_name == "resnet" and not has_conv:
                continue
            row = {"type": name, "model": model_name}
            try:
                adapted = adapt(peft, model, make(targets))
                merged = copy.deepcopy(adapted).merge_and_unload().eval()
                with torch.no_grad():
                    adapted(x)
            except Exception as e:  # noqa: BLE001 (PEFT's own refusal, recorded)
                row["error"] = f"PEFT: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                continue
            with torch.no_grad():
                y = adapted(x)
                row["effect"] = rel_err(y, model(x))
                row["merge_err"] = rel_err(merged(x), y)
                for path in paths:
                    t = time.perf_counter()
                    try:
                        row[path] = one_path(path, adapted, merged, x, y)
                    except Exception as e:  # noqa: BLE001 (recorded per cell)
                        row[path] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
                    row[path]["s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft.json").write_text(json.dumps(rows, indent=1))
    (out / "peft.md").write_text(table(rows, paths))
    return rows


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "error: " + r["error"]
    if r["regions"] + r["scales"] == 0:
        return "no region"
    s = f"{r['folded']}/{r['regions']}" + (f" +{r['scales']} scale" if r["scales"] else "") + f", {r['err']:.1e}"
    s += ", ops ≤ merged" if r["ops_within_merged"] else ", ops > merged"
    return s + (f"; kept: {r['reason']}" if r["reason"] else "")


def table(rows: list[dict], paths) -> str:
    lines = ["| type | model | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for r in rows:
        cells = [r.get("error", "")] * len(paths) if "error" in r else [cell(r.get(p)) for p in paths]
        lines.append(f"| {r['type']} | {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="")
    p.add_argument("--paths", default="export,onnx,dynamo")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    run([t for t in a.types.split(",") if t], a.paths.split(","), Path(a.out))


if __name__ == "__main__":
    sys.exit(main())
