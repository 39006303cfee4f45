"""The search's objectives by name: val accuracy (maximised, always first) and one or two costs (minimised).

Every trial records every cost it measured as user attrs (``macs``, ``params`` and, when latency is an objective,
``latency_ms``), each also as a ratio to the baseline's (``macs_ratio``, ...), so reports and exports read a cost
by name whatever the study optimised.
"""

from dataclasses import dataclass

import optuna

from .errors import UserError


@dataclass(frozen=True)
class Metric:
    name: str  # the config's name: objectives: [accuracy, macs]
    metric_name: str  # the study's metric name: what optuna-dashboard labels the axis with
    attr: str  # the trial's user attr holding the value
    label: str  # a human axis label
    short: str  # its name in one-line summaries
    direction: str  # "maximize" or "minimize"

    @property
    def ratio_attr(self) -> str:
        """The user attr of the value as a ratio to the baseline's."""
        return f"{self.name}_ratio"


ACCURACY = Metric("accuracy", "val_accuracy", "val_accuracy", "val accuracy", "val", "maximize")
COSTS = {
    "macs": Metric("macs", "macs", "macs", "MACs", "MACs", "minimize"),
    "params": Metric("params", "params", "params", "params", "params", "minimize"),
    "latency": Metric("latency", "latency_ms", "latency_ms", "latency (ms)", "latency", "minimize"),
}
DEFAULT_OBJECTIVES = ["accuracy", "macs"]


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
            text += f" ({value:.2f} ms)" if name == "latency" else f" ({int(value):,})"
        parts.append(text)
    return "  ".join(parts)
