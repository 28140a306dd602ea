"""repfold's fold-rule library: one op family per module.

Each module exports ``match_fx`` and ``match_onnx``; the frontends try them in
the order of :data:`RULES`. Adding an op means adding its semantics and its
two matchers to one of these files (or a new one listed here) and a test.
"""

from . import attention, conv, elementwise, layout, linear, normalization
from ._base import Match

RULES = (linear, conv, attention, normalization, elementwise, layout)

__all__ = ["RULES", "Match", "attention", "conv", "elementwise", "layout", "linear", "normalization"]
