"""repfold: insert linear adapters into vision backbones, then fold them away.

    gm = repfold.insert(model, before=["attn", "mlp"])   # train these adapters
    folded = repfold.fold(gm)                            # same outputs, base cost
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public names and the modules that define them. They are imported on first
# use, so `python -m repfold` on an ONNX file never loads torch.
_WHERE = {
    "RepAdapter": ".adapters.modules",
    "fold": ".api",
    "load_adapters": ".api",
    "save_adapters": ".api",
    "insert": ".adapters.insert",
    "FoldReport": ".report",
    "Region": ".report",
    "TraceError": ".frontends.trace",
}

if TYPE_CHECKING:
    from repfold.adapters.insert import insert
    from repfold.adapters.modules import RepAdapter
    from repfold.api import fold, load_adapters, save_adapters
    from repfold.frontends.trace import TraceError
    from repfold.report import FoldReport, Region


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "FoldReport",
    "Region",
    "RepAdapter",
    "TraceError",
    "fold",
    "insert",
    "load_adapters",
    "save_adapters",
]
__version__ = "0.1.0"
