"""ONNX path: export an adapted timm ViT with both torch exporters, fold the graph, compare in onnxruntime."""

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import export, image, make_vit, randomize_adapters, rel_err

import repfold
from repfold.frontends.onnx import n_params

ort = pytest.importorskip("onnxruntime")


def run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {model.graph.input[0].name: x.numpy()})[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture(
    scope="module",
    params=[("vit_tiny_patch16_224", False), ("vit_tiny_patch16_224", True), ("deit_tiny_patch16_224", False),
            ("deit_tiny_patch16_224", True)],
    ids=["vit-torchscript", "vit-dynamo", "deit-torchscript", "deit-dynamo"],
)
def exported(request):
    """(adapted ONNX, adapter-free ONNX as a fold leaves it, input) for one model and one exporter.

    (A fold of the adapter-free model folds its own constant scales: the TorchScript exporter's GELU ``× 0.5``.)
    """
    name, dynamo = request.param
    model, x = make_vit(name), image()
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    return export(gm.eval(), x, dynamo), repfold.fold(export(model, x, dynamo)), x


def test_onnx_fold_matches_and_costs_the_base(exported):
    adapted, base, x = exported
    before = onnx.ModelProto()
    before.CopyFrom(adapted)
    folded, report = repfold.fold(adapted, return_report=True)

    assert adapted == before  # the input proto is untouched
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.layered) == 4 and len(report.kept) == 0
    assert ops(folded) == ops(base)
    assert report.params_after == n_params(base)
    y = run(adapted, x)
    assert rel_err(y, run(base, x)) > 1e-2
    assert rel_err(run(folded, x), y) <= 1e-5
    assert [o.name for o in folded.graph.output] == [o.name for o in adapted.graph.output]
    assert folded.opset_import == adapted.opset_import


def test_onnx_fold_twice_changes_nothing(exported):
    once = repfold.fold(exported[0])
    twice, report = repfold.fold(once, return_report=True)
    assert report.regions == [] and ops(twice) == ops(once)


def test_fold_accepts_a_path(exported, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(exported[0], str(path))
    folded = repfold.fold(path)
    assert isinstance(folded, onnx.ModelProto) and ops(folded) == ops(exported[1])


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "repfold", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          check=False)


def test_cli_folds_checks_and_reports(exported, tmp_path):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(exported[0], str(src))
    r = cli(src, "-o", out, "--check", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "largest difference" in r.stdout and "4 adapter regions, 4 folded" in r.stdout
    assert ops(onnx.load(str(out))) == ops(exported[1])
    assert '"folded": true' in rep.read_text()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "junk.onnx").write_bytes(b"\x00not a model" * 10) and d / "junk.onnx", "not"),
    ],
    ids=["missing", "directory", "garbage"],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, setup, message):
    src, out = setup(tmp_path), tmp_path / "out.onnx"
    r = cli(src, "-o", out)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_to_overwrite_its_input(exported, tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(exported[0], str(src))
    data = src.read_bytes()
    r = cli(src, "-o", src)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert src.read_bytes() == data


def test_cli_failed_check_writes_nothing(exported, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(exported[0], str(src))
    r = cli(src, "-o", out, "--check", "--rtol", "0", "--atol", "0")
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]  # no output, no temporary left behind


def test_nodes_and_initializers_unused_in_the_input_are_kept(exported):
    """The fold removes what it made unread, nothing the user's file already had."""
    model = onnx.ModelProto()
    model.CopyFrom(exported[0])
    first = model.graph.input[0].name
    model.graph.node.append(onnx.helper.make_node("Relu", [first], ["kept_but_unread"], name="spare_relu"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "spare_weights"))
    folded, report = repfold.fold(model, return_report=True)
    assert len(report.layered) == 4 and ops(folded) == ops(exported[1]) + Counter({"Relu": 1})
    assert any(n.name == "spare_relu" for n in folded.graph.node)
    assert any(t.name == "spare_weights" for t in folded.graph.initializer)


def _regrouped(then: str) -> onnx.ModelProto:
    """``x (2, 5, 4, 6)`` reshaped in one node to OFT's blocks ``(2, 5, 3, 8)``, rotated per block by an
    Einsum, merged back to ``(2, 5, 24)``, then a MatMul the rotation folds into, or (``then="relu"``) a Relu
    and a per-channel scale before it: the scale folds, the rotation has no layer to fold into."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"split": np.array([0, 0, 3, 8]), "merge": np.array([0, 0, 24]),
              "R": rng.normal(size=(3, 8, 8)).astype(np.float32), "W": rng.normal(size=(24, 7)).astype(np.float32),
              "s": rng.uniform(0.5, 2, size=24).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "split"], ["blocks"], "regroup"),
             helper.make_node("Einsum", ["blocks", "R"], ["turned"], "rotate", equation="...rk,rkc->...rc"),
             helper.make_node("Reshape", ["turned", "merge"], ["merged"], "back")]
    last = "merged"
    if then == "relu":
        nodes += [helper.make_node("Relu", ["merged"], ["relu"], "relu"),
                  helper.make_node("Mul", ["relu", "s"], ["scaled"], "scale")]
        last = "scaled"
    nodes.append(helper.make_node("MatMul", [last, "W"], ["y"], "layer"))
    graph = helper.make_graph(nodes, "regrouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 7])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_reshape_that_regroups_heads_into_blocks_is_merged_first_and_put_back_where_kept():
    """The dynamo exporter writes an attention's head merge and OFT's block split as one Reshape
    ``(B, N, h, d) -> (B, N, r, k)``: the fold reads it as a merge to ``(B, N, h·d)`` then the split, so the
    rotation folds into the layer after it; where it does not, the two Reshapes are one again."""
    x = torch.randn(2, 5, 4, 6)
    model = _regrouped("matmul")
    W = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))
    unrotated = torch.from_numpy(x.reshape(2, 5, 24).numpy() @ W)
    assert rel_err(torch.from_numpy(run(model, x)), unrotated) > 1e-3  # the random rotation matters
    folded, report = repfold.fold(model, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    assert [r.folded for r in report.regions] == [True], str(report)
    assert ops(folded) == Counter({"Reshape": 1, "MatMul": 1})  # the head merge, the layer
    assert rel_err(torch.from_numpy(run(folded, x)), torch.from_numpy(run(model, x))) < 1e-5

    model = _regrouped("relu")
    folded, report = repfold.fold(model, return_report=True)
    # the scale folds; the rotation, an adapter's layer nothing can take before the Relu, is reported kept
    assert sorted((r.scale, r.folded) for r in report.regions) == [(False, False), (True, True)], str(report)
    assert ops(folded) == Counter({"Reshape": 2, "Einsum": 1, "Relu": 1, "MatMul": 1})
    assert rel_err(torch.from_numpy(run(folded, x)), torch.from_numpy(run(model, x))) < 1e-5
    model.graph.node.remove(model.graph.node[4])  # no scale: nothing folds, the model comes back as it was
    model.graph.node[4].input[0] = "relu"
    assert repfold.fold(model).SerializeToString() == model.SerializeToString()


class _PaddedPair(torch.nn.Module):
    """A reflect-padded conv whose output is also the model's output, an adapter, a circular-padded conv:
    the TorchScript exporter names the sizes of the first output (``Mul72_dim_2``) though it knows them,
    and spells the circular pad as Slices and Concats of the adapter's output."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 4, 2, padding=1, padding_mode="reflect")
        self.b = torch.nn.Conv2d(4, 4, 2, padding=1, padding_mode="circular")
        self.down, self.up = torch.nn.Conv2d(4, 1, 1), torch.nn.Conv2d(1, 4, 1)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        return self.b(h + self.up(self.down(h))), h


def test_an_output_whose_sizes_the_exporter_named_is_folded_with_its_real_sizes(monkeypatch):
    """The fold once read such an output's named sizes as dynamic (counted as 1): the circular pad's Slices
    of a (1, 4, 1, 1) value looked like the whole value, and the folded model padded by whole copies
    ((2, 4, 14, 14) for (2, 4, 6, 6)). Inference knows the sizes: they win. Where they did not, the
    engine sees that the sizes its algebra follows are not the graph's, and folds nothing it cannot place."""
    torch.manual_seed(0)
    model, x = _PaddedPair().eval(), torch.randn(2, 4, 4, 4)
    proto = export(model, x, dynamo=False)
    assert any(d.dim_param for d in proto.graph.output[1].type.tensor_type.shape.dim)  # the exporter named them
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        model.up.weight.zero_(), model.up.bias.zero_()
        assert rel_err(torch.from_numpy(want[0]), model(x)[0]) > 1e-3  # the adapter matters
    folded, report = repfold.fold(proto, return_report=True)
    assert [r.folded for r in report.regions if not r.scale] == [True], str(report)
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {proto.graph.input[0].name: x.numpy()})
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(rel_err(torch.from_numpy(g), torch.from_numpy(w)) < 1e-5 for g, w in zip(got, want))

    # the declared sizes alone (as before): nothing folds that the engine cannot place
    from repfold.frontends.onnx import OnnxContext

    monkeypatch.setattr(OnnxContext, "dims", lambda self, var: None if var.shape is None and var.name not in
                        self.shapes else tuple(var.shape if var.shape is not None else self.shapes[var.name]))
    folded = repfold.fold(proto)
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {proto.graph.input[0].name: x.numpy()})
    assert all(g.shape == w.shape and rel_err(torch.from_numpy(g), torch.from_numpy(w)) < 1e-5
               for g, w in zip(got, want))


class _NormedHeads(torch.nn.Module):
    """LeViT's LinearNorm before an attention's head split: a bias-less Linear, BatchNorm1d over the
    flattened tokens, ``reshape_as`` back, then the split into heads, which the dynamo exporter writes as
    one Reshape ``(B·N, C) -> (B, N, h, d)``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 12, bias=False)
        self.bn = torch.nn.BatchNorm1d(12)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        y = self.lin(x)
        y = self.bn(y.flatten(0, 1)).reshape_as(y)
        return torch.softmax(y.view(x.shape[0], x.shape[1], 3, 4), dim=-1)


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_norm_over_flattened_tokens_before_a_head_split_folds_into_its_linear(dynamo):
    """The BatchNorm folds into the Linear before it on both exporters (LeViT-384-S8's 16 BatchNorms that
    stayed on the dynamo path, over timm's merge): the Reshape that restores the tokens and splits the
    heads at once is read as a merge to ``(B, N, C)`` and then the split."""
    torch.manual_seed(0)
    model = _NormedHeads().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # the norm's random statistics matter (it is the model's own: no adapter here)
        y = model.lin(x)
        assert rel_err(model(x), torch.softmax(y.view(2, 5, 3, 4), dim=-1)) > 1e-2
    proto = export(model, x, dynamo=dynamo)
    folded = repfold.fold(proto)
    onnx.checker.check_model(folded, full_check=True)
    assert ops(folded)["BatchNormalization"] == 0, ops(folded)
    assert ops(folded)["Reshape"] <= ops(proto)["Reshape"], (ops(folded), ops(proto))
    assert rel_err(torch.from_numpy(run(folded, x)), model(x).detach()) < 1e-5


class _PoolingHead(torch.nn.Module):
    """SigLIP's attention pooling, small: an MLP, then nn.MultiheadAttention from a learned probe to its
    output, which splits its packed ``in_proj_weight`` and bias into the query's part and the keys' and
    values'. With ``shared``, another op reads the packed weight too."""

    def __init__(self, shared: bool):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
        self.probe = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.shared = shared

    def forward(self, x):
        h = self.mlp(x)
        y = self.attention(self.probe.expand(x.shape[0], -1, -1), h, h)[0]
        return y * self.attention.in_proj_weight.abs().mean() if self.shared else y


@pytest.mark.parametrize("shared", [False, True], ids=["own-weight", "shared-weight"])
def test_weights_moved_out_of_stored_ones_are_stored_where_that_costs_no_more(shared):
    """Traced by torch.export, nn.MultiheadAttention splits its packed projection at run time (``Split`` of
    ``in_proj_weight``, a ``Transpose`` of each part; ``Split`` of the bias): the TorchScript exporter folds
    that for the eager model, not for the graph ``insert`` returns. The fold stores the parts (bitwise the
    values the runtime moves) and drops the moves; a weight another op reads too stays, with the moves out
    of it (storing them would store its values twice), while its bias, read by nothing else, is stored."""
    torch.manual_seed(0)
    model, x = _PoolingHead(shared).eval(), torch.randn(2, 5, 8)
    gm = repfold.insert(torch.export.export(model, (x,), strict=False), before=["mlp.2"], example_inputs=x)
    randomize_adapters(gm)
    base, adapted = export(model, x, dynamo=False), export(gm.eval(), x, dynamo=False)
    assert ops(base)["Split"] == 0 and ops(adapted)["Split"] == 2  # the exporter folded the base's moves
    y = run(adapted, x)
    assert rel_err(torch.from_numpy(y), torch.from_numpy(run(base, x))) > 1e-2  # the adapter matters
    folded, report = repfold.fold(adapted, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    assert report.regions and all(r.folded for r in report.regions), str(report)
    assert rel_err(torch.from_numpy(run(folded, x)), torch.from_numpy(y)) < 1e-5
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    W, b = (p.detach().numpy() for p in (model.attention.in_proj_weight, model.attention.in_proj_bias))
    assert "attention.in_proj_bias" not in stored
    assert any(v.shape == (8,) and np.array_equal(v, b[:8]) for v in stored.values())  # the query's bias, bitwise
    if shared:
        assert ops(folded)["Split"] == 1 and ops(folded)["Transpose"] == ops(base)["Transpose"] + 1, ops(folded)
        assert "attention.in_proj_weight" in stored
    else:
        more = {op for op, n in ops(folded).items() if n > ops(base)[op] and op != "Constant"}
        assert not more, (ops(folded), ops(base))  # (Constant: the exporters spell shape arithmetic differently)
        assert ops(folded)["Split"] == 0 and "attention.in_proj_weight" not in stored
        assert any(v.shape == (8, 8) and np.array_equal(v, W[:8].T) for v in stored.values())  # W_qᵀ, bitwise
