"""The scripts under benchmarks/ (not a package) loaded as modules, for tests of their logic."""

import importlib.util
from types import ModuleType

from .job import ROOT


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
