"""Quickstart: train adapters on a small task, fold them, ship the folded model through ONNX.

    python examples/quickstart.py            # about a minute on 2 CPU cores, offline

1. A data set made here: 32x32 images of noise with a faint tint; the label
   is the tinted colour channel.
2. A small timm ViT (random weights: nothing is downloaded) gets RepAdapters
   before every ``attn`` and ``mlp``; they and the classifier head train, the
   backbone stays frozen.
3. The adapters are folded into the backbone; the folded model is exported to
   ONNX and gives, in onnxruntime, the trained model's logits (to 1e-5 of
   their scale) and so its predictions. The script raises if it does not.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import timm
import torch

import repfold


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with a faint tint: the label is the tinted colour channel (red, green or blue)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    x[torch.arange(n), y] += 0.15
    return x, y


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(steps: int = 100) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=3).eval()
    train_x, train_y = colour_images(1024, seed=1)
    test_x, test_y = colour_images(512, seed=2)

    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=train_x[:1], hidden_dim=8)
    for p in gm.get_submodule("head").parameters():  # the task's new classifier trains too
        p.requires_grad_(True)
    trainable = [p for p in gm.parameters() if p.requires_grad]
    print(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in gm.parameters()):,} "
          f"parameters; test accuracy before: {accuracy(gm.eval(), test_x, test_y):.0%}")
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    gm.train()
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(gm(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, test accuracy {accuracy(gm.eval(), test_x, test_y):.0%}")
            gm.train()
    gm.eval()

    folded, report = repfold.fold(gm, return_report=True)
    print(f"folded {len(report.folded)} of {len(report.regions)} adapter regions; parameters "
          f"{report.params_before:,} -> {report.params_after:,} (the backbone's own)")

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (test_x[:1],), buf, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": test_x.numpy()})[0]
    with torch.no_grad():
        trained_logits = gm(test_x).numpy()
    # The logits themselves, not only their argmax: an adapter lost in the fold can leave every argmax as it was.
    diff = float(np.abs(onnx_logits - trained_logits).max() / np.abs(trained_logits).max())
    agree = float(np.mean(onnx_logits.argmax(1) == trained_logits.argmax(1)))
    print(f"onnxruntime, folded model: test accuracy {np.mean(onnx_logits.argmax(1) == test_y.numpy()):.0%}, "
          f"logits within {diff:.1e} of their scale of the trained model's, "
          f"same predictions as the trained model on {agree:.0%} of the test set")
    if len(report.kept) or len(report.folded) != len(gm.meta["repfold"]["adapters"]):
        raise RuntimeError(f"not every adapter folded:\n{report}")
    if not diff <= 1e-5:
        raise RuntimeError(f"the folded model's logits differ from the trained model's by {diff:.1e} of their scale")


if __name__ == "__main__":
    main()
