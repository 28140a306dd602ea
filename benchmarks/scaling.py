"""Fold cost against model size: ViT-S/16, B/16, L/16, H/14 and g/14 (random weights), in fx, torch.export
and ONNX, each beside its floor.

    python benchmarks/scaling.py                  # all five sizes (about 25 minutes on 2 cores; make bench-scaling)
    python benchmarks/scaling.py --sizes S,B --repeats 1

Every measurement runs in a fresh process (a user folds once per process), the
kinds of process interleaved, medians and ranges reported:

* fx: ``repfold.fold(gm)`` on the model with adapters before attn and mlp;
  floor: ``copy.deepcopy(gm)`` (the least a fold that returns a new model does).
* torch.export: ``repfold.fold(ep)`` on ``torch.export.export(gm, (x,))``
  (the fold exports the folded module again); same floor.
* ONNX: ``python -m repfold in.onnx -o out.onnx`` on the TorchScript export
  (external data from ViT-H up); floor: ``onnx.load`` + ``onnx.save`` of the
  same file (``onnx_fold.py``).

Memory: each process's peak resident memory. For fx and export it holds the
model with its adapters too (and the exported program), so the copy floor's
process (the model and one copy) is the one to compare with; the ONNX command
line holds nothing else. Writes benchmarks/results/scaling.{json,md,png}.
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


def _timed_call(call) -> tuple[float, int]:
    """(seconds of ``call()``, this process's peak resident memory in bytes after it)."""
    import resource

    t = time.perf_counter()
    out = call()
    elapsed = time.perf_counter() - t
    del out
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(model_name: str, what: str) -> dict:
    """One timed call in this (fresh) process: the fold on one path, or the copy floor."""
    import copy

    import timm
    import torch
    from _common import trained_like

    import repfold

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    gm = trained_like(repfold.insert(model, before=["attn", "mlp"], example_inputs=x), seed=0)
    del model
    params = sum(p.numel() for n, p in gm.named_parameters() if not n.startswith("repfold_adapters."))
    with torch.no_grad():
        if what == "export":
            ep = torch.export.export(gm, (x,))
            seconds, memory = _timed_call(lambda: repfold.fold(ep))
        elif what == "fx":
            seconds, memory = _timed_call(lambda: repfold.fold(gm, example_inputs=x))
        else:
            seconds, memory = _timed_call(lambda: copy.deepcopy(gm))
    return {"params": params, "seconds": seconds, "memory": memory}


def _run_child(model_name: str, what: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", what, "--model", model_name],
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


def measure(sizes: list[str], repeats: dict[str, int]) -> list[dict]:
    rows = []
    for size in sizes:
        name, n = SIZES[size], repeats[size]
        got: dict[str, list] = {"fx": [], "export": [], "copy": []}
        for _ in range(n):  # interleaved, so drift hits every kind alike
            for what, runs in got.items():
                runs.append(_run_child(name, what))
        row = {"size": size, "model": name, "params": got["fx"][0]["params"]}
        for what, runs in got.items():
            row[what] = _summary([(r["seconds"], r["memory"]) for r in runs])
        row["onnx"] = _onnx(name, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _ratio(a: dict, b: dict) -> str:
    return f"{a['seconds'] / b['seconds']:.2f}×"


def render(rows: list[dict]) -> str:
    gb = 1e9
    lines = [
        "# Fold cost against model size (`benchmarks/scaling.py`)",
        "",
        ("Fresh process per call, medians of the runs given (ranges below); memory: each process's peak resident"
         " memory (fx, export and copy: with the model itself). 2 CPU cores."),
        "",
        ("| model | parameters | fx fold | export fold | copy (floor) | ONNX file | `python -m repfold` | load + save"
         " (floor) | peak memory: fx / export / copy | ONNX fold / floor |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["onnx"]
        lines.append(
            f"| ViT-{r['size']} | {r['params'] / 1e6:.0f} M | {r['fx']['seconds']:.2f} s ({_ratio(r['fx'], r['copy'])})"
            f" | {r['export']['seconds']:.2f} s | {r['copy']['seconds']:.2f} s | {o['file_bytes'] / gb:.2f} GB"
            f" | {o['fold']['seconds']:.2f} s ({_ratio(o['fold'], o['floor'])}) | {o['floor']['seconds']:.2f} s"
            f" | {r['fx']['memory_bytes'] / gb:.2f} / {r['export']['memory_bytes'] / gb:.2f} /"
            f" {r['copy']['memory_bytes'] / gb:.2f} GB | {o['fold']['memory_bytes'] / gb:.2f} GB"
            f" ({o['fold']['memory_bytes'] / o['file_bytes']:.2f}× file) / {o['floor']['memory_bytes'] / gb:.2f} GB |"
        )
    lines += ["", "Ranges (min–max seconds):", ""]
    for r in rows:
        parts = [f"{k} {r[k]['range'][0]:.2f}–{r[k]['range'][1]:.2f}" for k in ("fx", "export", "copy")]
        parts += [f"onnx {k} {r['onnx'][k]['range'][0]:.2f}–{r['onnx'][k]['range'][1]:.2f}" for k in ("fold", "floor")]
        lines.append(f"* ViT-{r['size']}: " + ", ".join(parts))
    slope = _slopes(rows)
    if slope:
        lines += ["", "Growth (slope of log time against log parameters, least squares): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in slope.items()) + " (1.00 is linear)."]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict[str, list[float]]:
    return {
        "fx fold": [r["fx"]["seconds"] for r in rows],
        "export fold": [r["export"]["seconds"] for r in rows],
        "copy.deepcopy (fx floor)": [r["copy"]["seconds"] for r in rows],
        "python -m repfold (ONNX)": [r["onnx"]["fold"]["seconds"] for r in rows],
        "onnx.load + onnx.save (ONNX floor)": [r["onnx"]["floor"]["seconds"] for r in rows],
    }


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

    params = [r["params"] / 1e6 for r in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["o-", "s-", "o--", "^-", "^--"]
    for (name, ys), style in zip(_series(rows).items(), styles):
        ax.plot(params, ys, style, label=name)
    ax.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="seconds (median)",
           title="fold time and its floor")
    ax.legend(fontsize=8)
    for key, label, style in (("fx", "fx fold", "o-"), ("export", "export fold", "s-"), ("copy", "copy", "o--")):
        mem.plot(params, [r[key]["memory_bytes"] / 1e9 for r in rows], style, label=label + " (with the model)")
    mem.plot(params, [r["onnx"]["fold"]["memory_bytes"] / 1e9 for r in rows], "^-", label="python -m repfold")
    mem.plot(params, [r["onnx"]["floor"]["memory_bytes"] / 1e9 for r in rows], "^--", label="onnx load + save")
    mem.plot(params, [r["onnx"]["file_bytes"] / 1e9 for r in rows], "k:", label="ONNX file size")
    mem.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="GB", title="peak resident memory")
    mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--repeats", type=int, help="runs of each kind per size (default: 3, 2 for H and g)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true", help="only write the .md and .png again from the .json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child)))
        return
    out = Path(args.out)
    if args.render:
        rows = json.loads((out / "scaling.json").read_text())
    else:
        sizes = args.sizes.split(",")
        repeats = {s: args.repeats or (2 if s in ("H", "g") else 3) for s in sizes}
        rows = measure(sizes, repeats)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "scaling.md").write_text(render(rows))
    plot(rows, out / "scaling.png")
    print(render(rows))


if __name__ == "__main__":
    main()
