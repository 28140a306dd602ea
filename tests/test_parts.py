"""A model neither tracer takes whole, with adapters in a part that traces: ``fold`` folds the part and gives
the model back, of its own class.

torchvision's detectors post-process with data-dependent code (score thresholds, NMS), so neither
torch.fx nor torch.export traces them; their backbone traces. The user inserts there
(``model.backbone = insert(model.backbone, ...)``), trains, and folds the whole detector with one call.
"""

import copy
import json
import warnings

import pytest
import torch
from conftest import randomize_adapters, rel_err

import repfold

torchvision = pytest.importorskip("torchvision")


def _detector(kind: str = "fasterrcnn"):
    torch.manual_seed(0)
    if kind == "retinanet":
        return torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, score_thresh=1e-3, min_size=128, max_size=128).eval()
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=1e-3, min_size=128, max_size=128).eval()


def test_a_detector_with_adapters_in_its_backbone_folds_in_one_call():
    model = _detector()
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    seen = {}
    hook = model.backbone.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        base = model(images)
    hook.remove()
    base_params = sum(p.numel() for p in model.parameters())
    convs = [n for n, m in model.backbone.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1][:3]
    model.backbone = repfold.insert(model.backbone, before=convs, example_inputs=seen["x"], bias=False)
    randomize_adapters(model.backbone, std=0.05)
    model.eval()
    adapted = copy.deepcopy(model)
    with torch.no_grad():
        want = model(images)
        assert rel_err(want[0]["boxes"], base[0]["boxes"]) > 1e-3  # the adapters change the detections
    out, report = repfold.fold(model, return_report=True)
    assert type(out) is type(model) and report.parts == ["backbone"]
    assert "folded part by part" in str(report) and all(r.folded for r in report.layered), str(report)
    assert not [n for n, _ in out.named_parameters() if "repfold_adapters" in n]
    assert sum(p.numel() for p in out.parameters()) <= base_params
    with torch.no_grad():
        got = out(images)
    for key in ("boxes", "scores", "labels"):
        assert got[0][key].shape == want[0][key].shape
    assert rel_err(got[0]["boxes"], want[0]["boxes"]) < 1e-5
    assert rel_err(got[0]["scores"], want[0]["scores"]) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), adapted.state_dict().values()))


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_insert_on_a_whole_detector_puts_the_adapters_in_the_part_that_traces(kind, tmp_path):
    """One ``insert`` call on the whole detector (scopes named from the top, its input a list of images as
    the detector takes): the backbone, the largest part holding them that traces, gets them, with the input
    it received on one run; a few training steps on the detector's own losses; ``fold`` on the whole
    detector then folds it."""
    model = _detector(kind)
    base_params = sum(p.numel() for p in model.parameters())
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        base = model(images)
    convs = ["backbone." + n for n, m in model.backbone.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1][:3]
    adapted = repfold.insert(model, before=convs, example_inputs=(images,), bias=False)
    assert type(adapted) is type(model) and isinstance(adapted.backbone, torch.fx.GraphModule)
    assert not isinstance(model.backbone, torch.fx.GraphModule)  # the input is untouched
    randomize_adapters(adapted.backbone, std=0.05)  # (a random detector's gradients are tiny: as if trained longer)
    # a few training steps, as a user trains: the detector's own losses, only the adapters learn
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([3])}]
    for name, p in adapted.named_parameters():
        p.requires_grad_("repfold_adapters" in name)
    trained = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.5)
    adapted.train()
    for m in adapted.modules():  # the backbone's statistics stay the pretrained ones (torchvision freezes them)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    for _ in range(3):
        loss = sum(adapted(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapted.eval()
    with torch.no_grad():
        want = adapted(images)
        assert rel_err(want[0]["boxes"], base[0]["boxes"]) > 1e-3
    out, report = repfold.fold(adapted, return_report=True)
    assert type(out) is type(model) and report.parts == ["backbone"] and not report.kept
    assert sum(p.numel() for p in out.parameters()) <= base_params  # (its BatchNorms folded too)
    with torch.no_grad():
        got = out(images)
        x = adapted.transform(images)[0].tensors
        features, folded_features = adapted.backbone(x), out.backbone(x)
    assert max(rel_err(folded_features[k], features[k]) for k in features) < 1e-5  # what the fold changed
    assert rel_err(got[0]["scores"], want[0]["scores"]) < 1e-5
    # the boxes: the same ones, where scores a float32 rounding apart may come out in another order
    # (random weights score every class ~1/91): each box has its twin
    nearest = torch.cdist(got[0]["boxes"], want[0]["boxes"]).min(dim=1).values
    assert got[0]["boxes"].shape == want[0]["boxes"].shape and float(nearest.max()) < 1.0  # (pixels, of 128)
    # the trained adapters alone, saved and loaded into a fresh detector: the same adapted backbone
    repfold.save_adapters(adapted, tmp_path / "adapters.safetensors")
    loaded = repfold.load_adapters(model, tmp_path / "adapters.safetensors")
    assert type(loaded) is type(model) and isinstance(loaded.backbone, torch.fx.GraphModule)
    with torch.no_grad():
        again = loaded.backbone(x)
    assert max(rel_err(again[k], features[k]) for k in features) < 1e-6


def test_the_whole_detectors_onnx_file_folds_with_the_cli(tmp_path):
    """The detector with adapters in its backbone, exported whole by the TorchScript exporter (which keeps
    its post-processing), folded by the command line: onnxruntime's detections are the eager model's."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from repfold.cli import main

    model = _detector()
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    base_params = sum(p.numel() for p in model.parameters())
    convs = ["backbone." + n for n, m in model.backbone.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1][:3]
    adapted = repfold.insert(model, before=convs, example_inputs=(images,), bias=False)
    randomize_adapters(adapted.backbone, std=0.05)
    adapted.eval()
    with torch.no_grad():
        want = adapted(images)[0]
        assert rel_err(want["boxes"], model(images)[0]["boxes"]) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the exporter's tracer warnings on the post-processing)
        torch.onnx.export(adapted, (images,), str(tmp_path / "detector.onnx"), dynamo=False, opset_version=17)
    assert main([str(tmp_path / "detector.onnx"), "-o", str(tmp_path / "folded.onnx"), "--check", "--report",
                 str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["regions"]) == 3 and all(r["folded"] for r in report["regions"])
    assert report["params_after"] <= base_params
    session = ort.InferenceSession(str(tmp_path / "folded.onnx"), providers=["CPUExecutionProvider"])
    boxes, _, scores = session.run(None, {session.get_inputs()[0].name: images[0].numpy()})
    assert boxes.shape == tuple(want["boxes"].shape)
    assert rel_err(np.sort(scores), np.sort(want["scores"].numpy())) < 1e-5
    nearest = torch.cdist(torch.from_numpy(boxes), want["boxes"]).min(dim=1).values
    assert float(nearest.max()) < 1.0  # each box has its twin (pixels, of 128)


def test_a_scope_in_no_part_that_traces_is_refused_with_the_reason():
    model = _detector()
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    with pytest.raises(repfold.TraceError, match="no part of FasterRCNN holding before 'roi_heads'"):
        repfold.insert(model, before=["roi_heads"], example_inputs=(images,))
