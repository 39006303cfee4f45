"""Progress of a long training (pretraining the baseline, an export's refine, the from-scratch check): a tqdm bar
on a terminal; off one (a log, nohup, CI), a line every ``LINE_SECONDS`` with step k/N, the loss, the rate and the
time left, so that a slow run can be told from a hung one.
"""

import math
import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

LINE_SECONDS = 30.0  # off a terminal: a progress line at most this often (and at the last step)
CPU_CONFIG = "configs/cpu.yaml"  # the config sized for a CPU, which long CPU runs are pointed to
LONG_SECONDS = 3600.0  # a CPU training projected to take longer is told so, after its first steps
PACE_STEPS = 20  # the steps whose pace projects a training's time (after its first, which warms up)


def clock_text(seconds: float) -> str:
    """0:34, 3:05, 1:02:09 (-:-- when unknown)."""
    if not math.isfinite(seconds):
        return "-:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepLines:
    """Off a terminal: a line every ``every`` seconds, and at the last step (``update(steps, loss)``)."""

    takes_loss = True  # ``train_steps`` passes it the step's loss (read only when a line is printed)

    def __init__(self, label: str, total: int, first: int = 0, every: float = LINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, out=None):  # fmt: skip
        self.label, self.total, self.first, self.done, self.every = label, total, first, first, every
        self.clock, self.out = clock, out
        self.start = self.last = clock()

    def update(self, steps: int = 1, loss=None) -> None:
        """``loss``: the last step's (a tensor is read only when a line is printed: no sync per step)."""
        self.done += steps
        now = self.clock()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        print(f"{self.label}: step {self.done:,}/{self.total:,}{loss_text}, {rate:.2f} steps/s, "
              f"ETA {clock_text(left)}", file=self.out or sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        pass


class PaceNote:
    """A progress bar or ``StepLines`` whose updates it forwards; after ``PACE_STEPS`` steps, once, when the
    ``total`` steps would take longer than ``LONG_SECONDS`` at that pace, the line ``text(seconds)`` on stderr."""

    def __init__(self, progress, total: int, text: Callable[[float], str], clock: Callable[[], float] = time.monotonic,
                 out=None):  # fmt: skip
        self.progress, self.total, self.text, self.clock, self.out = progress, total, text, clock, out
        self.takes_loss = getattr(progress, "takes_loss", False)
        self.steps, self.start, self.said = 0, None, False

    def update(self, steps: int = 1, loss=None) -> None:
        if self.takes_loss:
            self.progress.update(steps, loss)
        else:
            self.progress.update(steps)
        self.steps += steps
        if self.start is None:  # after the first step, which warms up
            self.start, self.first = self.clock(), self.steps
        elif not self.said and self.steps - self.first >= PACE_STEPS:
            self.said = True
            seconds = (self.clock() - self.start) / (self.steps - self.first) * self.total
            if seconds > LONG_SECONDS:
                print(self.text(seconds), file=self.out or sys.stderr, flush=True)

    def close(self) -> None:
        self.progress.close()


def draws_bars() -> bool:
    """Whether stderr is a terminal that shows a tqdm bar: one of 0 columns (a pseudo-terminal nobody sized, as
    ``script`` or a container runtime may make) shows nothing of it, so it gets the lines of a log instead."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # no file descriptor (a wrapped stream), or not a terminal after all
        return False


def step_progress(label: str, total: int, first: int = 0):
    """A tqdm bar on a terminal, else ``StepLines``; both take ``update(1)``, ``StepLines`` also the loss."""
    if draws_bars():
        return tqdm(total=total, initial=first, desc=label, unit="step", file=sys.stderr, leave=False)
    return StepLines(label, total, first)
