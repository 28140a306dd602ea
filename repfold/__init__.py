"""repfold: insert linear adapters into vision backbones, then fold them away.

    gm = repfold.insert(model, before=["attn", "mlp"])   # train these adapters
    folded = repfold.fold(gm)                            # same outputs, base cost
"""

from ._adapters import RepAdapter
from ._api import fold, load_adapters, save_adapters
from ._insert import insert
from ._report import FoldReport, Region
from ._trace import TraceError

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
