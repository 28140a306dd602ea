"""``python -m repfold IN.onnx -o OUT.onnx``: fold the adapters of an exported model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input or arguments: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repfold",
        description="Fold linear adapters of an ONNX model into the neighbouring layers.",
    )
    p.add_argument("input", help="the ONNX model with adapters")
    p.add_argument("-o", "--output", required=True, help="where to write the folded model")
    p.add_argument("--check", action="store_true", help="compare both models in onnxruntime; write nothing if they differ")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of --check (default 1e-4 for float32)")
    p.add_argument("--report", metavar="FILE.json", help="write the fold report as JSON")
    p.add_argument("--overwrite", action="store_true", help="allow -o to be the input file")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _load(path: str):
    import onnx

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        raise UsageError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise UsageError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def _random_feed(model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import onnx

    feed = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feed[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def check(original, folded, rtol: float | None = None) -> tuple[bool, float]:
    """Run both models in onnxruntime on the same signed random inputs.

    Returns (ok, largest difference relative to the output's largest magnitude).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("--check needs onnxruntime (or onnxruntime-gpu) installed") from None
    feed = _random_feed(original, np.random.default_rng(0))

    def run(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feed)

    worst = 0.0
    for a, b in zip(run(original), run(folded)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        scale = max(np.abs(a).max(initial=0.0), 1e-30)
        worst = max(worst, float(np.abs(a - b).max(initial=0.0) / scale))
    limit = rtol if rtol is not None else 1e-4
    return worst <= limit, worst


def _write_atomic(model, path: Path) -> None:
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ._onnx import fold_onnx

    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve() and not args.overwrite:
        raise UsageError(f"{args.output}: is the input file; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"{args.output}: is a directory")
    if not out.parent.resolve().is_dir() or not os.access(out.parent.resolve(), os.W_OK):
        raise UsageError(f"{args.output}: cannot write there")
    model = _load(args.input)
    folded, report = fold_onnx(model)
    say = (lambda *a: None) if args.quiet else print
    say(report)
    status = EXIT_OK
    if args.check:
        ok, worst = check(model, folded, args.rtol)
        say(f"check: largest difference {worst:.3g} of the output scale ({'ok' if ok else 'FAILED'})")
        if not ok:
            status = EXIT_CHECK_FAILED
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
    if status == EXIT_OK:
        _write_atomic(folded, out)
        say(f"wrote {out}")
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as e:
        print(f"repfold: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours must still not leave a traceback or a file
        print(f"repfold: error: could not fold: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
