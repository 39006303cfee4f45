"""The search's objectives by name: val accuracy (maximised, always first) and one or two costs (minimised).

Every trial records every cost it measured as user attrs (``macs``, ``params`` and, when latency is an objective,
``latency_ms``), each also as a ratio to the baseline's (``macs_ratio``, ...), so reports and exports read a cost
by name whatever the study optimised.

A cost is a spec (``Metric``): its names, unit and direction, and how it is measured. MACs and params are counted
together, and latency is timed beside the baseline once per architecture (``latency.LatencyMeter``); any other
cost carries its own ``measure(model, example) -> float`` and is registered with ``register_cost`` (in a plugin
file: one file).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import optuna

from ..utils.errors import UserError
from ..utils.plugins import same_definition


@dataclass(frozen=True)
class Metric:
    name: str  # the config's name: objectives: [accuracy, macs]
    metric_name: str  # the study's metric name: what optuna-dashboard labels the axis with
    attr: str  # the trial's user attr holding the value
    label: str  # a human axis label
    short: str  # its name in one-line summaries
    direction: str  # "maximize" or "minimize"
    unit: str = ""  # printed after a value ("ms"); "" for counts, printed as integers
    measure: Callable | None = None  # (model, example input batch of one) -> value, for a registered cost; the
    # built-in costs are measured by the trial
    after_finetune: bool = False  # True: it depends on the fine-tuned weights (measured after the fine-tune);
    # False: on the architecture alone (measured before it, like latency)

    @property
    def ratio_attr(self) -> str:
        """The user attr of the value as a ratio to the baseline's."""
        return f"{self.name}_ratio"

    @property
    def baseline_attr(self) -> str:
        """The study's user attr of the baseline's value, for a registered cost."""
        return f"baseline_{self.attr}"

    def text(self, value: float | None) -> str:
        """A value with its unit: ``1.92 ms``, ``1,234,567``."""
        if value is None or value != value:  # None or NaN
            return "-"
        return f"{value:.2f} {self.unit}" if self.unit else f"{int(value):,}"


ACCURACY = Metric("accuracy", "val_accuracy", "val_accuracy", "val accuracy", "val", "maximize")
COSTS = {
    "macs": Metric("macs", "macs", "macs", "MACs", "MACs", "minimize"),
    "params": Metric("params", "params", "params", "params", "params", "minimize"),
    "latency": Metric("latency", "latency_ms", "latency_ms", "latency (ms)", "latency", "minimize", unit="ms"),
}
BUILT_IN = ("macs", "params", "latency")
COST_BUDGETS = (0.25, 0.10)  # summaries: the best val accuracy within these fractions of the baseline's first cost
DEFAULT_OBJECTIVES = ["accuracy", "macs"]


def register_cost(metric: Metric) -> Metric:
    """Make ``metric`` a cost the config's ``objectives`` may name; it must carry its ``measure``. A second cost of
    the same name is refused (the same one imported again, as a plugin file can be, replaces itself)."""
    if metric.measure is None or metric.direction != "minimize":
        raise ValueError(f"cost {metric.name!r}: a registered cost is minimised and carries its measure function")
    known = COSTS.get(metric.name)
    if known is not None and not (known.measure and same_definition(known.measure, metric.measure)):
        raise ValueError(f"cost {metric.name!r} is already registered")
    COSTS[metric.name] = metric
    return metric


def check_objectives(names: list[str]) -> list[str]:
    """``names`` if they are accuracy followed by one or two distinct costs; a UserError otherwise."""
    costs = names[1:]
    valid = (
        names[:1] == ["accuracy"]
        and 1 <= len(costs) <= 2
        and all(c in COSTS for c in costs)
        and len(set(costs)) == len(costs)
    )
    if not valid:
        raise UserError(
            f"objectives must be accuracy then one or two of {', '.join(COSTS)} (e.g. accuracy,macs or "
            f"accuracy,macs,latency), got {','.join(map(str, names)) or 'nothing'}"
        )
    return list(names)


def parse_objectives(text: str) -> list[str]:
    """``--objectives accuracy,latency`` as a list."""
    return [name.strip() for name in text.split(",") if name.strip()]


def metrics(names: list[str]) -> list[Metric]:
    return [ACCURACY, *(COSTS[name] for name in names[1:])]


def directions(names: list[str]) -> list[str]:
    return [m.direction for m in metrics(names)]


def metric_names(names: list[str]) -> list[str]:
    return [m.metric_name for m in metrics(names)]


def study_objectives(study: optuna.Study) -> list[str]:
    """The objectives a study optimises (studies made before 0.4.0 recorded none: accuracy and MACs)."""
    return list(study.user_attrs.get("config", {}).get("objectives", DEFAULT_OBJECTIVES))


def cost(trial: optuna.trial.FrozenTrial, name: str) -> float | None:
    """A trial's recorded cost ``name`` (macs, params, latency), or None when it was not measured."""
    value = trial.user_attrs.get(COSTS[name].attr)
    if value is None and name == "macs" and trial.values is not None and len(trial.values) == 2:
        value = trial.values[1]  # before 0.4.0, MACs were the second value only
    return value


def cost_ratio(trial: optuna.trial.FrozenTrial, name: str) -> float | None:
    """A trial's cost ``name`` as a ratio to the baseline's, or None when it was not measured."""
    return trial.user_attrs.get(COSTS[name].ratio_attr)


def costs_text(trial: optuna.trial.FrozenTrial, names: list[str], absolute: bool = False) -> str:
    """The costs ``names`` of a trial as ratios to the baseline, e.g. ``MACs 0.212x  latency 0.350x (1.92 ms)``."""
    parts = []
    for name in names:
        ratio, value = cost_ratio(trial, name), cost(trial, name)
        text = f"{COSTS[name].short} {ratio:.3f}x" if ratio is not None else f"{COSTS[name].short} -"
        if absolute and value is not None:
            text += f" ({COSTS[name].text(value)})"
        parts.append(text)
    return "  ".join(parts)


def best_within(trials: list[optuna.trial.FrozenTrial], cost: str, budget: float) -> optuna.trial.FrozenTrial | None:
    """The COMPLETE trial with the best val accuracy at <= ``budget`` of the baseline's ``cost`` (ties: the lower
    cost, then the earlier trial); None when none fits."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    ratios = {t.number: cost_ratio(t, cost) for t in complete}
    fits = [t for t in complete if ratios[t.number] is not None and ratios[t.number] <= budget + 1e-12]
    return min(fits, key=lambda t: (-t.values[0], ratios[t.number], t.number), default=None)


def dominated_flags(values: Sequence[Sequence[float]], minimize: Sequence[bool]) -> list[bool]:
    """For each point, whether another point dominates it (as good in every value, better in one); points with
    equal values stay on the front together (as ``study.best_trials`` keeps them). The one Pareto filter."""
    if len(values) == 0:
        return []
    signs = np.array([1.0 if low else -1.0 for low in minimize])
    costs = np.asarray(values, dtype=float) * signs  # (points, objectives): lower is better
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)  # [i, j]: i is as good as j in every value
    better = (costs[:, None, :] < costs[None, :, :]).any(axis=2)  # [i, j]: i is better than j in some value
    return [bool(b) for b in (no_worse & better).any(axis=0)]  # j: some i dominates it


def dominated(
    trials: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> list[optuna.trial.FrozenTrial]:
    """The trials that another of ``trials`` dominates: all but the study's Pareto front."""
    minimize = [d == optuna.study.StudyDirection.MINIMIZE for d in directions]
    flags = dominated_flags([t.values for t in trials], minimize)
    return [t for t, out in zip(trials, flags, strict=True) if out]
