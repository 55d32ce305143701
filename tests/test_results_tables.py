"""benchmarks/RESULTS.md's current tables are what benchmarks/results_tables.py makes of the JSON
the benchmarks wrote: a figure edited by hand, or JSON replaced without regenerating, fails here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_tables_match_the_benchmarks_json():
    tables = _module()
    text = tables.RESULTS.read_text()
    assert text.count("<!-- table: ") == len(tables.TABLES)
    assert tables.render(text) == text, "run: python benchmarks/results_tables.py"


def test_a_changed_figure_is_caught():
    tables = _module()
    text = tables.RESULTS.read_text()
    edited = text.replace("| **0.710** |", "| **0.690** |", 1)
    assert edited != text and tables.render(edited) != edited
