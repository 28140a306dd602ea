"""Fingerprints of fold results, to show that a change of the code's shape changes no result bitwise.

    python benchmarks/fingerprint.py --out before.json       # on the old commit
    python benchmarks/fingerprint.py --out after.json        # on the new one
    python benchmarks/fingerprint.py --compare before.json after.json

For each model of the backbone suite (``tests/test_backbones.py``), with random adapters (fixed seeds), a
SHA-256 of: the folded GraphModule's outputs on a fixed input and its state dict (fx); the folded
ExportedProgram's outputs and state dict (torch.export); the folded ONNX file's bytes (TorchScript
exporter) and its onnxruntime outputs; and each report's text. ``--onnx FILE`` adds the fold of an ONNX
file by the command line (``python -m repfold FILE -o OUT``): the hash of OUT's bytes (a ViT-H file for
issue 30).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensors(values) -> bytes:
    import torch

    if isinstance(values, torch.Tensor):
        values = [values]
    if isinstance(values, dict):
        values = [values[k] for k in sorted(values)]
    return b"".join(v.detach().cpu().contiguous().numpy().tobytes() for v in values if isinstance(v, torch.Tensor))


def fingerprints() -> dict[str, dict[str, str]]:
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import export, randomize_adapters
    from test_backbones import BACKBONES

    import repfold

    out: dict[str, dict[str, str]] = {}
    for name, (make, where, size) in BACKBONES.items():
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            gm = repfold.insert(model, example_inputs=x, **where)
            randomize_adapters(gm)
            gm.eval()
            row = {}
            folded, report = repfold.fold(gm, return_report=True)
            with torch.no_grad():
                row["fx"] = _sha(_tensors(folded(x)), _tensors(folded.state_dict()), str(report).encode())
            ep = torch.export.export(gm, (x,), strict=False)
            folded_ep, report = repfold.fold(ep, return_report=True)
            with torch.no_grad():
                row["export"] = _sha(_tensors(folded_ep.module()(x)), _tensors(folded_ep.state_dict),
                                     str(report).encode())
            proto = export(gm, x, dynamo=False)
            folded_proto, report = repfold.fold(proto, return_report=True)
            data = folded_proto.SerializeToString()
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            y = session.run(None, {folded_proto.graph.input[0].name: x.numpy()})
            row["onnx"] = _sha(data, b"".join(a.tobytes() for a in y), str(report).encode())
        out[name] = row
        print(name, row, flush=True)
    return out


def cli_fold(path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "folded.onnx"
        subprocess.run([sys.executable, "-m", "repfold", path, "-o", str(target)], check=True,
                       stdout=subprocess.DEVNULL)
        return _sha(*(p.read_bytes() for p in sorted(Path(tmp).iterdir())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the fingerprints here (JSON)")
    ap.add_argument("--onnx", help="also fold this ONNX file with the command line and hash the result")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        differ = [f"{k}: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        print("\n".join(differ) or f"identical: {len(a)} entries")
        sys.exit(1 if differ else 0)
    result: dict = fingerprints()
    if args.onnx:
        result["cli:" + Path(args.onnx).name] = cli_fold(args.onnx)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
