"""benchmarks/RESULTS.md's current tables are what benchmarks/results_tables.py makes of the JSON
the benchmarks wrote: a figure edited by hand, or JSON replaced without regenerating, fails here."""

from tests.helpers.scripts import benchmark_module


def test_results_tables_match_the_benchmarks_json():
    tables = benchmark_module("results_tables")
    text = tables.RESULTS.read_text()
    assert text.count("<!-- table: ") == len(tables.TABLES)
    assert tables.render(text) == text, "run: python benchmarks/results_tables.py"


def test_a_changed_figure_is_caught():
    tables = benchmark_module("results_tables")
    text = tables.RESULTS.read_text()
    edited = text.replace("| **0.710** |", "| **0.690** |", 1)
    assert edited != text and tables.render(edited) != edited
