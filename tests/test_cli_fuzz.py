"""The command line on damaged input: random bytes, truncated and bit-flipped models, dangling names.

Whatever the bytes, `repfold IN -o OUT` either folds (exit 0, a loadable
model written that computes what the input does, where onnxruntime runs the
input at all) or refuses (exit 2, one line on stderr naming the input, no
traceback, no output file, no temporary folder left behind).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from repfold.cli import main


def adapted_mlp() -> bytes:
    """x -> Linear -> ReLU -> [adapter: x + up(down(x))] -> Linear: one region that folds."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["p"], name="fc1"),
        helper.make_node("Relu", ["p"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "down"], ["d"], name="down"),
        helper.make_node("MatMul", ["d", "up"], ["u"], name="up"),
        helper.make_node("Add", ["h", "u"], ["a"], name="residual"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [weight("w1", 16, 16), weight("down", 16, 2), weight("up", 2, 16), weight("w2", 16, 8)],
    )
    # IR version 10: one onnxruntime runs, so the fuzz test can compare a folded model's values with the input's
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


GOOD = adapted_mlp()


def dangling(data: bytes, which: int) -> bytes:
    model = onnx.load_from_string(data)
    node = model.graph.node[which % len(model.graph.node)]
    node.input[0] = "nothing_defines_this"
    return model.SerializeToString()


def flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


damaged = st.one_of(
    st.binary(max_size=2048),
    st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),
    st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 7)), min_size=1, max_size=4)
    .map(lambda f: flipped(GOOD, f)),
    st.integers(0, 5).map(lambda k: dangling(GOOD, k)),
)


def outputs(model: onnx.ModelProto | bytes, feeds: dict | None = None) -> tuple[dict, list] | None:
    """(the feeds, the outputs) of ``model`` in onnxruntime on signed random inputs (``feeds`` when given,
    every dynamic dimension 2 otherwise), or None when onnxruntime cannot load or run it."""
    ort = pytest.importorskip("onnxruntime")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        if feeds is None:
            rng = np.random.default_rng(3)
            feeds = {}
            for i in s.get_inputs():
                if i.type != "tensor(float)":
                    return None
                shape = [d if isinstance(d, int) else 2 for d in i.shape]
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds, s.run(None, feeds)
    except Exception:  # noqa: BLE001 (a fuzzed input onnxruntime cannot run has nothing to compare)
        return None


def assert_same_outputs(data: bytes, written: onnx.ModelProto) -> None:
    """The folded model computes what the input does (float32: 1e-5 of the output's scale), where the input runs."""
    ran = outputs(data)
    if ran is None:
        return
    feeds, want = ran
    got = outputs(written, feeds)
    assert got is not None, "the input runs in onnxruntime, the folded model does not"
    assert len(got[1]) == len(want)
    for g, w in zip(got[1], want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if not np.isfinite(w).all() or np.abs(w).max() > 1e30:
            continue  # a flipped exponent bit overflows float32: the two orders of rounding overflow differently
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), (g, w)


def run_cli(data: bytes) -> tuple[int, str, list[str], onnx.ModelProto | None]:
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.onnx", Path(d) / "out.onnx"
        src.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(src), "-o", str(out)])
        left = sorted(p.name for p in Path(d).iterdir())
        written = onnx.load(str(out)) if out.exists() else None
    return rc, err.getvalue(), left, written


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(damaged)
def test_damaged_input_is_folded_or_refused_cleanly(data):
    rc, err, left, written = run_cli(data)
    if rc == 0:
        assert left == ["in.onnx", "out.onnx"] and written is not None
        assert len(written.graph.output) == 1
        assert_same_outputs(data, written)
    else:
        assert rc == 2, err
        assert left == ["in.onnx"], "a refused input left files behind"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("repfold: error: "), err
        assert "Traceback" not in err


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x08", GOOD[:-1], dangling(GOOD, 2)], ids=["empty", "zero", "tag", "cut", "dangling"])
def test_known_damaged_inputs(data):
    rc, err, left, _ = run_cli(data)
    assert rc == 2 and left == ["in.onnx"] and err.startswith("repfold: error: "), err


def test_the_undamaged_model_folds():
    from onnx.reference import ReferenceEvaluator

    model = onnx.load_from_string(GOOD)
    plain = onnx.load_from_string(GOOD)  # the same model without the adapter: fc2 reads the ReLU directly
    plain.graph.node[-1].input[0] = "h"
    x = np.random.default_rng(1).standard_normal((2, 4, 16)).astype(np.float32)
    y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert np.abs(y - ReferenceEvaluator(plain).run(None, {"x": x})[0]).max() > 1e-2 * np.abs(y).max()
    rc, err, _left, written = run_cli(GOOD)
    assert rc == 0, err
    assert [n.op_type for n in written.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert np.abs(ReferenceEvaluator(written).run(None, {"x": x})[0] - y).max() <= 1e-5 * np.abs(y).max()
    assert outputs(GOOD) is not None  # the fuzz test's comparison runs on the undamaged model
    assert_same_outputs(GOOD, written)

