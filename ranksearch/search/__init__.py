"""The search: one trial (``trial``: decompose, fine-tune, measure, or copy a finished twin), how trials are drawn
and pruned (``samplers``, ``gp_grid``), the first ranks tried (``warmstart``, ``sensitivity``), worker processes
(``workers``), and a run's search from the baseline to its last trial (``runner``)."""
