"""What a trial is scored on: val accuracy and the costs (``registry``: MACs, params, latency, and a plugin's own
through ``register_cost``); the exact cost table of every rank vector (``cost_table``); latency measured beside the
baseline, once per architecture (``latency``); and a budget's text (``budget``: ``--budget macs=0.1``).

The registry's names are importable from here, as plugin files written for 0.8.0 import them
(``from ranksearch.objectives import Metric, register_cost``).
"""

from .registry import (
    ACCURACY,
    BUILT_IN,
    COST_BUDGETS,
    COSTS,
    DEFAULT_OBJECTIVES,
    Metric,
    check_objectives,
    register_cost,
)

__all__ = ["ACCURACY", "BUILT_IN", "COST_BUDGETS", "COSTS", "DEFAULT_OBJECTIVES", "Metric", "check_objectives",
           "register_cost"]  # fmt: skip
