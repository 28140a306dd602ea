"""The layers of docs/ARCHITECTURE.md hold: no import cycle (function-local imports included), and no module
imports a layer above its own (``tools/check_imports.py``, which ``make lint`` runs too)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_and_no_layer_breach(capsys):
    assert _checker().main() == 0, capsys.readouterr().out


def test_the_checker_sees_a_function_local_cycle(tmp_path, monkeypatch):
    """A cycle hidden in function-local imports (as the one between the torch.export frontend, the fx
    frontend, insert and tracing was) is found, and so is a core module that imports a frontend."""
    check = _checker()
    for rel, text in {
        "repfold/__init__.py": "",
        "repfold/core/__init__.py": "",
        "repfold/core/engine.py": "def f():\n    from repfold.frontends.fx import g\n",
        "repfold/frontends/__init__.py": "",
        "repfold/frontends/fx.py": "from repfold.core import engine\n\ndef g():\n    pass\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "patterns").mkdir()
    monkeypatch.setattr(check, "ROOT", tmp_path)
    assert check.main() == 1
    graph = {n: {m for m, _ in check.imports(n, p, set(check.modules()))} for n, p in check.modules().items()}
    assert check.cycles(graph) == [["repfold.core.engine", "repfold.frontends.fx"]]
    assert not check.allowed("repfold.core.engine", "repfold.frontends.fx")


@pytest.mark.parametrize("name", ["repfold.core.affine", "repfold.core.engine", "repfold.core.driver"])
def test_the_core_loads_without_torch(name):
    """The algebra, the engine and the driver are NumPy and networkx: no frontend, no torch."""
    import subprocess
    import sys

    code = f"import sys, {name}; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
