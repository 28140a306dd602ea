"""fx fold time: `repfold.fold(gm)` on a timm model with adapters, next to a plain copy of the same model.

    python benchmarks/fx_fold.py            # ViT-B/16, adapters before attn and mlp (24 regions)
    python benchmarks/fx_fold.py --quick    # a smoke run: ViT-Ti/16

The fold traces the GraphModule again, runs it once on an example input to
learn its shapes, plans, writes the new weights and copies the rest (its
input is never modified).

A user folds once per process, into memory the process has not used yet, and
on Linux the first touch of fresh pages can cost more than the arithmetic. So
each timed call runs in a fresh process: the model is built, then one call is
timed. For reference, the same is done for ``copy.deepcopy`` of the model (the
least any fold that returns a new model must do) and for one forward pass at
batch 1 (what shape propagation costs); the three kinds of process are
interleaved and medians reported. The warm figure (the fourth of four calls in
one process) is given too. Goal (issue 6): under one second on ViT-B/16.

Writes benchmarks/results/fx_fold.{json,md}, then exits non-zero when a
region is not folded or the folded model's float32 output is more than
``TOL`` (relative to the output's scale) from the unfolded one's, so the
smoke run checks the fold too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WHAT = ("fold", "deepcopy", "forward", "warm fold")
TOL = 1e-5  # float32, relative to the output's scale


def child(model_name: str, what: str) -> float:
    """Seconds of one ``what`` call, after the model with trained-like adapters is built."""
    import timm
    import torch
    from _common import trained_like

    import repfold

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    gm = trained_like(repfold.insert(model, before=["attn", "mlp"]), seed=0)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    call = {
        "fold": lambda: repfold.fold(gm),
        "warm fold": lambda: repfold.fold(gm),
        "deepcopy": lambda: copy.deepcopy(gm),
        "forward": lambda: gm(x),
    }[what]
    with torch.no_grad():
        for _ in range(3 if what == "warm fold" else 0):
            call()
        t = time.perf_counter()
        call()
        return time.perf_counter() - t


def check(model_name: str) -> dict:
    """Regions folded, and the largest float32 output difference, relative to the output's scale."""
    import timm
    import torch
    from _common import trained_like

    import repfold

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    gm = trained_like(repfold.insert(model, before=["attn", "mlp"]), seed=0)
    folded, report = repfold.fold(gm, return_report=True)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        y = gm(x)
        err = ((folded(x) - y).abs().max() / y.abs().max()).item()
    return {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "regions": len(report.regions),
        "folded": len(report.folded),
        "max_rel_output_diff_f32": float(f"{err:.2g}"),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="ViT-Ti/16, 2 repeats (a smoke run)")
    ap.add_argument("--out", help="folder for fx_fold.{json,md} (default benchmarks/results, quick: results/quick)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: model, what
    args = ap.parse_args()
    if args.child:
        print(child(*args.child))
        return
    if args.quick:
        args.model, args.repeats = "vit_tiny_patch16_224", 2
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)

    times: dict[str, list[float]] = {w: [] for w in WHAT}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for what in WHAT:
            run = subprocess.run([sys.executable, __file__, "--child", args.model, what],
                                 check=True, capture_output=True, text=True)
            times[what].append(float(run.stdout.split()[-1]))
    med = {w: round(statistics.median(t), 3) for w, t in times.items()}
    fig = {
        "model": args.model, **check(args.model), "repeats": args.repeats,
        "fold_s": med["fold"], "fold_s_range": [round(min(times["fold"]), 3), round(max(times["fold"]), 3)],
        "warm_fold_s": med["warm fold"], "deepcopy_s": med["deepcopy"], "forward_b1_s": med["forward"],
    }
    print(json.dumps(fig, indent=2))
    (out / "fx_fold.json").write_text(json.dumps(fig, indent=2) + "\n")
    (out / "fx_fold.md").write_text(
        "| model | regions folded | `repfold.fold`, once per process (median, range) | warm (4th call) "
        "| for reference: `copy.deepcopy` | one forward, batch 1 |\n|---|---|---|---|---|---|\n"
        f"| {fig['model']} ({fig['params_M']} M params) | {fig['folded']}/{fig['regions']} | "
        f"**{fig['fold_s']} s** ({fig['fold_s_range'][0]}–{fig['fold_s_range'][1]}) | {fig['warm_fold_s']} s "
        f"| {fig['deepcopy_s']} s | {fig['forward_b1_s']} s |\n"
    )
    if fig["folded"] != fig["regions"] or not fig["regions"]:
        raise SystemExit(f"fx_fold.py: {fig['folded']} of {fig['regions']} regions folded")
    if not fig["max_rel_output_diff_f32"] <= TOL:
        raise SystemExit(f"fx_fold.py: folded vs unfolded output {fig['max_rel_output_diff_f32']:.1e} > {TOL:.0e}")


if __name__ == "__main__":
    main()
