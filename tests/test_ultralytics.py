"""An ultralytics YOLOv8 (where ultralytics is installed: ``pip install -e .[zoo]``; not in CI): adapters
inserted, folded back into its ``DetectionModel`` with its BatchNorms, as its own ``fuse()`` leaves it; the
model's own exporter (which runs ``fuse()`` again) writes an ONNX file that onnxruntime runs, equal to the
eager model with adapters."""

import contextlib
import copy
import io
import os

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, rel_err

import repfold

ultralytics = pytest.importorskip("ultralytics")


def test_yolov8_folds_into_its_detection_model_and_exports_with_ultralytics(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setenv("YOLO_OFFLINE", "1")  # never a download
    monkeypatch.chdir(tmp_path)  # (the exporter writes beside the model's yaml name, here)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        yolo = ultralytics.YOLO("yolov8n.yaml", task="detect")
    model = yolo.model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    blocks = sorted({n.rpartition(".")[0] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)})[:4]
    gm = repfold.insert(model, before=blocks, example_inputs=x)
    randomize_adapters(gm, std=0.5)
    gm.eval()
    with torch.no_grad():
        want, base = gm(x)[0], model(x)[0]
    assert rel_err(want, base) > 1e-3  # the adapters change the predictions
    out, report = repfold.fold(gm, into=model, return_report=True)
    fused = copy.deepcopy(model).fuse(verbose=False)

    def count(m, kind):
        return sum(isinstance(t, kind) for t in m.modules())

    assert type(out) is type(model) and not report.kept
    assert count(out, torch.nn.Conv2d) == count(fused, torch.nn.Conv2d) and count(out, torch.nn.BatchNorm2d) == 0
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in fused.parameters())
    with torch.no_grad():
        assert rel_err(out(x)[0], want) < 1e-5
    yolo.model = out
    with contextlib.redirect_stdout(io.StringIO()):
        path = yolo.export(format="onnx", imgsz=64, simplify=False)
    assert os.path.exists(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(np.asarray(got)), want) < 1e-5
