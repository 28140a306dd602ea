"""The examples run as shipped (the demo is `make demo`'s job)."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_custom_adapter_example_folds_an_unregistered_module():
    runpy.run_path(str(EXAMPLES / "custom_adapter.py"), run_name="__main__")


def test_deployment_pipeline_script():
    import os
    import subprocess
    import sys

    done = subprocess.run(["bash", str(EXAMPLES / "deploy.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    assert "(ok)" in done.stdout and "same predictions 100%" in done.stdout


def test_one_base_several_tasks(tmp_path):
    import sys
    from importlib import import_module

    sys.path.insert(0, str(EXAMPLES))
    try:
        import_module("multitask").main(["--out", str(tmp_path)])
    finally:
        sys.path.remove(str(EXAMPLES))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.safetensors" for t in ("flowers", "cars", "pets")] + [f"{t}.onnx" for t in ("flowers", "cars", "pets")])


def test_quickstart_trains_folds_and_ships(capsys):
    module = runpy.run_path(str(EXAMPLES / "quickstart.py"))  # not as __main__: a short run
    module["main"](steps=10)
    assert "same predictions as the trained model on 100%" in capsys.readouterr().out


def test_export_pipeline_trains_folds_and_saves_a_program(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "export_pipeline.py"))  # not as __main__: a short run
    result = module["main"](["--out", str(tmp_path)], steps=5)
    assert result["same"] and result["err"] < 1e-5 and result["moved"] > 1e-3
    assert (tmp_path / "folded.pt2").exists()
    assert "8 folded, 0 kept" in capsys.readouterr().out
