#!/usr/bin/env bash
# The GPU figures in one run, on a machine with a CUDA build of torch and timm but nothing of this project
# installed (the device machines lent to some sessions): no venv, no network, only this checkout.
#
#     bash benchmarks/gpu_run.sh            # figures to $OUT (the device tool's folder), else results/gpu
#
# Batch 1 and 32, ViT-B/16, Swin-T and ConvNeXt-T: base, with adapters and folded, in torch eager and
# torch.compile (and onnxruntime's CUDA / TensorRT providers where onnxruntime-gpu is installed), then the
# fx fold's own time with the model on the GPU. About 6 minutes on an H200, start-up aside.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
mkdir -p "$site/repfold"
cp repfold/*.py "$site/repfold/"
cp -r patterns "$site/repfold/patterns"  # what the package's package-dir mapping installs
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 benchmarks/inference.py --gpu yes --gpu-only --repeats "${REPEATS:-30}" --out "${OUT:-benchmarks/results/gpu}"
