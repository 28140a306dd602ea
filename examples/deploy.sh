#!/usr/bin/env bash
# A deployment pipeline: export the trained model -> fold it, checked and reported -> serve it.
#
#     bash examples/deploy.sh            # uses .venv/bin/python when there is one
#
# Stage 1 stands in for your training job: a timm ViT-S/16 with RepAdapters
# whose weights are random (as after training), exported with a dynamic batch.
# Stage 2 is the one line a pipeline adds. Stage 3 loads the folded model in
# onnxruntime and checks its predictions against the unfolded export.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1. export (your training job)"
"$PY" - "$work/adapted.onnx" <<'EOF'
import sys, warnings
import timm, torch
import repfold

torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
x = torch.randn(1, 3, 224, 224)
gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
with torch.no_grad():
    for name, p in gm.named_parameters():
        if name.startswith("repfold_adapters."):
            p.normal_(0, 0.05)
gm.eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(gm, (x,), sys.argv[1], dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
print("exported", sys.argv[1])
EOF

echo "== 2. fold: the output is written only if onnxruntime agrees with the input model"
"$PY" -m repfold "$work/adapted.onnx" -o "$work/folded.onnx" --check --report "$work/report.json" \
    | grep -E '^(repfold|check|wrote)'   # summary, check and output lines; the report holds every region
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); \
print(f\"report: {sum(x['folded'] for x in r['regions'])}/{len(r['regions'])} regions folded, \
parameters {r['params_before']:,} -> {r['params_after']:,}\")" "$work/report.json"

echo "== 3. serve"
"$PY" - "$work/adapted.onnx" "$work/folded.onnx" <<'EOF'
import sys
import numpy as np
import onnxruntime as ort

x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
runs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0] for p in sys.argv[1:]]
same = (runs[0].argmax(1) == runs[1].argmax(1)).mean()
print(f"batch of 8: same predictions {same:.0%}, largest logit difference {np.abs(runs[0] - runs[1]).max():.1e}")
EOF
