"""torch, imported on first use: the ONNX path (the command line) never loads it.

The fx matchers in this package reach torch through these names; importing
torch costs seconds and hundreds of megabytes that folding an ONNX file does
not need.
"""

from __future__ import annotations

import importlib


class _Deferred:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = _Deferred("torch")
nn = _Deferred("torch.nn")
F = _Deferred("torch.nn.functional")
fx = _Deferred("torch.fx")
