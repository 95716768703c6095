"""The repository's command-line tools (sample.py, convert_weights.py) loaded as modules, so that a test can
call their `main(argv)` in its own process: quicker than a subprocess, and monkeypatch reaches inside."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    """ROOT/<name>.py as a fresh module (its top level runs again at each call)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
