"""torch.export end to end: adapters into an ExportedProgram, a short training, a folded program to ship.

    python examples/export_pipeline.py                # a small timm ViT; writes folded.pt2 in a temp folder
    python examples/export_pipeline.py --aoti         # and compiles it with AOTInductor (needs a C++ compiler)

The path for models torch.fx cannot trace (Hugging Face transformers 5, PEFT
models) and for deployment through torch.export (AOTInductor, ExecuTorch):

1. ``torch.export.export(model, (x,))`` the pretrained backbone;
2. ``repfold.insert(ep, before=[...])``: a trainable GraphModule with adapters;
3. train the adapters (here: a few steps towards a made-up target);
4. ``repfold.fold(torch.export.export(gm, (x,)))``: a new ExportedProgram with
   the base model's operators and weight names, ready for ``torch.export.save``,
   ``run_decompositions()`` or ``torch._inductor.aoti_compile_and_package``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import timm
import torch

import repfold


def main(argv=None, steps: int = 20) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aoti", action="store_true", help="also compile the folded program with AOTInductor")
    ap.add_argument("--out", default=None, help="folder for folded.pt2 (default: a temporary one)")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, depth=4).eval()
    x = torch.randn(4, 3, 64, 64)
    ep = torch.export.export(model, (x,))

    gm = repfold.insert(ep, before=["attn", "mlp"], strict=True)  # the program's own example inputs
    target = torch.randn(4, model.num_classes)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(gm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()

    folded, report = repfold.fold(torch.export.export(gm, (x,)), return_report=True)
    print(report)
    with torch.no_grad():
        trained, shipped, base = gm(x), folded.module()(x), model(x)
    scale = trained.abs().max()
    err = float((shipped - trained).abs().max() / scale)
    moved = float((trained - base).abs().max() / scale)
    if moved <= 1e-3 or err > 1e-5:
        raise SystemExit(f"the adapters moved the output by {moved:.1e}; the fold changed it by {err:.1e}")
    print(f"training moved the output by {moved:.1e} of its scale; the folded program differs by {err:.1e}")

    out = a.out or tempfile.mkdtemp()
    path = os.path.join(out, "folded.pt2")
    torch.export.save(folded, path)
    with torch.no_grad():
        same = torch.equal(torch.export.load(path).module()(x), shipped)
    print(f"wrote {path}: {os.path.getsize(path) / 2**20:.1f} MB; loads back to the same outputs: {same}")
    if a.aoti:
        package = torch._inductor.aoti_compile_and_package(folded, package_path=os.path.join(out, "folded_aoti.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        with torch.no_grad():
            print(f"AOTInductor package {package}: differs by {float((runner(x) - shipped).abs().max() / scale):.1e}")
    return {"err": err, "moved": moved, "same": same, "path": path}


if __name__ == "__main__":
    main()
