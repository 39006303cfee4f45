"""Ctrl-C and SIGTERM during a search, taken at safe points only.

The handlers ``ranksearch.search.workers`` installs only set a flag. Long loops of the package's own (training steps,
evaluation batches) call ``interruption_point``, which stops a running trial there: a signal handler that raised
wherever it landed could land inside a library callback (SQLAlchemy's, a ``__del__``), where Python prints
"Exception ignored" and goes on, and the trial went on to the end as if nothing had been asked.
"""

import contextlib
import signal
from collections.abc import Iterator


class Signals:
    """Whether a trial is running in this process, and whether Ctrl-C / SIGTERM came (and was not acted on)."""

    in_trial = False
    pending = False


def interruption_point() -> None:
    """Inside a trial, after Ctrl-C / SIGTERM: stop it here (KeyboardInterrupt; it is recorded as interrupted)."""
    if Signals.pending and Signals.in_trial:
        raise KeyboardInterrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where a command asked for it (``sigterm_interrupts``): an interrupt that exits 143 (its text,
    if any, is the line the command line prints, as an ``Interrupted``'s)."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """In the body, SIGTERM raises ``Terminated`` as Ctrl-C raises KeyboardInterrupt, so that a command that writes
    nothing to a study (``export``) stops with its own message, not silently."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C where "finished trials are saved" (the command line's default line) is not what happened: its text
    says what was lost and what the next command does (``cli.main`` prints it)."""


def interrupted_line(interrupt: KeyboardInterrupt) -> str:
    """What the command line says after Ctrl-C or SIGTERM: an ``Interrupted``'s (or ``Terminated``'s) own text,
    else the search's default."""
    return str(interrupt) or "interrupted; finished trials are saved: run again to resume"
