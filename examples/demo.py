"""The whole repfold story on one model, offline, on a CPU.

    make demo                      # ViT-B/16, randomly initialised
    python examples/demo.py --model vit_small_patch16_224

1. insert RepAdapters before every ``attn`` and ``mlp`` scope;
2. give them random non-zero weights (standing in for training);
3. fold them in torch.fx, and in ONNX through ``python -m repfold``;
4. compare outputs, operator and parameter counts, and onnxruntime latency
   of the base model, the model with adapters, and the folded model.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

import repfold


def export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"])
    path.write_bytes(buf.getvalue())


def latency_ms(paths: dict[str, Path], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median batch-1 latency of each model, runs interleaved so drift hits all alike."""
    opts = ort.SessionOptions()
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(3):  # warm-up
        for s in sessions.values():
            s.run(None, {"image": x})
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"image": x})
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name")
    ap.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per model")
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)

    print(f"== {args.model}, random initialisation (nothing is downloaded)")
    model = timm.create_model(args.model, pretrained=False).eval()
    with torch.no_grad():  # trained biases are not all zero; make ours look the part
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])

    t = time.perf_counter()
    gm = repfold.insert(model, before=["attn", "mlp"])
    n_base = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    adapters = gm.meta["repfold"]["adapters"]
    print(f"insert: {len(adapters)} adapters ({', '.join(list(adapters)[:2])}, ...) in {time.perf_counter() - t:.2f}s")
    print(f"        trainable {n_train:,} parameters = {100 * n_train / n_base:.2f}% of the {n_base:,} backbone")
    with torch.no_grad():
        same = torch.equal(gm(x), model(x))
    print(f"        identity at insertion: {same}")

    with torch.no_grad():  # stand-in for training
        for n, p in gm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    gm.eval()

    with torch.no_grad():
        y_base, y_adapted = model(x), gm(x)
        t = time.perf_counter()
        folded, report = repfold.fold(gm, return_report=True)
        fold_s = time.perf_counter() - t
        y_folded = folded(x)
    scale = y_adapted.abs().max().item()
    print(f"\nfx fold in {fold_s:.2f}s:")
    print(report)
    print(f"adapters change the logits by {(y_adapted - y_base).abs().max().item() / scale:.3g} of their scale;")
    print(f"the folded model differs by {(y_folded - y_adapted).abs().max().item() / scale:.3g} (float32)")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = {"base": d / "base.onnx", "adapters": d / "adapters.onnx", "folded": d / "folded.onnx"}
        t = time.perf_counter()
        export(model, x, paths["base"])
        export(gm, x, paths["adapters"])
        print(f"\nexported base and adapted models to ONNX in {time.perf_counter() - t:.1f}s")
        cmd = [sys.executable, "-m", "repfold", str(paths["adapters"]), "-o", str(paths["folded"]), "--check"]
        print("$ python -m repfold adapters.onnx -o folded.onnx --check")
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"(took {time.perf_counter() - t:.1f}s, including python start-up and the check)")

        protos = {k: onnx.load(str(p)) for k, p in paths.items()}
        counts = {k: Counter(n.op_type for n in m.graph.node) for k, m in protos.items()}
        params = {k: sum(int(np.prod(i.dims)) for i in m.graph.initializer) for k, m in protos.items()}
        kinds = sorted(set().union(*counts.values()), key=lambda k: -counts["adapters"][k])
        print(f"\n{'ONNX':<22}{'base':>12}{'adapters':>12}{'folded':>12}")
        for k in kinds:
            print(f"{k:<22}" + "".join(f"{counts[m][k]:>12}" for m in paths))
        print(f"{'parameters':<22}" + "".join(f"{params[m]:>12,}" for m in paths))
        print(f"folded == base operator counts: {counts['folded'] == counts['base']}, "
              f"parameters: {params['folded'] == params['base']}")

        ms = latency_ms(paths, x.numpy(), args.runs)
        print(f"\nonnxruntime CPU latency, batch 1, median of {args.runs}:")
        for k, v in ms.items():
            print(f"  {k:<9}{v:8.1f} ms   ({v / ms['base']:.3f} x base)")


if __name__ == "__main__":
    main()
