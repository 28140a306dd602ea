"""ONNX fold cost against the I/O floor: `python -m repfold` vs `onnx.load` + `onnx.save` of the same file.

    python benchmarks/onnx_fold.py                      # ViT-B/16 with adapters before attn and mlp
    python benchmarks/onnx_fold.py --model vit_huge_patch14_224 --repeats 1   # over 2 GB: external data

Each measurement runs in a fresh subprocess (so peak RSS is that run's own),
fold and floor interleaved, and the medians are reported with their ratio.
Goals (issues 4 and 16): fold time <= 1.5x the floor, peak memory <= 2.5x the file (<= 1x from
ViT-H up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Each child reports its own peak resident memory on stderr as it exits.
PEAK = "import atexit, resource, sys; atexit.register(lambda: sys.stderr.write(" \
       "f'peak_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'))\n"
FOLD = PEAK + "import runpy; sys.argv = ['repfold', *sys.argv[1:]]; runpy.run_module('repfold', run_name='__main__')"
FLOOR = PEAK + """
import onnx
m = onnx.load(sys.argv[1])
external = sys.argv[3] == "1"
onnx.save(m, sys.argv[2], save_as_external_data=external, location=sys.argv[2].rsplit("/", 1)[-1] + ".data")
"""


def export(model_name: str, path: Path) -> None:
    import timm
    import torch
    from _common import trained_like

    import repfold

    model = timm.create_model(model_name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    gm = trained_like(repfold.insert(model, before=["attn", "mlp"], example_inputs=x), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}})


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak resident memory in bytes) of one subprocess."""
    os.sync()  # the previous run's dirty pages are written back outside the timing
    t = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_kb "))
    return elapsed, peak * 1024


def clear(folder: Path, prefix: str) -> None:
    for f in folder.glob(f"{prefix}*"):
        f.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="a smoke run: ViT-Ti/16, one repeat")
    ap.add_argument("--export-to", help=argparse.SUPPRESS)  # internal: the export, in its own process
    args = ap.parse_args()
    if args.quick:
        args.model, args.repeats = "vit_tiny_patch16_224", 1
    if args.export_to:
        export(args.model, Path(args.export_to))
        return
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "adapted.onnx"
        # Linux keeps a process's peak memory across exec, so the children that are
        # measured must come from a small parent: the export (torch, the model) runs apart.
        subprocess.run([sys.executable, __file__, "--model", args.model, "--export-to", str(src)], check=True)
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        external = size > 2**31 - 1 or any(p.suffix != ".onnx" for p in Path(d).iterdir())
        fold_t, floor_t, fold_mem, floor_mem = [], [], 0.0, 0.0
        for i in range(args.repeats):  # interleaved, so drift hits both alike
            t, m = timed([sys.executable, "-c", FLOOR, str(src), str(Path(d) / f"floor{i}.onnx"), str(int(external))])
            floor_t.append(t)
            floor_mem = max(floor_mem, m)
            clear(Path(d), "floor")  # each run starts with the same files (and free page cache) as the other
            t, m = timed([sys.executable, "-c", FOLD, str(src), "-o", str(Path(d) / f"folded{i}.onnx"), "-q"])
            fold_t.append(t)
            fold_mem = max(fold_mem, m)
            clear(Path(d), "folded")
    fig = {
        "model": args.model,
        "file_MB": round(size / 1e6, 1),
        "floor_s": round(statistics.median(floor_t), 2),
        "fold_s": round(statistics.median(fold_t), 2),
        "time_ratio": round(statistics.median(fold_t) / statistics.median(floor_t), 2),
        "floor_range_s": [round(min(floor_t), 2), round(max(floor_t), 2)],
        "fold_range_s": [round(min(fold_t), 2), round(max(fold_t), 2)],
        "runs": args.repeats,
        "floor_peak_MB": round(floor_mem / 1e6),
        "floor_memory_ratio_to_file": round(floor_mem / size, 2),
        "fold_peak_MB": round(fold_mem / 1e6),
        "memory_ratio_to_file": round(fold_mem / size, 2),
    }
    print(json.dumps(fig, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
