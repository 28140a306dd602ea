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
    "RepAdapter": "._adapters",
    "fold": "._api",
    "load_adapters": "._api",
    "save_adapters": "._api",
    "insert": "._insert",
    "FoldReport": "._report",
    "Region": "._report",
    "TraceError": "._trace",
}

if TYPE_CHECKING:
    from ._adapters import RepAdapter
    from ._api import fold, load_adapters, save_adapters
    from ._insert import insert
    from ._report import FoldReport, Region
    from ._trace import TraceError


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
