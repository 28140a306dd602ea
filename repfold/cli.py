"""``python -m repfold IN.onnx -o OUT.onnx``: fold the adapters of an exported model.

Exit codes: 0 done (also when there was nothing to fold), 1 ``--check`` found
the folded model different (nothing written), 2 bad input or usage (a
one-line message on stderr, nothing written), 3 a failure of repfold's own (a
bug: one line naming the region being folded, the traceback with ``--debug``,
nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
MIN_OPSET = 13
PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger model must keep its weights in external data

# Default ``--check`` tolerances by output dtype: |folded - original| <= atol + rtol * max|original|.
TOLERANCES = {
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}


class UsageError(Exception):
    """Bad input or arguments: printed as one line, exit code 2."""


class InternalError(Exception):
    """A failure of repfold's own, found by the command line itself: exit code 3."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repfold",
        description="Fold the linear adapters of an ONNX model into the neighbouring layers.",
        epilog="exit codes: 0 done, 1 --check failed (nothing written), 2 bad input or usage, "
               "3 internal error (a repfold bug; nothing written)",
    )
    p.add_argument("input", help="the ONNX model with adapters (external data is read from its folder)")
    p.add_argument("-o", "--output", help="where to write the folded model (required unless --dry-run)")
    p.add_argument("--check", action="store_true",
                   help="run both models in onnxruntime on random inputs; write nothing if they differ")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="shape of a graph input for --check (needed for dynamic dims other than batch)")
    p.add_argument("--rtol", type=float, help="relative tolerance of --check (default by dtype: 1e-4 for float32)")
    p.add_argument("--atol", type=float, help="absolute tolerance of --check (default by dtype: 1e-6 for float32)")
    p.add_argument("--report", metavar="FILE.json", help="write every region, folded or kept with its reason, as JSON")
    p.add_argument("--dry-run", action="store_true", help="show what would fold; write no model")
    p.add_argument("--no-scales", dest="scales", action="store_false",
                   help="leave lone per-channel scales and shifts (SSF, IA3, LayerScale, BatchNorm) alone")
    p.add_argument("--scales", dest="scales", action="store_true", help=argparse.SUPPRESS)  # the default, kept
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store weights next to the output (auto: when the input did or the model is over 2 GB)")
    p.add_argument("--overwrite", action="store_true", help="allow -o to be the input file")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    return p


class _Progress:
    """Stage lines with elapsed time on stderr, on a terminal only (pipelines get clean logs)."""

    def __init__(self, quiet: bool) -> None:
        self.on = not quiet and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.stage = ""

    def __call__(self, stage: str) -> None:
        self.stage = stage
        if self.on:
            sys.stderr.write(f"\r\033[Krepfold [{time.perf_counter() - self.start:6.1f}s] {stage}")
            sys.stderr.flush()

    def bar(self, done: int, total: int) -> None:
        """A bar after the stage line for the file being read or written (``total`` 0: bytes only)."""
        if not self.on:
            return
        if total:
            filled = int(20 * min(done, total) / total)
            tail = f"[{'#' * filled}{'.' * (20 - filled)}] {done / 1e6:.0f}/{total / 1e6:.0f} MB"
        else:
            tail = f"{done / 1e6:.0f} MB"
        sys.stderr.write(f"\r\033[Krepfold [{time.perf_counter() - self.start:6.1f}s] {self.stage} {tail}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# --- input ---------------------------------------------------------------------------


def _load(path: str, progress=None):
    """(model, the files its external data came from); UsageError for anything else.

    Large external tensors stay in their files (``anchor_external_data``): a
    fold reads the layers it changes, and the rest is copied file to file.
    """
    from repfold.frontends.onnx_io import anchor_external_data, read_model

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory, not an ONNX file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{path}: cannot be read (permission denied)")
    try:
        model = read_model(p, progress)
        try:
            external = {Path(f).resolve() for f in anchor_external_data(model, p.resolve().parent)}
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways, each bad input)
        raise UsageError(f"{path}: not a readable ONNX model ({_short(e)})") from None
    if not model.graph.node:
        raise UsageError(f"{path}: not an ONNX model (no graph nodes)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise UsageError(f"{path}: opset {opset} is not supported (repfold needs opset {MIN_OPSET} or newer)")
    problem = _structure_problem(model.graph)
    if problem:
        raise UsageError(f"{path}: not a valid ONNX model ({problem})")
    return model, external


def _structure_problem(graph) -> str | None:
    """What makes ``graph`` unusable (a truncated or edited file), or None.

    The checks the fold relies on, in one pass over the nodes, without
    serialising the model as ``onnx.checker`` does: every value read is
    defined earlier, every graph output is defined, names are defined once.
    """
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                return f"node {node.name or node.op_type!r} reads {name!r}, which nothing defines before it"
        for name in node.output:
            if name in defined and name:
                return f"{name!r} is defined twice"
            defined.add(name)
    for out in graph.output:
        if out.name not in defined:
            return f"graph output {out.name!r} is not computed"
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(e).__name__
    return line[:200]


def _weight_bytes(model) -> int:
    """Bytes of the weights, wherever they are stored (inline or external)."""
    from repfold.frontends.onnx_io import nbytes

    return sum(nbytes(t) or 0 for t in model.graph.initializer)


def _shapes(specs: list[str]) -> dict[str, list[int]]:
    out = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise UsageError(f"--input-shape {spec!r}: expected NAME=1x3x224x224")
        out[name] = shape
    return out


# --- check ---------------------------------------------------------------------------


def _feeds(model, given: dict[str, list[int]]) -> list[dict[str, np.ndarray]]:
    """Signed random inputs; two batch sizes (1 and 2) when the batch dim is dynamic."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    unknown = set(given) - {vi.name for vi in inputs}
    if unknown:
        raise UsageError(f"--input-shape names no graph input: {', '.join(sorted(unknown))}")
    specs, dynamic_batch = {}, False
    for vi in inputs:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        if vi.name in given:
            if len(given[vi.name]) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given[vi.name])):
                raise UsageError(f"--input-shape {vi.name}: {given[vi.name]} does not fit the input's shape")
            dims = list(given[vi.name])
        elif any(d is None for d in dims[1:]):
            free = [i for i, d in enumerate(dims) if d is None and i > 0]
            raise UsageError(
                f"input {vi.name!r} has dynamic dims {free}: give --input-shape {vi.name}=" + "x".join(
                    str(d or 1) if i == 0 else str(d or "N") for i, d in enumerate(dims))
            )
        elif dims and dims[0] is None:
            dynamic_batch = True
        specs[vi.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    rng = np.random.default_rng(0)
    feeds = []
    for batch in ((1, 2) if dynamic_batch else (None,)):
        feed = {}
        for name, (dims, dtype) in specs.items():
            shape = [batch if d is None else d for d in dims]
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = rng.integers(0, 2, shape).astype(dtype)
            else:
                feed[name] = rng.integers(0, 4, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def check(original: Path, folded: Path, feeds, rtol: float | None = None, atol: float | None = None) -> tuple[bool, str]:
    """Run both model files in onnxruntime on each feed; (every output within tolerance, a summary line).

    Sessions open the files (external data and all), so models over 2 GB check too.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("--check needs onnxruntime (or onnxruntime-gpu) installed") from None

    def session(path: Path):
        try:
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types)
            raise UsageError(f"onnxruntime cannot load {path.name}: {_short(e)}") from None

    a_sess, b_sess = session(original), session(folded)
    ok, worst, parts = True, 0.0, []
    for feed in feeds:
        for meta, a, b in zip(a_sess.get_outputs(), a_sess.run(None, feed), b_sess.run(None, feed)):
            dtype = meta.type.removeprefix("tensor(").removesuffix(")")  # onnxruntime's spelling
            dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
            r, t = TOLERANCES.get(dtype, TOLERANCES["float32"])
            r, t = rtol if rtol is not None else r, atol if atol is not None else t
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            scale = float(np.abs(a).max(initial=0.0))
            diff = float(np.abs(a - b).max(initial=0.0))
            if not np.isfinite(diff) or diff > t + r * scale:
                ok = False
            worst = max(worst, diff / max(scale, 1e-30))
        parts.append("x".join(map(str, next(iter(feed.values())).shape)) if feed else "no inputs")
    return ok, f"check on {', '.join(parts)}: largest difference {worst:.3g} of the output scale"


def loads(original: Path, folded: Path, changed: bool) -> None:
    """Make sure onnxruntime can load the folded model (a session is made, nothing runs).

    A model it refuses is never written: that is repfold's failure
    (:class:`InternalError`) when onnxruntime loads the input; when it cannot
    load the input either (custom ops, say), nothing is lost by folding and
    the output is written. Without onnxruntime there is nothing to ask.
    """
    if not changed:
        return
    try:
        import onnxruntime as ort
    except ImportError:
        return

    def refusal(path: Path) -> str | None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        # nothing runs: the weights need not be packed for its kernels (a copy of every MatMul's weight,
        # most of the load's time and memory on a large model)
        opts.add_session_config_entry("session.disable_prepacking", "1")
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types for every refusal)
            return _short(e)
        return None

    why = refusal(folded)
    if why is not None and refusal(original) is None:
        raise InternalError(f"onnxruntime cannot load the folded model, though it loads the input: {why}")


# --- output --------------------------------------------------------------------------


def _target(args) -> Path | None:
    if args.output is None:
        if args.dry_run:
            return None
        raise UsageError("-o/--output is required (or --dry-run)")
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve() and not args.overwrite:
        raise UsageError(f"{args.output}: is the input file; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"{args.output}: is a directory")
    folder = out.parent.resolve()
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"{args.output}: cannot write in {folder}")
    return out


def stage(
    model, path: Path, external: bool, keep: set[Path] = frozenset(), progress=None, pending: dict | None = None
) -> tuple[Path, Path | None]:
    """Write ``model`` into a new temporary folder beside ``path``; (that folder, final data path or None).

    With ``external`` the weights go to ``<name>.data`` (renamed around
    ``keep``, the input's own data files). :func:`commit` moves the files
    into place; removing the folder instead leaves nothing behind.
    """
    from repfold.frontends.onnx_io import load_left_out, write_model, write_with_external_data

    data = None
    if external:
        data, i = path.with_name(path.name + ".data"), 0
        while data.resolve() in keep:
            i += 1
            data = path.with_name(f"{path.name}.{i}.data")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if data is None:
            load_left_out(model, pending)
            write_model(model, tmp / path.name, progress)
        else:
            write_with_external_data(model, tmp / path.name, tmp / data.name, progress, pending)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, data


def commit(tmp: Path, path: Path, data: Path | None) -> None:
    """Rename the staged files into place, data first: a model file never points at missing data."""
    if data is not None:
        os.replace(tmp / data.name, data)
    os.replace(tmp / path.name, path)


# --- main ----------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from repfold.frontends.onnx import fold_onnx

    say = (lambda *a: None) if args.quiet else print
    progress = _Progress(args.quiet)
    out = _target(args)
    given = _shapes(args.input_shape)
    size = Path(args.input).stat().st_size if Path(args.input).is_file() else 0
    progress(f"loading {args.input} ({size / 1e6:.0f} MB)")
    model, keep = _load(args.input, progress.bar)
    was_external = bool(keep)
    feeds = _feeds(model, given) if args.check else None
    progress("folding")
    # Bound for a data file (the output's weights go where the input's were): the new weights are kept
    # out of the proto and written from their arrays. Into a single file they go into the proto at once.
    to_data_file = args.external_data == "always" or (
        args.external_data == "auto" and (was_external or _weight_bytes(model) > PROTOBUF_LIMIT // 2))
    pending = {} if to_data_file else None
    folded, report = fold_onnx(model, scales=args.scales, own=True, pending=pending)  # --check reads the input again
    model = None
    progress.done()
    say(report)
    if not report.regions:
        say("no adapter regions found: nothing to fold")
    if args.report:
        _write_report(report, Path(args.report))
    if args.dry_run:
        say("dry run: no model written")
        return EXIT_OK
    big = _weight_bytes(folded) > PROTOBUF_LIMIT // 2
    if args.external_data == "never" and big:
        raise UsageError("the folded model is over 2 GB: it needs --external-data auto or always")
    external = args.external_data == "always" or (args.external_data == "auto" and (was_external or big))
    progress(f"writing {out}")
    tmp, data = stage(folded, out, external, keep, lambda done, total: progress.bar(done, total or size), pending)
    folded = None
    try:
        progress("loading the result in onnxruntime")
        loads(Path(args.input), tmp / out.name, bool(report.folded))
        if args.check:
            progress("checking in onnxruntime")
            ok, line = check(Path(args.input), tmp / out.name, feeds, args.rtol, args.atol)
            progress.done()
            say(f"{line} ({'ok' if ok else 'FAILED: nothing written'})")
            if not ok:
                return EXIT_CHECK_FAILED
        commit(tmp, out, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.done()
    say(f"wrote {out}" + (f" (weights in {data.name})" if data else ""))
    return EXIT_OK


def _write_report(report, path: Path) -> None:
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the report ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except UsageError as e:
        print(f"repfold: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("repfold: interrupted; nothing written", file=sys.stderr)
        return 130
    except MemoryError:
        print("repfold: error: out of memory; nothing written", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 (a bug of ours: one line, the traceback with --debug, no file)
        if debug:
            import traceback

            traceback.print_exc()
        region = getattr(e, "region", None)
        where = f" (folding the region at {region})" if region else ""
        known = isinstance(e, InternalError) or type(e).__name__ == "RepfoldError"
        what = _short(e) if known else f"{type(e).__name__}: {_short(e)}"
        print(f"repfold: internal error{where}: {what}; this is a repfold bug, not a problem with the input "
              "(--debug shows the traceback); nothing written", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
