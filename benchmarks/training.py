"""Adapter training against full fine-tuning: step time, peak memory, checkpoint size.

    python benchmarks/training.py            # ViT-B/16, batch 8, AdamW, on the CPU
    python benchmarks/training.py --quick    # ViT-Ti/16, batch 4 (a smoke run)

Each mode runs in a fresh process, so its peak resident memory is its own:
``full`` trains every parameter, ``adapters`` only the RepAdapters that
``repfold.insert`` put before every ``attn`` and ``mlp`` (the rest frozen, as
after ``insert``). Same model, batch, optimiser and data. The checkpoint a
task needs is the whole model for full fine-tuning and the adapters alone
(``repfold.save_adapters``) otherwise. Writes benchmarks/results/training.{json,md}.
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
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(model_name: str, mode: str, batch: int, steps: int) -> dict:
    import timm
    import torch

    import repfold

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    y = torch.randint(0, 10, (batch,))
    if mode == "adapters":
        model = repfold.insert(model.eval(), before=["attn", "mlp"], example_inputs=x[:1])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.safetensors"
        if mode == "adapters":
            repfold.save_adapters(model, path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        size = path.stat().st_size
    return {
        "mode": mode, "trainable": sum(p.numel() for p in params), "step_s": statistics.median(times),
        "peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "checkpoint_MB": size / 1e6,
    }


def table(model: str, batch: int, full: dict, ours: dict) -> str:
    def saving(key: str) -> str:
        return f"{1 - ours[key] / full[key]:.1%}"

    return "\n".join([
        f"| {model}, batch {batch}, AdamW, CPU | full fine-tuning | adapters | saving |",
        "|---|---|---|---|",
        f"| trainable parameters | {full['trainable']:,} | {ours['trainable']:,} | {saving('trainable')} |",
        f"| step time (median) | {full['step_s']:.2f} s | {ours['step_s']:.2f} s | {saving('step_s')} |",
        f"| peak memory (process) | {full['peak_MB']:.0f} MB | {ours['peak_MB']:.0f} MB | {saving('peak_MB')} |",
        (f"| checkpoint per task | {full['checkpoint_MB']:.1f} MB | {ours['checkpoint_MB']:.2f} MB | "
        f"{saving('checkpoint_MB')} |"),
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="folder for training.{json,md} (default benchmarks/results, quick: results/quick)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # model mode batch steps
    args = ap.parse_args()
    if args.child:
        name, mode, batch, steps = args.child
        print(json.dumps(child(name, mode, int(batch), int(steps))))
        return
    model, batch = ("vit_tiny_patch16_224", 4) if args.quick else ("vit_base_patch16_224", 8)
    out = Path(args.out) if args.out else RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for mode in ("full", "adapters"):
        done = subprocess.run([sys.executable, __file__, "--child", model, mode, str(batch), str(args.steps)],
                              check=True, capture_output=True, text=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(runs[mode]), flush=True)
    (out / "training.json").write_text(json.dumps({"model": model, "batch": batch, **runs}, indent=2) + "\n")
    text = table(model, batch, runs["full"], runs["adapters"])
    (out / "training.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
