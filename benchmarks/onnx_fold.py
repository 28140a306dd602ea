"""ONNX fold cost against the I/O floor: `python -m repfold` vs `onnx.load` + `onnx.save` of the same file.

    python benchmarks/onnx_fold.py                      # ViT-B/16 with adapters before attn and mlp
    python benchmarks/onnx_fold.py --model vit_huge_patch14_224 --repeats 1   # over 2 GB: external data

Each measurement runs in a fresh subprocess (so peak RSS is that run's own),
fold and floor interleaved, and the medians are reported with their ratio.
Goals (issue 4): fold time <= 1.5x the floor, peak memory <= 2.5x the file.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

FLOOR = """
import sys, onnx
m = onnx.load(sys.argv[1])
external = sys.argv[3] == "1"
onnx.save(m, sys.argv[2], save_as_external_data=external, location=sys.argv[2].rsplit("/", 1)[-1] + ".data")
"""


def export(model_name: str, path: Path) -> None:
    import timm
    import torch

    import repfold

    model = timm.create_model(model_name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}})


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("note: peak RSS not above an earlier run's; memory figure is a lower bound", file=sys.stderr)
    return elapsed, peak * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "adapted.onnx"
        export(args.model, src)
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        external = size > 2**31 - 1 or any(p.suffix != ".onnx" for p in Path(d).iterdir())
        fold_t, floor_t, fold_mem, floor_mem = [], [], 0.0, 0.0
        for i in range(args.repeats):
            # memory: the first run of each kind (RUSAGE_CHILDREN keeps a maximum over all children)
            t, m = timed([sys.executable, "-c", FLOOR, str(src), str(Path(d) / f"floor{i}.onnx"), str(int(external))])
            floor_t.append(t)
            floor_mem = floor_mem or m
            t, m = timed([sys.executable, "-m", "repfold", str(src), "-o", str(Path(d) / f"folded{i}.onnx"), "-q"])
            fold_t.append(t)
            fold_mem = max(fold_mem, m)
    fig = {
        "model": args.model,
        "file_MB": round(size / 1e6, 1),
        "floor_s": round(statistics.median(floor_t), 2),
        "fold_s": round(statistics.median(fold_t), 2),
        "time_ratio": round(statistics.median(fold_t) / statistics.median(floor_t), 2),
        "floor_peak_MB": round(floor_mem / 1e6),
        "fold_peak_MB": round(fold_mem / 1e6),
        "memory_ratio_to_file": round(fold_mem / size, 2),
    }
    print(json.dumps(fig, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
