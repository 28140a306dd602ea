"""Train-time multi-branch blocks: repfold's fold against timm's own re-parameterisation.

    python benchmarks/reparam.py                 # writes benchmarks/results/reparam.{md,json}
    python benchmarks/reparam.py --quick         # two models, fewer timing runs, nothing written

For each timm family whose blocks timm collapses with per-block code
(``timm.utils.reparameterize_model``), random weights and random BatchNorm
statistics, 128 px input:

* conv counts: the train form, repfold's fold (fx, and both ONNX exports of
  the train form), timm's reparam;
* the error of each fold relative to the train form's output (float32);
* onnxruntime CPU latency at batch 1, median of ``--runs`` runs with the
  spread (min to max of the medians of 5 blocks), for the train form's
  export, repfold's fold of it, and the export of timm's reparam, measured
  side by side in one process.

The ONNX fold is the case timm cannot do: an exported train-form model has
no Python modules left to call ``reparameterize`` on.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from zoo import _ort, export, randomize  # (this folder)

import repfold

MODELS = ["repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "repghostnet_050"]


def convs_fx(model) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def convs_onnx(proto) -> int:
    return sum(n.op_type == "Conv" for n in proto.graph.node)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def latency(protos: dict, x, runs: int) -> dict:
    """Median ms per call at batch 1 and the spread of 5 blocks' medians, the sessions interleaved."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sessions = {k: ort.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for k, p in protos.items()}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1e3)
    out = {}
    for k, ts in times.items():
        blocks = [statistics.median(ts[i::5]) for i in range(5)]
        out[k] = {"ms": statistics.median(ts), "lo": min(blocks), "hi": max(blocks)}
    return out


def measure(name: str, runs: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomize(model)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).numpy()
    row = {"model": name, "train": convs_fx(model)}
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        row.update(fx=convs_fx(folded), fx_err=rel(folded(x).numpy(), y), fx_kept=len(report.kept))
    ref = timm.utils.reparameterize_model(copy.deepcopy(model))
    row["timm"] = convs_fx(ref)
    protos = {}
    for path, dynamo in (("onnx", False), ("dynamo", True)):
        try:
            proto = export(model, x, dynamo)
        except Exception as e:  # noqa: BLE001 (an exporter's failure, not repfold's: the row says so)
            row[path] = f"export fails: {type(e).__name__}"
            continue
        t = time.perf_counter()
        out = repfold.fold(proto)
        row[f"{path}_s"] = time.perf_counter() - t
        row[f"{path}_train"] = convs_onnx(proto)
        row[path] = convs_onnx(out)
        row[f"{path}_err"] = rel(_ort(out, x)[0], y)
        if path == "onnx":
            protos = {"train": proto, "repfold": out, "timm": export(ref, x, False)}
    if protos and runs:
        row["latency"] = latency(protos, x, runs)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | convs: train | repfold fx | repfold ONNX (TorchScript) | repfold ONNX (dynamo) | timm reparam "
            "| error fx / ONNX | ORT ms, batch 1: train | repfold | timm |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r.get("latency", {})

        def ms(k, lat=lat):
            v = lat.get(k)
            return f"{v['ms']:.2f} ({v['lo']:.2f}–{v['hi']:.2f})" if v else "–"

        errs = f"{r['fx_err']:.1e} / {r.get('onnx_err', float('nan')):.1e}"
        lines.append(f"| {r['model']} | {r['train']} | {r['fx']} | {r.get('onnx')} | {r.get('dynamo')} | {r['timm']} "
                     f"| {errs} | {ms('train')} | {ms('repfold')} | {ms('timm')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="two models, 10 runs, nothing written")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    names = args.models.split(",")[:2] if args.quick else args.models.split(",")
    runs = 10 if args.quick else args.runs
    torch.set_num_threads(1)
    rows = []
    for name in names:
        rows.append(measure(name, runs))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reparam.json").write_text(json.dumps(rows, indent=1))
        head = ("Train-time multi-branch blocks (random weights, random BatchNorm statistics, 128 px, float32): "
                "conv counts of the train form, of repfold's folds and of timm.utils.reparameterize_model; "
                "onnxruntime CPU latency at batch 1, one thread, median ms (spread of 5 blocks' medians), "
                f"{runs} runs each, interleaved. `python benchmarks/reparam.py`.\n\n")
        (out / "reparam.md").write_text(head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
