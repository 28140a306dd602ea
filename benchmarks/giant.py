"""A 6B-parameter ViT in bfloat16, shaped as InternViT-6B, inserted and folded in place on one machine.

    python benchmarks/giant.py                 # width 3200, 48 blocks, 25 heads (about 10 minutes, 13 GB)
    python benchmarks/giant.py --depth 4       # the same width, a quick look

The model is timm's ``VisionTransformer`` built from a config with
InternViT-6B's shape (width 3200, MLP 12800, 25 heads of 128, patch 14,
LayerScale, normalised queries and keys), 224x224 inputs, random bfloat16
weights made in place (the model is never held in float32: that alone would
be 24 GB). Each step is timed, with what it adds to the process's resident
memory at its peak (the peak is reset before each step):

1. ``repfold.insert`` (adapters before every ``attn`` and ``mlp``; it shares
   the frozen weights), adapters given random trained-like values;
2. the model with adapters run once in bfloat16, and once in float32
   arithmetic on the same bfloat16 weights (each op's tensors widened as it
   runs, so the weights are never held in float32 whole): the reference;
3. ``repfold.fold(gm, inplace=True)``, then the folded model run once;
4. the floor of a copy: every weight cloned one at a time (the bytes
   ``copy.deepcopy`` moves; a whole second copy would not fit beside the
   model on a 24 GB machine);
5. PEFT's ``merge_and_unload`` on the same model with LoRA of rank 8 on the
   same layers (qkv, fc1), in place.

Exactness is judged as ``precision.py`` judges it: the folded model's error
against the float32 reference may be at most ``FACTOR`` times the unfolded
bfloat16 model's own. Writes benchmarks/results/giant.{json,md}; exits
non-zero where the judgement fails.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from precision import FACTOR
from scaling import RANK, _status, measured
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

RESULTS = Path(__file__).parent / "results"


def build(depth: int) -> torch.nn.Module:
    """InternViT-6B's shape as a timm VisionTransformer, random bfloat16 weights (never float32 whole)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = VisionTransformer(img_size=224, patch_size=14, embed_dim=3200, depth=depth, num_heads=25,
                                      mlp_ratio=4.0, qkv_bias=False, qk_norm=True, init_values=0.1,
                                      num_classes=1000)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.1)
            elif p.ndim == 1 and ("norm" in name or name.endswith("bias")):
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    return model


class Float32(TorchFunctionMode):
    """Every bfloat16 tensor an op reads, widened to float32 for that op: float32 arithmetic on the model's
    own (bfloat16) weights, one op's tensors at a time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t

        return func(*tree_map(up, args), **tree_map(up, kwargs or {}))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import repfold

    sys_gb = 1e9
    steps: dict[str, dict] = {}

    def step(name: str, call):
        seconds, added, out = measured(call)
        steps[name] = {"seconds": round(seconds, 2), "added_bytes": added, "rss_bytes": _status("VmRSS")}
        print(f"{name}: {seconds:.1f} s, +{added / sys_gb:.2f} GB, resident {_status('VmRSS') / sys_gb:.2f} GB",
              flush=True)
        return out

    model = step("build", lambda: build(args.depth))
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{params / 1e9:.2f} B parameters, {weights / sys_gb:.2f} GB of bfloat16 weights", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    with torch.no_grad():
        gm = step("insert", lambda: repfold.insert(model, before=["attn", "mlp"], example_inputs=x))
        gen = torch.Generator().manual_seed(2)
        for name, p in gm.named_parameters():
            if name.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.05))
        gm.eval()
        unfolded = step("run, bfloat16", lambda: gm(x))

        def reference():
            with Float32():
                return gm(x)

        ref = step("run, float32 arithmetic (reference)", reference)
        base = step("run without adapters, bfloat16", lambda: model(x))
        folded_gm, report = step("fold in place", lambda: repfold.fold(gm, example_inputs=x, inplace=True,
                                                                      return_report=True))
        assert folded_gm is gm
        folded = step("run folded, bfloat16", lambda: gm(x))
        del folded_gm
        gc.collect()

        def clones():  # the bytes copy.deepcopy would move, one tensor at a time
            for p in model.parameters():
                p.clone()

        step("copy floor (each weight cloned, one at a time)", clones)

        from peft import LoraConfig, get_peft_model

        wrapped = step("PEFT get_peft_model (LoRA r=8 on qkv, fc1)",
                       lambda: get_peft_model(model, LoraConfig(r=RANK, target_modules=["qkv", "fc1"])))
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        step("PEFT merge_and_unload", wrapped.merge_and_unload)

    errors = {"adapters change the output by": relative(unfolded, base),
              "unfolded bfloat16 vs reference": relative(unfolded, ref),
              "folded bfloat16 vs reference": relative(folded, ref),
              "folded vs unfolded": relative(folded, unfolded)}
    ok = errors["folded bfloat16 vs reference"] <= FACTOR * errors["unfolded bfloat16 vs reference"]
    result = {"depth": args.depth, "params": params, "weights": weights, "steps": steps, "errors": errors,
              "factor": FACTOR, "exact": ok, "regions": len(report.regions), "folded": len(report.folded)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "giant.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "giant.md").write_text(render(result))
    print(render(result))
    raise SystemExit(0 if ok else 1)


def render(r: dict) -> str:
    gb = 1e9
    w = r["weights"]
    lines = [
        "# A 6B ViT in bfloat16, inserted and folded in place (`benchmarks/giant.py`)",
        "",
        (f"timm `VisionTransformer` with InternViT-6B's shape: width 3200, {r['depth']} blocks, 25 heads, MLP 12800,"
         f" LayerScale, normalised q and k; {r['params'] / 1e9:.2f} B parameters, {w / gb:.2f} GB of random bfloat16"
         " weights; adapters before every attn and mlp; one 224x224 image; 2 CPU cores, 24 GB."),
        "",
        "| step | time | added at its peak | resident after |",
        "|---|---|---|---|",
    ]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {s['seconds']:.1f} s | {s['added_bytes'] / gb:.2f} GB ({s['added_bytes'] / w:.2f}×"
                     f" the weights) | {s['rss_bytes'] / gb:.2f} GB |")
    fold, floor = r["steps"]["fold in place"], r["steps"]["copy floor (each weight cloned, one at a time)"]
    merge = r["steps"]["PEFT merge_and_unload"]
    lines += [
        "",
        (f"{r['folded']} of {r['regions']} regions folded. Fold in place: {fold['seconds'] / floor['seconds']:.1f}× the"
         f" copy floor's time, {fold['seconds'] / merge['seconds']:.1f}× PEFT's merge_and_unload's."),
        "",
        "Output differences (largest, relative to the reference's largest magnitude):",
        "",
    ]
    lines += [f"* {k}: {v:.2e}" for k, v in r["errors"].items()]
    verdict = "holds" if r["exact"] else "FAILS"
    lines += ["", (f"Judged as `precision.py` judges it (folded error <= {r['factor']:g}x the unfolded bfloat16 model's"
              f" own): {verdict}.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
