"""`unparrot demo`: the pipeline (pipeline.py: synth -> stages -> select -> reshard -> train -> evaluate,
through the Python API) and its findings (findings.py: the numbers, tables and the summary over seeds)."""

from .findings import COLUMNS, SHIFTS, demo_table, er_table, model_numbers, results_index, seeds_summary
from .pipeline import DemoConfig, DemoOptions, demo

__all__ = [
    "COLUMNS",
    "DemoConfig",
    "SHIFTS",
    "DemoOptions",
    "demo",
    "demo_table",
    "er_table",
    "model_numbers",
    "results_index",
    "seeds_summary",
]
