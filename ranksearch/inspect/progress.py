"""One console line per finished trial of a run: the trial, the run's progress and ETA, the best so far.

    [3/20] trial 17  ranks 8/8/4/2/2 /32  val 65.95%  MACs 0.412x  11.2 s | elapsed 0:34, ETA 3:05 | best val at
    <=25% MACs: 66.1% (t12), at <=10%: 58.0% (t9)

(one line on the console). Pure: reads the study and the finished trial, writes to ``out``.
"""

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

import optuna

from ..models import ranks_text
from ..objectives.registry import COST_BUDGETS, COSTS, best_within, costs_text
from ..study.attrs import COPIED_FROM, FAIL_REASON, param_name
from ..utils.steps import CPU_CONFIG, LONG_SECONDS, clock_text

COMPLETE = optuna.trial.TrialState.COMPLETE
RECENT_TRIALS = 5  # the ETA's pace: the last this many finished trials (a machine that got busy shows at once)


def trial_ranks_text(params: dict, modules: list[str]) -> str:
    """A trial's ranks as k of k/32, one per module: "8/8/4/2/2 /32" ("?" for a rank it never drew)."""
    return ranks_text(params.get(param_name(m)) for m in modules)


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


class TrialProgress:
    """Optuna callback: prints one line per trial finished while it is attached (``total`` expected)."""

    def __init__(
        self, total: int, modules: list[str], costs: list[str], out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic, label: str = "",
        count: Callable[[list[optuna.trial.FrozenTrial]], int] | None = None, budget: str | None = None,
    ):  # fmt: skip
        """``label`` names the worker in each line; ``count(trials)`` says how many of the ``total`` trials are done
        among the study's ``trials`` (all workers of a run together; default: the trials this callback has seen).
        ``costs``: the study's costs (objectives after accuracy), shown as ratios to the baseline's."""
        self.total, self.modules, self.costs = total, modules, costs
        self.out = out  # None: sys.stdout at the time of printing
        self.clock = clock
        self.start = clock()
        self.finished = 0
        self.label, self.count, self.budget = label, count, budget
        self.marks = deque([(self.start, 0)], maxlen=RECENT_TRIALS)  # (time, trials done) at the last lines

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)  # one read of the storage per line
        self.finished = self.count(trials) if self.count else self.finished + 1
        line = " | ".join((self.trial_text(trial), self.time_text(), self.best_text(trials)))
        print(line, file=self.out or sys.stdout, flush=True)
        self.marks.append((self.clock(), self.finished))

    def trial_text(self, trial: optuna.trial.FrozenTrial) -> str:
        worker = f" {self.label}" if self.label else ""
        ranks = trial_ranks_text(trial.params, self.modules)
        head = f"[{self.finished}/{self.total}]{worker} trial {trial.number}  ranks {ranks}"
        if trial.state == COMPLETE:
            result = f"val {trial.values[0]:.2%}  {costs_text(trial, self.costs)}"
        else:
            why = trial.user_attrs.get(FAIL_REASON, trial.user_attrs.get("pruned_at", ""))
            reason = str(why).strip().partition("\n")[0]
            result = f"{trial.state.name}: {reason}" if reason else trial.state.name
        seconds = trial_seconds(trial)
        return f"{head}  {result}" + ("" if seconds is None else f"  {seconds:.1f} s")

    def time_text(self) -> str:
        """Elapsed time, and the ETA at the pace of the last ``RECENT_TRIALS`` trials (or all, when fewer)."""
        now = self.clock()
        since, done_then = self.marks[0]
        per_trial = (now - since) / max(self.finished - done_then, 1)
        remaining = max(self.total - self.finished, 0)
        return f"elapsed {clock_text(now - self.start)}, ETA {clock_text(per_trial * remaining)}"

    def best_text(self, trials: list[optuna.trial.FrozenTrial]) -> str:
        complete = [t for t in trials if t.state == COMPLETE]
        if self.budget is not None:  # every trial meets the budget
            best = max(complete, key=lambda t: (t.values[0], -t.number), default=None)
            return f"best val within {self.budget}: " + (f"{best.values[0]:.1%} (t{best.number})" if best else "-")
        parts = []
        for index, budget in enumerate(COST_BUDGETS):
            best = best_within(complete, self.costs[0], budget)
            label = f"at <={budget:.0%}" + (f" {COSTS[self.costs[0]].short}" if index == 0 else "")
            parts.append(f"{label}: " + (f"{best.values[0]:.1%} (t{best.number})" if best else "-"))
        return "best val " + ", ".join(parts)


class LongRunNote:
    """Optuna callback: after the first trial this process finished on a CPU, when the trials asked would take more
    than ``LONG_SECONDS`` at its pace, one line saying how long, and what a CPU-sized config is."""

    def __init__(self, total: int, out: TextIO | None = None):
        self.total, self.out, self.said = total, out, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seconds = trial_seconds(trial)
        if self.said or seconds is None or trial.user_attrs.get(COPIED_FROM) is not None:
            return
        self.said = True
        if seconds * self.total > LONG_SECONDS:
            print(f"note: at this trial's {seconds:.0f} s, the {self.total} trials asked take about "
                  f"{clock_text(seconds * self.total)} on this CPU; {CPU_CONFIG} is sized for a CPU "
                  "(--config configs/cpu.yaml --trials 20: 4-9 min on 2 idle cores)", file=self.out or sys.stdout,
                  flush=True)  # fmt: skip
