"""The study as the record of a search: the run's settings (``config``: defaults, YAML, flags, checks), the names
its trials are recorded under (``attrs``), its storage (``storage``: SQLite or PostgreSQL, the claim a run holds, the
checks before a run may add trials), and the weights kept for its Pareto trials (``weights``)."""
