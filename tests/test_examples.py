"""The examples run as shipped (the demo is `make demo`'s job)."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_custom_adapter_example_folds_an_unregistered_module():
    runpy.run_path(str(EXAMPLES / "custom_adapter.py"), run_name="__main__")
