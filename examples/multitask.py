"""One base model, several tasks: adapters stored per task, one folded ONNX per task.

    python examples/multitask.py                      # ViT-Ti/16, three tasks, files in a temporary folder
    python examples/multitask.py --out tasks/ --model vit_small_patch16_224

Training a task changes only its adapters, so a task is stored as a small
safetensors file (``repfold.save_adapters``) beside one shared base model.
At deployment each task's adapters are loaded onto the base
(``repfold.load_adapters``), folded, and exported: every task gets a model
with the base model's operators and cost.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

import repfold

TASKS = ("flowers", "cars", "pets")


def train_stand_in(gm: torch.nn.Module, seed: int) -> None:
    """What training would do to the adapters: make them non-zero (each task differently)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"])
    return onnx.load_from_string(buf.getvalue())


def operators(proto: onnx.ModelProto) -> list[str]:
    # The TorchScript exporter shares repeated constants through Identity nodes, and does so
    # differently for a GraphModule than for the original module: those are no operators.
    return sorted(n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "Identity"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--out", help="folder for the adapter files and ONNX models (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        base = timm.create_model(args.model, pretrained=False).eval()
        x = torch.randn(2, *base.pretrained_cfg["input_size"])

        # Training side: one adapter file per task.
        for seed, task in enumerate(TASKS):
            gm = repfold.insert(base, before=["attn", "mlp"], example_inputs=x[:1])
            train_stand_in(gm, seed)
            repfold.save_adapters(gm, out / f"{task}.safetensors")

        # Deployment side: base + adapter file -> folded ONNX, checked in onnxruntime.
        base_ops = operators(export(base, x))
        outputs = []
        for task in TASKS:
            gm = repfold.load_adapters(base, out / f"{task}.safetensors").eval()
            proto = export(repfold.fold(gm), x)
            onnx.save(proto, str(out / f"{task}.onnx"))
            got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {"image": x.numpy()})[0]
            with torch.no_grad():
                want = gm(x).numpy()
            diff = float(np.abs(got - want).max() / np.abs(want).max())
            same = operators(proto) == base_ops
            size = (out / f"{task}.safetensors").stat().st_size
            print(f"{task:8s} adapters {size / 1e3:7.1f} kB -> {task}.onnx "
                  f"({(out / f'{task}.onnx').stat().st_size / 1e6:.1f} MB): base operators {same}, "
                  f"vs unfolded {diff:.1e}")
            if not same:
                raise RuntimeError(f"{task}: the folded model's operators are not the base model's")
            if not diff <= 1e-5:
                raise RuntimeError(f"{task}: the folded model differs from the unfolded one by {diff:.1e}")
            outputs.append(got)
        spread = max(float(np.abs(a - b).max()) for a in outputs for b in outputs)
        print(f"the tasks' models differ by up to {spread:.2f} in their logits: each carries its own adapters")
        if not spread > 1e-3:
            raise RuntimeError(f"the tasks' models differ by only {spread:.1e}: their adapters did not reach them")


if __name__ == "__main__":
    main()
