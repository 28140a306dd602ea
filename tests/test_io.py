"""Field-at-a-time ONNX reading and writing: the same bytes as onnx.save, the same model as onnx.load."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repfold.frontends import onnx_io as _io


def rich_model() -> onnx.ModelProto:
    """A model using most fields: metadata, two opsets, a function, value_info, a subgraph, big and small tensors."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((40, 30)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(30).astype(np.float32), "b")
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm", doc_string="the layer"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
        helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other),
        helper.make_node("Twice", ["z"], ["out"], domain="my.fns"),
    ]
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    graph = helper.make_graph(
        nodes, "rich", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 30])], [w, b, zero],
        doc_string="graph doc", value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 30])],
    )
    twice = helper.make_function("my.fns", "Twice", ["a"], ["r"], [helper.make_node("Add", ["a", "a"], ["r"])],
                                 [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.fns", 1)],
                              functions=[twice], producer_name="tests", doc_string="model doc")
    helper.set_model_props(model, {"author": "repfold", "note": "ünïcode"})
    model.model_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_length(model: onnx.ModelProto) -> int:
    return len(model.graph.SerializeToString())


@pytest.mark.parametrize("reserved", ["default", "exact"])
def test_written_bytes_are_onnx_saves_bytes(tmp_path, monkeypatch, reserved):
    model = rich_model()
    if reserved == "exact":  # the length prefix fills the reserved bytes: nothing moves (models over 256 MB)
        monkeypatch.setattr(_io, "_RESERVED", len(_io._encode(graph_length(model))))
    path = tmp_path / "m.onnx"
    _io.write_model(model, path)
    assert path.read_bytes() == model.SerializeToString()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_read_model_parses_what_onnx_load_parses(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(_io, "CHUNK", chunk)  # fields split across chunks, and fields larger than one
    path = tmp_path / "m.onnx"
    onnx.save(rich_model(), path)
    seen = []
    got = _io.read_model(path, lambda done, total: seen.append((done, total)))
    assert got == onnx.load(path, load_external_data=False)
    assert seen and seen[-1][0] <= seen[-1][1] == path.stat().st_size


def test_unknown_fields_are_written_back(tmp_path):
    model = onnx.ModelProto()
    model.ParseFromString(rich_model().SerializeToString() + bytes([0xF8, 0x07, 0x01]))  # field 127 = 1
    path = tmp_path / "m.onnx"
    _io.write_model(model, path)
    assert path.read_bytes() == model.SerializeToString()


def test_a_file_cut_inside_the_graph_is_refused(tmp_path):
    data = rich_model().SerializeToString()
    start = data.index(rich_model().graph.SerializeToString())
    path = tmp_path / "cut.onnx"
    for cut in range(start, start + graph_length(rich_model()), 37):
        path.write_bytes(data[:cut])
        with pytest.raises(_io.WireError, match="truncated"):
            _io.read_model(path)


def test_a_file_that_is_not_protobuf_is_refused(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(_io.WireError, match="not an ONNX protobuf"):
        _io.read_model(path)


def test_external_data_left_on_disk_round_trips(tmp_path, monkeypatch):
    """Initializers stay on disk and are copied file to file; tensors in node attributes and subgraphs are
    read in; the model written loads to the same values as the input."""
    monkeypatch.setattr(_io, "_LARGE", 1)  # every float initializer counts as large
    model = rich_model()
    rng = np.random.default_rng(1)
    table = numpy_helper.from_array(rng.standard_normal((20, 30)).astype(np.float32), "table")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], value=table))
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="m.data", size_threshold=0,
              convert_attribute=True)
    expected = onnx.load(str(src))

    loaded = _io.read_model(src)
    files = _io.anchor_external_data(loaded, src.parent)
    assert files == {str(src.parent / "m.data")}
    assert {t.name for t in loaded.graph.initializer if _io.left_out(t)} == {"w", "b", "zero"}
    with pytest.raises(ValueError, match="loaded"):
        _io.write_model(loaded, tmp_path / "never.onnx")  # a file may never point at the input's data
    out = tmp_path / "out.onnx"
    _io.write_with_external_data(loaded, out, tmp_path / "out.data")
    got = onnx.load(str(out))
    for a, b in zip(_io._nested_tensors(got.graph), _io._nested_tensors(expected.graph)):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    for a, b in zip(got.graph.initializer, expected.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert {kv.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
            for kv in t.external_data if kv.key == "location"} == {"out.data"}
