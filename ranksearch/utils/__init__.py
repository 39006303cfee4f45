"""The small helpers every stage uses, and which use nothing of ranksearch's: one-line user errors (``errors``),
atomic files, caches and locks (``files``), devices and threads (``device``), Ctrl-C and SIGTERM (``interrupts``),
clocks and progress bars (``steps``), plugin files (``plugins``)."""
