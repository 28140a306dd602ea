"""Inference cost of the base model, the model with adapters, and the folded model, side by side.

    python benchmarks/inference.py                 # ViT-B/16, Swin-T, ConvNeXt-T; batch 1 and 32
    python benchmarks/inference.py --quick         # a smoke run: small models, batch 1

For each model, in torch eager (CPU) and onnxruntime (CPU, all graph
optimisations on), and at batch 1 on a CUDA GPU when there is one (torch
eager, and onnxruntime's CUDA provider when onnxruntime-gpu has it): median
latency of each variant, the three variants interleaved run by run so drift on
a shared machine hits them alike, and the ratios to the base model. Also the operator counts of the three ONNX graphs,
and the node counts onnxruntime's optimiser leaves at each level, which show
that it does not remove the adapters by itself.

Writes benchmarks/results/inference.{json,md,png}, then exits non-zero when
a folded model's output is further from the unfolded one's than ``TOL``
allows (relative to the output's scale).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from _common import trained_like

import repfold

RESULTS = Path(__file__).parent / "results"
ort.set_default_logger_severity(3)  # saving level-"all" graphs warns that they are machine-specific: known
MODELS = {  # timm name: the scopes adapters go before
    "vit_base_patch16_224": ["attn", "mlp"],
    "swin_tiny_patch4_window7_224": ["attn", "mlp"],
    "convnext_tiny": ["mlp"],
}
QUICK = {"vit_tiny_patch16_224": ["attn", "mlp"], "convnext_atto": ["mlp"]}
# Largest folded-vs-unfolded output difference, relative to the output's scale. CPU: float32 rounding.
# CUDA: cuDNN's convolutions (the adapters are 1x1 convs) and onnxruntime's CUDA provider may use TF32,
# which keeps 10 mantissa bits of each input (a relative rounding of 2^-11): the adapted model is
# rounded there and the folded one is not.
TOL = {"cpu": 1e-5, "cuda": 5e-3}
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def models(name: str, where: list[str]):
    """(base, adapted, folded) with random weights; adapters random and non-zero, as after training."""
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.abs().max() < 1e-3:  # LayerScale and heads start near zero
                p.normal_(0, 0.1)
    x = torch.randn(1, *base.pretrained_cfg["input_size"])
    adapted = trained_like(repfold.insert(base, before=where, example_inputs=x), seed=1)
    return base, adapted, repfold.fold(adapted)


def interleaved(calls: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each call, run in turn ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for f in calls.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def session(proto: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save: Path | None = None,
            providers=("CPUExecutionProvider",)):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=list(providers))


def counts(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.op_type != "Constant")


def optimiser_leftovers(protos: dict[str, onnx.ModelProto], tmp: Path) -> dict[str, dict[str, int]]:
    """Nodes in onnxruntime's optimised graph of each variant, at each optimisation level."""
    out: dict[str, dict[str, int]] = {}
    for level, value in LEVELS.items():
        out[level] = {}
        for k, proto in protos.items():
            path = tmp / f"{k}-{level}.onnx"
            session(proto, value, path)
            out[level][k] = len(onnx.load(str(path), load_external_data=False).graph.node)
    return out


def on_gpu(name: str, variants: dict, protos: dict, batches: list[int], repeats: int, device: str,
           providers: list[str]) -> tuple[list[dict], dict]:
    """Rows on the accelerator (batch 1 is the paper's setting): torch eager and ``torch.compile``, and
    onnxruntime with each of ``providers`` it can run; then the fx fold's own time there."""
    import copy

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    on = {k: copy.deepcopy(m).to(device) for k, m in variants.items()}
    runtimes = {f"torch eager, {device}": on,
                f"torch.compile, {device}": {k: torch.compile(m) for k, m in on.items()}}
    rows = []
    for batch in batches:
        x = torch.randn(batch, *variants["base"].pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(3))
        xd, n = x.to(device), 3 * repeats if batch == 1 else repeats
        timed = []
        for runtime, models_on in runtimes.items():
            with torch.no_grad():
                def call(m, xd=xd):
                    m(xd)
                    sync()

                ms = interleaved({k: (lambda m=m: call(m)) for k, m in models_on.items()}, n, warmup=10)
                y = {k: m(xd).float().cpu() for k, m in models_on.items()}
            timed.append((runtime, ms, float((y["folded"] - y["adapted"]).abs().max()) / float(y["adapted"].abs().max())))
        for provider in providers:
            sessions = {k: session(p, providers=[provider]) for k, p in protos.items()}
            if not all(s.get_providers()[0] == provider for s in sessions.values()):
                continue  # onnxruntime fell back to another provider: not this one's figure
            feed = {"image": x.numpy()}
            ms = interleaved({k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}, n, 10)
            out = {k: s.run(None, feed)[0] for k, s in sessions.items()}
            timed.append((f"onnxruntime, {provider.removesuffix('ExecutionProvider')}", ms,
                          float(np.abs(out["folded"] - out["adapted"]).max()) / float(np.abs(out["adapted"]).max())))
        for runtime, ms, diff in timed:
            rows.append({
                "model": name, "batch": batch, "runtime": runtime, "base_ms": round(ms["base"], 2),
                "adapted_ratio": round(ms["adapted"] / ms["base"], 3),
                "folded_ratio": round(ms["folded"] / ms["base"], 3), "max_diff": diff,
            })
            print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    repfold.fold(on["adapted"])  # the fx fold of the model where it is (its arithmetic runs in NumPy, float64)
    sync()
    fold = {"device": device, "fold_s": round(time.perf_counter() - t, 3)}
    print(json.dumps(fold), flush=True)
    return rows, fold


def gpu_setting(asked: str) -> tuple[str, list[str]] | None:
    """(torch device, onnxruntime providers) to time on, or None: ``--gpu auto`` uses CUDA when present.

    The providers are onnxruntime-gpu's CUDA and TensorRT ones, those this onnxruntime has (the plain
    ``onnxruntime`` package has neither: then only torch is timed on the GPU).
    """
    if asked == "no" or (asked == "auto" and not torch.cuda.is_available()):
        return None
    if asked == "cpu-check":  # internal: runs the GPU code path on the CPU, to test it without a GPU
        return "cpu", ["CPUExecutionProvider"]
    if not torch.cuda.is_available():
        raise SystemExit("inference.py: --gpu yes, but torch sees no CUDA device")
    have = ort.get_available_providers()
    return "cuda", [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]


def measure(name: str, where: list[str], batches: list[int], repeats: int, tmp: Path, gpu=None,
            cpu: bool = True) -> dict:
    base, adapted, folded = models(name, where)
    variants = {"base": base, "adapted": adapted, "folded": folded}
    x1 = torch.randn(1, *base.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(2))
    protos, rows = {}, []
    if cpu or (gpu is not None and gpu[1]):  # (a GPU-only run without onnxruntime's GPU providers: no ONNX)
        protos = {"base": export(base, x1), "adapted": export(adapted, x1)}
        protos["folded"] = repfold.fold(protos["adapted"])
    sessions = {k: session(p) for k, p in protos.items()} if cpu else {}
    for batch in batches if cpu else []:
        n = repeats if batch == 1 else max(3, repeats // 6)  # a batch of 32 takes seconds per run on 2 cores
        x = torch.randn(batch, *x1.shape[1:], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            eager = interleaved({k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, n)
            y = {k: m(x) for k, m in variants.items()}
        feed = {"image": x.numpy()}
        onnx_ms = interleaved({k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}, n)
        y_onnx = {k: s.run(None, feed)[0] for k, s in sessions.items()}
        scale = float(y["adapted"].abs().max())
        for runtime, ms, diff in (
            ("torch eager", eager, float((y["folded"] - y["adapted"]).abs().max()) / scale),
            ("onnxruntime", onnx_ms, float(np.abs(y_onnx["folded"] - y_onnx["adapted"]).max()) / scale),
        ):
            rows.append({
                "model": name, "batch": batch, "runtime": runtime, "base_ms": round(ms["base"], 2),
                "adapted_ratio": round(ms["adapted"] / ms["base"], 3),
                "folded_ratio": round(ms["folded"] / ms["base"], 3), "max_diff": diff,
            })
            print(json.dumps(rows[-1]), flush=True)
    device_fold = None
    if gpu is not None:
        more, device_fold = on_gpu(name, variants, protos, batches, repeats, *gpu)
        rows += more
    if not protos:
        return {"rows": rows, "device_fold": device_fold}
    return {
        "rows": rows,
        "device_fold": device_fold,
        "onnx_ops_equal": counts(protos["folded"]) == counts(protos["base"]),
        "onnx_ops": {k: sum(counts(p).values()) for k, p in protos.items()},
        "ort_optimised_nodes": optimiser_leftovers(protos, tmp),
    }


def table(results: dict) -> str:
    lines = [
        "| model | batch | runtime | base (ms) | with adapters / base | folded / base | folded vs adapted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (row for m in results.values() for row in m["rows"]):
        lines.append(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['base_ms']:.1f} | "
                     f"{r['adapted_ratio']:.3f} | {r['folded_ratio']:.3f} | {r['max_diff']:.1e} |")
    lines += ["", ("| model | ONNX nodes base / adapted / folded | folded operators = base | "
              "onnxruntime-optimised nodes, base / adapted / folded (disabled, basic, extended, all) |"),
              "|---|---|---|---|"]
    for name, m in results.items():
        if "onnx_ops" not in m:
            continue
        o, lv = m["onnx_ops"], m["ort_optimised_nodes"]
        levels = "; ".join(f"{lv[k]['base']} / {lv[k]['adapted']} / {lv[k]['folded']}" for k in LEVELS)
        lines.append(f"| {name} | {o['base']} / {o['adapted']} / {o['folded']} | {m['onnx_ops_equal']} | {levels} |")
    folds = [(name, m["device_fold"]) for name, m in results.items() if m.get("device_fold")]
    if folds:
        lines += ["", "fx fold of the model where it is: " + ", ".join(
            f"{name} {f['fold_s']:.2f} s ({f['device']})" for name, f in folds)]
    return "\n".join(lines) + "\n"


def on_cuda(row: dict) -> bool:
    return "cuda" in row["runtime"].lower()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for m in results.values() for r in m["rows"]]
    labels = [f"{r['model'].split('_')[0]} b{r['batch']}\n{r['runtime'].split()[0].rstrip(',')}"
              f"{' GPU' if on_cuda(r) else ''}" for r in rows]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.6))
    ax.bar(pos - 0.2, [r["adapted_ratio"] for r in rows], 0.4, label="with adapters (unfolded)", color="#d08c60")
    ax.bar(pos + 0.2, [r["folded_ratio"] for r in rows], 0.4, label="folded", color="#4c72b0")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_ylabel("latency / base model")
    ax.set_ylim(0.8, max(1.2, max(r["adapted_ratio"] for r in rows) + 0.05))
    ax.legend(fontsize=8, loc="upper left")
    gpu = any(on_cuda(r) for r in rows)
    ax.set_title(f"{'CPU and GPU' if gpu else 'CPU'} inference: medians, variants interleaved", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, batch 1, few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, help="timed runs per variant at batch 1 (default 30, quick 3)")
    ap.add_argument("--out", help="folder for inference.{json,md,png} (default benchmarks/results, quick: results/quick)")
    ap.add_argument("--gpu", choices=["auto", "yes", "no", "cpu-check"], default="auto",
                    help="also time on a CUDA GPU (auto: when torch sees one)")
    ap.add_argument("--gpu-only", action="store_true", help="no CPU rows (a GPU machine's time is short)")
    args = ap.parse_args()
    gpu = gpu_setting(args.gpu)
    chosen, batches = (QUICK, [1]) if args.quick else (MODELS, [1, 32])
    repeats = args.repeats or (3 if args.quick else 30)
    out = Path(args.out) if args.out else RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results = {name: measure(name, where, batches, repeats, Path(d), gpu, cpu=not args.gpu_only)
                   for name, where in chosen.items()}
    (out / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "inference.md").write_text(table(results))
    plot(results, out / "inference.png")
    print(table(results))
    bad = [r for m in results.values() for r in m["rows"] if not r["max_diff"] <= TOL["cuda" if on_cuda(r) else "cpu"]]
    if bad:
        raise SystemExit("inference.py: folded vs unfolded outputs differ beyond tolerance: "
                         + "; ".join(f"{r['model']} b{r['batch']} {r['runtime']}: {r['max_diff']:.1e}" for r in bad))


if __name__ == "__main__":
    main()
