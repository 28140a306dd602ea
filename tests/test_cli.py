"""`python -m repfold` as a deployment pipeline uses it: every option, every bad input, nothing lost."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import image, make_vit, randomize_adapters, rel_err
from onnx import helper

import repfold

ort = pytest.importorskip("onnxruntime")


def export(model, x, dynamic_axes=None, opset=17) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buf.getvalue())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "repfold", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")


def run(model, x: np.ndarray):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def vit():
    """(adapted gm, base model, input): a small timm ViT with four random adapters."""
    model, x = make_vit(), image()
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    with torch.no_grad():
        assert rel_err(gm.eval()(x), model(x)) > 1e-2  # the adapters matter: the folds below are tested
    return gm.eval(), model, x


@pytest.fixture(scope="module")
def dynamic(vit, tmp_path_factory):
    """The adapted ViT exported with a dynamic batch, saved to a file; and the base export."""
    gm, model, x = vit
    path = tmp_path_factory.mktemp("dyn") / "adapted.onnx"
    onnx.save(export(gm, x, {"image": {0: "batch"}}), str(path))
    return path, repfold.fold(export(model, x, {"image": {0: "batch"}}))  # the base as a fold leaves it (GELU's 0.5)


def test_dynamic_batch_stays_dynamic_and_is_checked_at_two_sizes(dynamic, tmp_path):
    src, base = dynamic
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli(src, "-o", out, "--check", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "check on 1x3x32x32, 2x3x32x32" in r.stdout and "(ok)" in r.stdout
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert ops(folded) == ops(base)
    report = json.loads(rep.read_text())
    layered = [r for r in report["regions"] if not r["scale"]]
    assert len(layered) == 4 and all(r["folded"] for r in report["regions"])
    assert report["ops_before"] != report["ops_after"] and report["params_after"] < report["params_before"]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert rel_err(run(folded, x), run(onnx.load(str(src)), x)) < 1e-5


def test_dynamic_spatial_dims_need_an_input_shape(vit, tmp_path):
    gm, _, x = vit
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(export(gm, x, {"image": {0: "batch", 2: "h", 3: "w"}}), str(src))
    r = cli(src, "-o", out, "--check")
    assert r.returncode == 2 and "--input-shape image=" in r.stderr and not out.exists()
    r = cli(src, "-o", out, "--check", "--input-shape", "image=2x3x32x32")
    assert r.returncode == 0, r.stderr
    assert "check on 2x3x32x32" in r.stdout
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "h", "w"]


def test_metadata_names_and_doc_strings_are_kept(dynamic, tmp_path):
    src, _ = dynamic
    model = onnx.load(str(src))
    model.doc_string, model.graph.doc_string, model.graph.name = "model doc", "graph doc", "my_graph"
    model.producer_name, model.producer_version, model.domain, model.model_version = "me", "9.9", "org.x", 7
    helper.set_model_props(model, {"task": "birds", "commit": "abc"})
    tagged = tmp_path / "tagged.onnx"
    onnx.save(model, str(tagged))
    out = tmp_path / "out.onnx"
    assert cli(tagged, "-o", out).returncode == 0
    got = onnx.load(str(out))
    for field in ("doc_string", "producer_name", "producer_version", "domain", "model_version", "ir_version"):
        assert getattr(got, field) == getattr(model, field), field
    assert (got.graph.doc_string, got.graph.name) == ("graph doc", "my_graph")
    assert {p.key: p.value for p in got.metadata_props} == {"task": "birds", "commit": "abc"}
    assert list(got.opset_import) == list(model.opset_import)
    assert got.graph.input == model.graph.input and got.graph.output == model.graph.output
    names = [t.name for t in got.graph.initializer]
    assert len(names) == len(set(names))


def test_external_data_in_and_out(dynamic, tmp_path):
    src, base = dynamic
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(onnx.load(str(src)), str(folder / "in.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    model = onnx.load(str(src))
    data_before = hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest()
    out = folder / "out.onnx"
    r = cli(folder / "in.onnx", "-o", out, "--check")
    assert r.returncode == 0, r.stderr
    assert (folder / "out.onnx.data").exists() and "weights in out.onnx.data" in r.stdout
    assert hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest() == data_before
    folded = onnx.load(str(out))
    assert ops(folded) == ops(base)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert rel_err(run(folded, x), run(model, x)) < 1e-5
    assert sorted(p.name for p in folder.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data", "weights.bin"]


def test_external_data_never_overwrites_the_inputs_data(dynamic, tmp_path):
    src, _ = dynamic
    onnx.save(onnx.load(str(src)), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    data = (tmp_path / "m.onnx.data").read_bytes()
    r = cli(tmp_path / "m.onnx", "-o", tmp_path / "m.onnx", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx.data").read_bytes() == data  # weights went to m.onnx.1.data
    assert (tmp_path / "m.onnx.1.data").exists()
    folded = onnx.load(str(tmp_path / "m.onnx"))
    assert len(folded.graph.node) < len(onnx.load(str(src)).graph.node)


def test_float16_model_folds_in_float64_and_casts_once(vit, tmp_path):
    gm, model, x = vit
    import copy

    half = copy.deepcopy(gm).half()
    src, out = tmp_path / "half.onnx", tmp_path / "out.onnx"
    onnx.save(export(half, x.half()), str(src))
    r = cli(src, "-o", out, "--check")
    assert r.returncode == 0, r.stderr
    assert "cast to float16: weights moved by up to" in r.stdout
    folded = onnx.load(str(out))
    assert {t.data_type for t in folded.graph.initializer if t.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
    assert ops(folded) == ops(repfold.fold(export(copy.deepcopy(model).half(), x.half())))


def test_dry_run_and_quiet(dynamic, tmp_path):
    src, _ = dynamic
    r = cli(src, "--dry-run")
    assert r.returncode == 0 and "4 adapter regions, 4 folded" in r.stdout and "no model written" in r.stdout
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "out.onnx"
    r = cli(src, "-o", out, "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "" and out.exists()


def test_model_without_adapters_succeeds_and_says_so(vit, tmp_path):
    _, model, x = vit
    src, out = tmp_path / "base.onnx", tmp_path / "out.onnx"
    onnx.save(export(model, x), str(src))
    r = cli(src, "-o", out, "--check", "--no-scales")
    assert r.returncode == 0 and "nothing to fold" in r.stdout
    assert ops(onnx.load(str(out))) == ops(onnx.load(str(src)))


def test_model_without_adapters_keeps_the_gelu_the_runtime_fuses(vit, tmp_path):
    """The TorchScript exporter spells GELU out with a ``× 0.5``, a constant scale before a Linear; it stays,
    as onnxruntime fuses the five ops into one GELU kernel (folding the ``½`` left four slower ops)."""
    _, model, x = vit
    src, out = tmp_path / "base.onnx", tmp_path / "out.onnx"
    onnx.save(export(model, x), str(src))
    r = cli(src, "-o", out, "--check")
    assert r.returncode == 0 and "0 adapter regions" in r.stdout and "scales and shifts only folded" not in r.stdout
    assert ops(onnx.load(str(out))) == ops(onnx.load(str(src)))


def test_overwrite_replaces_the_input_when_asked(dynamic, tmp_path):
    src, base = dynamic
    own = tmp_path / "m.onnx"
    own.write_bytes(src.read_bytes())
    assert cli(own, "-o", own, "--overwrite").returncode == 0
    assert ops(onnx.load(str(own))) == ops(base)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


def _custom_between(model: onnx.ModelProto, op: str, domain: str = "") -> onnx.ModelProto:
    """Route the first adapter's output through ``op`` (custom-domain identity or a Q/DQ pair)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    add = next(n for n in g.node if n.name.endswith("blocks_0_attn/Transpose_1"))  # the adapter's last op
    old, new = add.output[0], add.output[0] + "_routed"
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
    if op == "QDQ":
        g.initializer.extend([helper.make_tensor("s", 1, [], [0.05]), helper.make_tensor("z", 3, [], [0])])
        nodes = [helper.make_node("QuantizeLinear", [old, "s", "z"], [old + "_q"]),
                 helper.make_node("DequantizeLinear", [old + "_q", "s", "z"], [new])]
    else:
        nodes = [helper.make_node(op, [old], [new], domain=domain)]
        model.opset_import.append(helper.make_opsetid(domain, 1))
    at = list(g.node).index(add) + 1
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    return model


def test_qdq_and_custom_domain_regions_are_skipped_with_a_reason(vit):
    gm, _, x = vit
    adapted = export(gm, x)
    qdq = _custom_between(adapted, "QDQ")
    folded, report = repfold.fold(qdq, return_report=True)
    assert sum(r.folded for r in report.layered) == 3 and len(report.kept) == 1
    assert "QuantizeLinear" in report.kept[0].reason
    assert rel_err(run(folded, x.numpy()), run(qdq, x.numpy())) < 1e-5
    custom = _custom_between(adapted, "MyIdentity", "com.example")
    folded, report = repfold.fold(custom, return_report=True)
    assert sum(r.folded for r in report.layered) == 3 and "MyIdentity" in report.kept[0].reason
    assert any(n.domain == "com.example" for n in folded.graph.node)


def _truncated(d, valid):
    data = valid.read_bytes()
    (d / "cut.onnx").write_bytes(data[: len(data) // 3])
    return d / "cut.onnx"


def _old_opset(d, valid):
    m = onnx.load(str(valid))
    next(o for o in m.opset_import if o.domain == "").version = 11
    onnx.save(m, str(d / "old.onnx"))
    return d / "old.onnx"


def _dangling(d, valid):
    m = onnx.load(str(valid))
    m.graph.node[3].input[0] = "nowhere"
    onnx.save(m, str(d / "dangling.onnx"))
    return d / "dangling.onnx"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, v: d / "missing.onnx", "no such file"),
        (lambda d, v: d, "is a directory"),
        (lambda d, v: (d / "junk.onnx").write_bytes(b"\x08\x07not a model" * 10) and d / "junk.onnx", "not"),
        (_truncated, "not"),
        (_old_opset, "opset 11 is not supported"),
        (_dangling, "nowhere"),
    ],
    ids=["missing", "directory", "garbage", "truncated", "opset-11", "dangling-input"],
)
def test_bad_input_is_one_line_exit_2_and_no_output(dynamic, tmp_path, make, message):
    src = make(tmp_path, dynamic[0])
    out = tmp_path / "out.onnx"
    r = cli(src, "-o", out)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "{tmp}/no/such/folder/out.onnx"], "cannot write in"),
        (["-o", "{tmp}"], "is a directory"),
        ([], "-o/--output is required"),
        (["-o", "{tmp}/out.onnx", "--check", "--input-shape", "image"], "expected NAME=1x3x224x224"),
        (["-o", "{tmp}/out.onnx", "--check", "--input-shape", "pixels=1x3x32x32"], "names no graph input"),
    ],
    ids=["no-folder", "output-is-dir", "no-output", "bad-shape", "unknown-input"],
)
def test_bad_usage_is_one_line_exit_2(dynamic, tmp_path, args, message):
    r = cli(dynamic[0], *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture
def on_disk(dynamic, tmp_path, monkeypatch):
    """The adapted ViT with external data; every float weight counts as large, so it stays on disk."""
    from repfold.frontends import onnx_io as _io
    monkeypatch.setattr(_io, "_LARGE", 1)
    src, base = dynamic
    onnx.save(onnx.load(str(src)), str(tmp_path / "in.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    return tmp_path / "in.onnx", base


def test_only_the_layers_a_fold_replaces_are_read_and_never_all_held(on_disk, tmp_path, monkeypatch):
    """Weights left on disk are read for the layers a fold replaces (planning, then writing) and for the
    adapters; a layer of the model's own that only reads its input (``proj``, ``fc2``) is not read at
    all, and its weight is not converted. The new weights are made as they are written."""
    from repfold.cli import main
    from repfold.frontends import onnx_context
    from repfold.frontends import onnx_io as _io

    src, _ = on_disk
    reads, real = Counter(), _io.read_external
    monkeypatch.setattr(onnx_context, "read_external", lambda t: reads.update([t.name]) or real(t))
    made, later = [], _io.Later.__call__
    monkeypatch.setattr(_io.Later, "__call__", lambda self: made.append(self.shape) or later(self))
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "-q"]) == 0
    folded = {t.name for t in onnx.load(str(tmp_path / "out.onnx"), load_external_data=False).graph.initializer}
    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")} & {
        t.name for t in graph.initializer}
    replaced = weights - folded
    assert len(made) == 4  # qkv and fc1 of both blocks, made as they were written
    kept_read = {n for n in reads if n in weights - replaced}
    assert not kept_read, kept_read  # (other tensors are read: biases, scales, a position embedding)
    assert max(reads[n] for n in replaced) <= 2


def test_the_command_line_never_imports_torch(dynamic, tmp_path):
    """Folding a file needs no torch (seconds and hundreds of megabytes to import)."""
    src, _ = dynamic
    code = ("import sys; from repfold.cli import main; "
            f"code = main([{str(src)!r}, '-o', {str(tmp_path / 'out.onnx')!r}, '-q', '--check']); "
            "print(code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.stdout.split() == ["0", "False"], r.stderr


def test_weights_left_on_disk_fold_to_the_same_values(on_disk, tmp_path):
    """The command line reads only the layers it changes and copies the rest file to file (``_io``):
    the same tensors as folding the fully loaded model, the large ones page-aligned in the new file."""
    from repfold.cli import main

    src, base = on_disk
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "-q"]) == 0
    expected = repfold.fold(str(src))  # the Python API loads every weight
    folded = onnx.load(str(out))
    assert ops(folded) == ops(base)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert got.keys() == {t.name for t in expected.graph.initializer}
    for t in expected.graph.initializer:
        assert np.array_equal(got[t.name], onnx.numpy_helper.to_array(t)), t.name
    offsets = [int(kv.value) for t in onnx.load(str(out), load_external_data=False).graph.initializer
               for kv in t.external_data if kv.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    assert main([str(src), "-o", str(tmp_path / "inline.onnx"), "-q", "--external-data", "never"]) == 0
    inline = onnx.load(str(tmp_path / "inline.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in inline.graph.initializer)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(run(inline, x), run(folded, x))


def test_without_a_kernel_copy_the_bytes_are_read_and_written(on_disk, tmp_path, monkeypatch):
    from repfold.cli import main

    src, _ = on_disk
    assert main([str(src), "-o", str(tmp_path / "a.onnx"), "-q"]) == 0

    def unsupported(*args):
        raise OSError(38, "copy_file_range is not supported here")

    monkeypatch.setattr("os.copy_file_range", unsupported)
    assert main([str(src), "-o", str(tmp_path / "b.onnx"), "-q"]) == 0
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()


@pytest.mark.parametrize("damage, message", [
    ("missing", "weights.bin is missing"),
    ("cut", "lies past the end of"),
    ("escape", "outside the model's folder"),
    ("length", "does not match its shape"),
])
def test_bad_external_data_is_one_line_and_nothing_written(on_disk, tmp_path, damage, message):
    src, _ = on_disk
    model = onnx.load(str(src), load_external_data=False)
    t = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    if damage == "cut":
        data = tmp_path / "weights.bin"
        data.write_bytes(data.read_bytes()[:-100])
    if damage == "missing":
        (tmp_path / "weights.bin").unlink()
    for kv in t.external_data:
        if damage == "escape" and kv.key == "location":
            kv.value = str(tmp_path / "weights.bin")  # absolute: the file is there, but not by a relative path
        if damage == "length" and kv.key == "length":
            kv.value = str(int(kv.value) - 4)
    onnx.save(model, str(src))
    r = cli(src, "-o", tmp_path / "out.onnx")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.data").exists()


def test_external_data_always_moves_an_inline_models_weights_out(dynamic, tmp_path):
    """The kept weights move from the proto to the data file, the new ones go there from their arrays."""
    src, base = dynamic
    out = tmp_path / "out.onnx"
    r = cli(src, "-o", out, "--external-data", "always", "--check")
    assert r.returncode == 0 and "(ok)" in r.stdout, r.stderr
    on_disk = onnx.load(str(out), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer) > 10
    assert out.stat().st_size < 100_000 < (tmp_path / "out.onnx.data").stat().st_size
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in repfold.fold(str(src)).graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    assert ops(onnx.load(str(out))) == ops(base)
