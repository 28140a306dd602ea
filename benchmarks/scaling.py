"""Fold cost against model size: ViT-S/16, B/16, L/16, H/14 and g/14 (random weights), float32 and
bfloat16, in fx (a new model and in place), torch.export and ONNX, each beside its floor and PEFT's merge.

    python benchmarks/scaling.py                  # all five sizes, both dtypes (make bench-scaling)
    python benchmarks/scaling.py --sizes S,B --dtypes float32 --repeats 1

Every measurement runs in a fresh process (a user folds once per process), the
kinds of process interleaved, medians and ranges reported:

* fx: ``repfold.fold(gm)`` on the model with adapters before attn and mlp
  (what ``repfold.insert`` returns, trained-like random adapter weights);
  floor: ``copy.deepcopy(gm)`` (the least a fold that returns a new model does).
* in place: ``repfold.fold(gm, inplace=True)``.
* torch.export: ``repfold.fold(ep)`` on ``torch.export.export(gm, (x,))``
  (the fold exports the folded module again).
* PEFT: ``merge_and_unload()`` of the same model with LoRA of rank 8 on the
  same layers (qkv, fc1), the ecosystem's own merge (in place).
* insert: ``repfold.insert`` itself (it shares the frozen weights).
* ONNX (float32): ``python -m repfold in.onnx -o out.onnx`` on the TorchScript
  export (external data from ViT-H up); floor: ``onnx.load`` + ``onnx.save`` of
  the same file (``onnx_fold.py``).

Memory: what each call adds to the process's resident memory at its peak
(the peak is reset before the call, ``/proc/self/clear_refs``), against the
model's weights: a fold that returns a new model may add one copy, an
in-place one only a layer's working set. Writes
benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnx_fold import FLOOR, FOLD, clear, timed

RESULTS = Path(__file__).parent / "results"
SIZES = {
    "S": "vit_small_patch16_224",
    "B": "vit_base_patch16_224",
    "L": "vit_large_patch16_224",
    "H": "vit_huge_patch14_224",
    "g": "vit_giant_patch14_224",
}
KINDS = ("fx", "inplace", "export", "copy", "peft")
RANK = 8  # LoRA's rank for PEFT's merge, as repfold's adapters' hidden width


def _status(key: str) -> int:
    import re

    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measured(call) -> tuple[float, int, object]:
    """(seconds of ``call()``, what it added to resident memory at its peak, its result)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    before = _status("VmRSS")
    t = time.perf_counter()
    out = call()
    elapsed = time.perf_counter() - t
    return elapsed, _status("VmHWM") - before, out


def child(model_name: str, what: str, dtype: str) -> dict:
    """One timed call in this (fresh) process: a fold on one path, a floor, or PEFT's merge."""
    import copy

    import timm
    import torch
    from _common import trained_like

    import repfold

    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # made in its dtype: no float32 copy made and freed first
    try:
        model = timm.create_model(model_name, pretrained=False).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.randn(1, *model.pretrained_cfg["input_size"]).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"params": params, "weights": weights}
    with torch.no_grad():
        if what == "peft":
            from peft import LoraConfig, get_peft_model

            wrapped = get_peft_model(model, LoraConfig(r=RANK, target_modules=["qkv", "fc1"]))
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
            seconds, memory, _ = measured(wrapped.merge_and_unload)
            return {**row, "seconds": seconds, "memory": memory}
        seconds, memory, gm = measured(lambda: repfold.insert(model, before=["attn", "mlp"], example_inputs=x))
        row["insert"] = {"seconds": seconds, "memory": memory}
        gm = trained_like(gm, seed=0)
        if what == "export":
            ep = torch.export.export(gm, (x,))
            seconds, memory, _ = measured(lambda: repfold.fold(ep))
        elif what == "fx":
            seconds, memory, _ = measured(lambda: repfold.fold(gm, example_inputs=x))
        elif what == "inplace":
            seconds, memory, _ = measured(lambda: repfold.fold(gm, example_inputs=x, inplace=True))
        else:
            seconds, memory, _ = measured(lambda: copy.deepcopy(gm))
    return {**row, "seconds": seconds, "memory": memory}


def _run_child(model_name: str, what: str, dtype: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", what, "--model", model_name, "--dtype", dtype],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _onnx(model_name: str, repeats: int) -> dict:
    """CLI fold and load+save floor, interleaved, each in a fresh process (as onnx_fold.py)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "adapted.onnx"
        here = Path(__file__).with_name("onnx_fold.py")
        subprocess.run([sys.executable, str(here), "--model", model_name, "--export-to", str(src)], check=True)
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        external = any(p.suffix != ".onnx" for p in Path(d).iterdir())
        runs = {"fold": [], "floor": []}
        for i in range(repeats):
            t, m = timed([sys.executable, "-c", FLOOR, str(src), str(Path(d) / f"floor{i}.onnx"), str(int(external))])
            runs["floor"].append((t, m))
            clear(Path(d), "floor")
            t, m = timed([sys.executable, "-c", FOLD, str(src), "-o", str(Path(d) / f"folded{i}.onnx"), "-q"])
            runs["fold"].append((t, m))
            clear(Path(d), "folded")
    return {"file_bytes": size, **{k: _summary(v) for k, v in runs.items()}}


def _summary(runs: list[tuple[float, int]]) -> dict:
    times = [t for t, _ in runs]
    return {"seconds": round(statistics.median(times), 3), "range": [round(min(times), 3), round(max(times), 3)],
            "memory_bytes": max(m for _, m in runs), "runs": len(runs)}


def measure(sizes: list[str], dtypes: list[str], repeats: dict[str, int], onnx: bool) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for size in sizes:
            name, n = SIZES[size], repeats[size]
            got: dict[str, list] = {k: [] for k in KINDS}
            for _ in range(n):  # interleaved, so drift hits every kind alike
                for what, runs in got.items():
                    runs.append(_run_child(name, what, dtype))
            first = got["fx"][0]
            row = {"size": size, "model": name, "dtype": dtype, "params": first["params"], "weights": first["weights"]}
            for what, runs in got.items():
                row[what] = _summary([(r["seconds"], r["memory"]) for r in runs])
            inserts = [r["insert"] for k in ("fx", "inplace", "export", "copy") for r in got[k]]
            row["insert"] = _summary([(r["seconds"], r["memory"]) for r in inserts])
            if onnx and dtype == "float32":
                row["onnx"] = _onnx(name, n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _ratio(a: dict, b: dict) -> str:
    return f"{a['seconds'] / b['seconds']:.2f}×"


def _added(r: dict, kind: str) -> str:
    return f"{r[kind]['memory_bytes'] / r['weights']:.2f}"


def render(rows: list[dict]) -> str:
    gb = 1e9
    lines = [
        "# Fold cost against model size (`benchmarks/scaling.py`)",
        "",
        ("Fresh process per call, medians of the runs given (ranges below), 2 CPU cores. Times in seconds, with"
         " their ratio to `copy.deepcopy` of the same model (the floor of a fold that returns a new model). Memory:"
         " what the call adds to the process at its peak, in copies of the model's weights (a fold that returns a"
         " new model may add 1.00, plus a layer; in place only a layer's working set)."),
        "",
        ("| model | dtype | parameters (weights) | `insert` | fx fold | in place | export fold | copy (floor) |"
         " PEFT merge | added memory: insert / fx / in place / export / copy / PEFT |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| ViT-{r['size']} | {r['dtype']} | {r['params'] / 1e6:.0f} M ({r['weights'] / gb:.2f} GB)"
            f" | {r['insert']['seconds']:.2f} s"
            f" | {r['fx']['seconds']:.2f} s ({_ratio(r['fx'], r['copy'])})"
            f" | {r['inplace']['seconds']:.2f} s ({_ratio(r['inplace'], r['copy'])})"
            f" | {r['export']['seconds']:.2f} s ({_ratio(r['export'], r['copy'])})"
            f" | {r['copy']['seconds']:.2f} s | {r['peft']['seconds']:.2f} s"
            f" | {' / '.join(_added(r, k) for k in ('insert', 'fx', 'inplace', 'export', 'copy', 'peft'))} |"
        )
    onnx = [r for r in rows if "onnx" in r]
    if onnx:
        lines += ["", "ONNX (float32; peak resident memory of the whole process, against the file's size):", "",
                  "| model | ONNX file | `python -m repfold` | load + save (floor) | peak memory: fold / floor |",
                  "|---|---|---|---|---|"]
        for r in onnx:
            o = r["onnx"]
            lines.append(
                f"| ViT-{r['size']} | {o['file_bytes'] / gb:.2f} GB | {o['fold']['seconds']:.2f} s"
                f" ({_ratio(o['fold'], o['floor'])}) | {o['floor']['seconds']:.2f} s | {o['fold']['memory_bytes'] / gb:.2f}"
                f" GB ({o['fold']['memory_bytes'] / o['file_bytes']:.2f}× file) / {o['floor']['memory_bytes'] / gb:.2f} GB |"
            )
    lines += ["", "Ranges (min–max seconds):", ""]
    for r in rows:
        parts = [f"{k} {r[k]['range'][0]:.2f}–{r[k]['range'][1]:.2f}" for k in ("insert", *KINDS)]
        if "onnx" in r:
            parts += [f"onnx {k} {r['onnx'][k]['range'][0]:.2f}–{r['onnx'][k]['range'][1]:.2f}" for k in ("fold", "floor")]
        lines.append(f"* ViT-{r['size']} {r['dtype']}: " + ", ".join(parts))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        slope = _slopes([r for r in rows if r["dtype"] == dtype])
        if slope:
            lines += ["", f"Growth in {dtype} (slope of log time against log parameters, least squares): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in slope.items()) + " (1.00 is linear)."]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict[str, list[float]]:
    out = {
        "fx fold": [r["fx"]["seconds"] for r in rows],
        "fx fold in place": [r["inplace"]["seconds"] for r in rows],
        "export fold": [r["export"]["seconds"] for r in rows],
        "copy.deepcopy (floor)": [r["copy"]["seconds"] for r in rows],
        "PEFT merge_and_unload": [r["peft"]["seconds"] for r in rows],
    }
    if all("onnx" in r for r in rows):
        out["python -m repfold (ONNX)"] = [r["onnx"]["fold"]["seconds"] for r in rows]
        out["onnx.load + onnx.save (ONNX floor)"] = [r["onnx"]["floor"]["seconds"] for r in rows]
    return out


def _slopes(rows: list[dict]) -> dict[str, float]:
    import math

    if len(rows) < 2:
        return {}
    xs = [math.log(r["params"]) for r in rows]
    out = {}
    for name, ys in _series(rows).items():
        ys = [math.log(y) for y in ys]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out[name] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes) + 1, figsize=(5.5 * (len(dtypes) + 1), 4.2), squeeze=False)
    styles = ["o-", "o:", "s-", "o--", "x-", "^-", "^--"]
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        params = [r["params"] / 1e6 for r in mine]
        for (name, ys), style in zip(_series(mine).items(), styles):
            ax.plot(params, ys, style, label=name)
        ax.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="seconds (median)",
               title=f"time, {dtype}")
        ax.legend(fontsize=7)
    mem = axes[0][-1]
    for dtype, dash in zip(dtypes, ("-", "--")):
        mine = [r for r in rows if r["dtype"] == dtype]
        params = [r["params"] / 1e6 for r in mine]
        for kind in ("fx", "inplace", "copy", "peft"):
            mem.plot(params, [r[kind]["memory_bytes"] / r["weights"] for r in mine], "o" + dash, label=f"{kind}, {dtype}")
    mem.set(xscale="log", xlabel="parameters (millions)", ylabel="added memory / model's weights",
            title="memory a call adds")
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, help="runs of each kind per size (default: 2, 1 for H and g)")
    ap.add_argument("--no-onnx", action="store_true", help="leave the ONNX columns out")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true", help="only write the .md and .png again from the .json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.dtype)))
        return
    out = Path(args.out)
    if args.render:
        rows = json.loads((out / "scaling.json").read_text())
    else:
        sizes = args.sizes.split(",")
        repeats = {s: args.repeats or (1 if s in ("H", "g") else 2) for s in sizes}
        rows = measure(sizes, args.dtypes.split(","), repeats, onnx=not args.no_onnx)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "scaling.md").write_text(render(rows))
    plot(rows, out / "scaling.png")
    print(render(rows))


if __name__ == "__main__":
    main()
